"""Preemption and errors through `accelerate launch`, as Slurm and a user's Ctrl-C deliver them: a SIGTERM to
the launcher alone, or to the whole process group, ends every rank with a saved checkpoint, with 1 and with 2
processes; a 2-process run stopped that way resumes with 2 processes exactly; a bad recipe is one error line.
The 2-process straight run also measures the diagnostics: written once, with the values one process computes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ablations.launch import free_port
from diagnostics.records import PER_STAGE_KEYS, read_diagnostics
from tests.conftest import DEMO_RECIPE, REPO, TINY_OVERRIDES
from trainer.checkpoint import complete_checkpoints, read_manifest

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
LAUNCH = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# synthetic 64 images: 8 updates per epoch with 1 process, 4 with 2; 2 epochs
OVERRIDES = [*TINY_OVERRIDES, "model.drop_path_rate=0.1", "train.ema_decay=0.9", "train.max_steps=8",
             "checkpoint.every_steps=4", "checkpoint.every_epochs=null", "eval.every_epochs=null",
             "data.synthetic_eval_size=120"]
# every probe metric at the checkpoints (steps 4 and 8); the probe set is 120 eval images split over 2 processes
DIAGNOSTICS = ["diagnostics.enabled=true", "diagnostics.metrics=[token_similarity,isi,attention,neural_collapse,"
               "plasticity]", "diagnostics.probe_size=120", "diagnostics.probe_batch_size=32",
               "diagnostics.isi_pca_rank=4", "diagnostics.isi_ridge_grid=[0.001,0.1,10]",
               "diagnostics.plasticity_pairs=10", "diagnostics.tensorboard_images=never"]

# rank 0 signals, after update 2, the launcher (its parent) or the whole process group. The SIGTERM reaches
# rank 0 later (torchrun passes it on; a 1-process launcher dies of it and the kernel's parent-death signal
# follows), so rank 0 waits until the trainer's handler has run: a slow machine cannot finish the 8 updates first.
SCRIPT = """
import json, os, signal, sys, time
from pathlib import Path
from tests.rank_report import RankReport
from trainer.callbacks import Callback
from trainer.loop import train
from trainer.recipe import load_recipe

class Signal(Callback):
    def __init__(self, target):
        self.target = target

    def on_step_end(self, run, record):
        if record.step == 2 and run.accelerator.process_index == 0:
            if self.target == "launcher":
                received, trainers = [], signal.getsignal(signal.SIGTERM)

                def seen(signum, frame):
                    received.append(signum)
                    trainers(signum, frame)

                signal.signal(signal.SIGTERM, seen)
                os.kill(os.getppid(), signal.SIGTERM)
                deadline = time.monotonic() + 60
                while not received and time.monotonic() < deadline:
                    time.sleep(0.01)
                signal.signal(signal.SIGTERM, trainers)
            elif self.target == "group":
                os.killpg(os.getpgrp(), signal.SIGTERM)

recipe, run_dir, overrides, target, resume = sys.argv[1:6]
result = train(load_recipe(recipe, json.loads(overrides)), Path(run_dir), resume=resume or None,
               callbacks=[RankReport(), Signal(target)])
print(f"status {result.status} at step {result.state.step}")
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launcher") / "signalled_run.py"
    path.write_text(SCRIPT)
    return path


def launch(script: Path, run: Path, processes: int, target: str = "none", resume: str = "", extra: tuple = ()):
    """`accelerate launch` in a session of its own (its process group is the launcher and its ranks). Returns
    once every rank has exited: they hold the launcher's stdout pipe, even after the launcher is gone."""
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else []
    proc = subprocess.Popen([ACCELERATE, "launch", *multi, "--num_processes", str(processes), *LAUNCH, str(script),
                             str(DEMO_RECIPE), str(run), json.dumps([*OVERRIDES, *extra]), target, resume],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def ranks(run: Path, processes: int) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(processes)]


