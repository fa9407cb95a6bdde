"""tools/gpu_check.py, the one command for everything GPU-only, runs end to end on CPU (--tiny)."""

import subprocess
import sys

from tests.conftest import REPO

CHECKS = ("train_eager", "train_compile", "diagnostics_cost", "device_augment", "isi_10k", "fsdp_resume", "deepspeed_resume",
          "grouped_fsdp_refused", "tf32", "memory_vit_s", "memory_vit_b", "memory_vit_l")


def test_gpu_check_tiny_prints_one_line_per_check_and_passes_on_cpu():
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--tiny"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines() if line[:5].strip() in
            ("pass", "FAIL", "skip")}
    assert list(rows) == list(CHECKS)
    # what CPU can run runs; what needs a GPU says so
    assert all(rows[name] == "pass" for name in ("train_eager", "train_compile", "diagnostics_cost", "device_augment",
                                                  "isi_10k", "fsdp_resume", "grouped_fsdp_refused"))
    assert all(rows[name] == "skip" for name in ("deepspeed_resume", "tf32", "memory_vit_b"))
    assert proc.stdout.strip().endswith("12/12 passed or skipped")


def test_gpu_check_without_a_gpu_and_without_tiny_is_one_error_line():
    proc = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no CUDA device; run with --tiny on CPU"
