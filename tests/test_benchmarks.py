"""The benchmark scripts run end to end at a tiny size and print what the README quotes (no timings asserted)."""

import re

import torch

from diagnostics.isi import isi_stage_bytes
from tools import benchmark_isi, benchmark_train


def test_benchmark_train_prints_both_sides_and_their_ratio(capsys, fresh_accelerate):
    benchmark_train.main(["--windows", "2", "--steps", "2", "--warmup", "1", "--set", "train.batch_size=8"])
    out = capsys.readouterr().out
    assert re.search(r"depthlab\s+[0-9.]+ img/s", out) and re.search(r"plain timm\s+[0-9.]+ img/s", out)
    assert float(re.search(r"ratio depthlab / plain: ([0-9.]+)", out).group(1)) > 0


def test_benchmark_isi_groups_stages_by_budget_and_measures_isi_near_zero_at_random_init(capsys):
    five_stages_gb = 5.5 * isi_stage_bytes(4, 192, pca_rank=4) / 2**30  # ViT-Ti at 32 px: N = 4, D = 192
    # 2 threads: batched float64 LU solves failed there at random (the ridge fits solve by Cholesky)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        benchmark_isi.main(["--images", "96", "--img-size", "32", "--batch-size", "32", "--pca-rank", "4",
                            "--budget-gb", str(five_stages_gb), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "14 of 15 stages fitted in 3 group(s) of <= 5 (pe = embed, copied)" in out
    assert re.search(r"ISI / forward = [0-9.]+x", out) and "measured / planned" in out
    low, high = map(float, re.search(r"min ([-+0-9.]+), max ([-+0-9.]+)", out).groups())
    assert -0.05 < low <= high < 0.05