def assert_preempted_and_saved(run: Path, processes: int, out: str) -> int:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted" and 2 < summary["step"] < 8, summary
    last = complete_checkpoints(run / "checkpoints")[-1]
    manifest = read_manifest(last)
    assert "preempt" in manifest["tags"] and manifest["step"] == summary["step"]
    assert {f"rng_rank{r}.pt" for r in range(processes)} <= set(manifest["files"])  # every rank saved its streams
    assert f"status preempted at step {summary['step']}" in out
    return summary["step"]


@pytest.mark.parametrize("target", ["launcher", "group"])
def test_one_process_sigterm_to_the_launcher_or_the_group_saves_a_checkpoint(script, tmp_path, target):
    code, out, err = launch(script, tmp_path / "run", 1, target)
    assert code == -signal.SIGTERM, err[-2000:]  # the launcher itself dies of it; the trainer saved first
    assert_preempted_and_saved(tmp_path / "run", 1, out)
    assert "stopped by" not in err and "Traceback" not in err


def test_two_processes_sigterm_to_the_launcher_saves_on_every_rank_and_two_processes_resume_exactly(script,
                                                                                                   tmp_path):
    code, out, err = launch(script, tmp_path / "straight", 2, extra=DIAGNOSTICS)
    assert code == 0, err[-3000:]
    assert_diagnostics_written_once_with_one_process_values(tmp_path / "straight", out, tmp_path / "offline")
    code, out, err = launch(script, tmp_path / "run", 2, "launcher")
    assert code == 1  # torchrun passes the SIGTERM on to the ranks, waits for them, then reports it as a failure
    stopped = assert_preempted_and_saved(tmp_path / "run", 2, out)
    assert out.count(f"status preempted at step {stopped}") == 2  # both ranks stopped at the same step
    code, _, err = launch(script, tmp_path / "run", 2, resume="auto")
    assert code == 0, err[-3000:]
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    assert all(resumed[s] == pytest.approx(straight[s], abs=1e-6) for s in straight)  # diagnostics change nothing
    a, b = ranks(tmp_path / "straight", 2), ranks(tmp_path / "run", 2)
    assert a[0]["weights"] == a[1]["weights"] == b[0]["weights"] == b[1]["weights"]
    assert a[0]["ema"] == b[0]["ema"] == b[1]["ema"]


def assert_diagnostics_written_once_with_one_process_values(run: Path, out: str, offline: Path) -> None:
    records = read_diagnostics(run)  # written once, by the main process
    assert [(r["step"], r["num_processes"], r["probe_size"]) for r in records] == [(4, 2, 120), (8, 2, 120)]
    assert out.count("diagnostics step 8 (raw)") == 1

    from tools.analyze import main as analyze

    analyze(["--run", str(run), "--output", str(offline), "--device", "cpu"])
    (single,) = json.loads((offline / "analysis.json").read_text())["records"]  # the last checkpoint, 1 process
    record = records[-1]
    assert single["stages"] == record["stages"] and single["phases"]["cliff_end"] == record["phases"]["cliff_end"]
    for metric, keys in PER_STAGE_KEYS.items():
        for key in keys:
            for got, expected in zip(single[metric][key], record[metric][key], strict=True):
                assert (got is None) == (expected is None), (metric, key)
                assert got is None or got == pytest.approx(expected, rel=1e-4, abs=1e-6), (metric, key)
    assert single["pe_dominance"] == pytest.approx(record["pe_dominance"], rel=1e-6)


def test_two_processes_sigterm_to_the_group_saves_on_every_rank(script, tmp_path):
    code, out, err = launch(script, tmp_path / "run", 2, "group")
    stopped = assert_preempted_and_saved(tmp_path / "run", 2, out)
    assert out.count(f"status preempted at step {stopped}") == 2


def test_a_bad_recipe_under_two_processes_is_one_error_line(tmp_path):
    proc = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--main_process_port", str(free_port()),
                           "--num_processes", "2", *LAUNCH, "trainer/train.py",
                           "--recipe", str(DEMO_RECIPE), "--output", str(tmp_path / "run"),
                           "--set", "train.batch_size=0"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1  # torchrun's: it reports a failed rank as 1 (the rank itself exited 2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {DEMO_RECIPE}: train.batch_size = 0 is out of range: expected >= 1"] or \
        len(errors) == 1 and "train.batch_size = 0" in errors[0], proc.stderr[-2000:]
