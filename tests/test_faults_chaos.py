"""Kills at any moment lose nothing: a short run SIGKILLed before its first checkpoint, inside a checkpoint
write, between logging a step and saving it, and during a diagnostics measurement, resumed each time with
`--resume auto`, leaves metrics.jsonl, diagnostics.jsonl and the TensorBoard scalars equal, record for
record, to an uninterrupted run's, and the same final weights."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diagnostics.tensorboard_plugin.plugin import read_depth_series
from models import load_model_file
from tests.conftest import DEMO_RECIPE, REPO, TINY_OVERRIDES

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
# 64 synthetic images / 8 = 8 updates per epoch, 3 epochs = 24 updates; checkpoints every 4, diagnostics every 3
OVERRIDES = [*TINY_OVERRIDES, "schedule.epochs=3",
             "model.drop_path_rate=0.1", "train.ema_decay=0.9", "logging.every_steps=2", "checkpoint.every_steps=4",
             "checkpoint.every_epochs=null", "checkpoint.keep_last=1", "eval.every_steps=6", "eval.every_epochs=null",
             "diagnostics.enabled=true", "diagnostics.metrics=[token_similarity,attention]",
             "diagnostics.every_steps=3", "diagnostics.probe_size=24", "diagnostics.tensorboard_images=never"]

# Runs trainer/train.py, SIGKILLing itself at the moment named by DEPTHLAB_KILL:
#   log:S          right after step S was logged (metrics.jsonl and TensorBoard), before its checkpoint
#   commit:N       inside the N-th checkpoint save of this session: every file written, not yet sealed
#   diagnostics:S  in the middle of the diagnostics measurement of step S
SCRIPT = """
import os, signal, sys
import trainer.save_restore, trainer.tracking, trainer.training_diagnostics
from trainer.train import main

where, _, at = os.environ.get("DEPTHLAB_KILL", "none:0").partition(":")
at, commits = int(at), []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_commit = trainer.save_restore.commit
def commit(tmp, final, manifest):
    commits.append(final)
    if where == "commit" and len(commits) == at:
        die()
    return real_commit(tmp, final, manifest)
trainer.save_restore.commit = commit

real_step = trainer.tracking.RunLogger.step
def step(self, record, state):
    real_step(self, record, state)
    if where == "log" and record.step == at:
        die()
trainer.tracking.RunLogger.step = step

real_build_record = trainer.training_diagnostics.build_record
def build_record(*args, **kwargs):
    if where == "diagnostics" and kwargs["step"] == at:
        die()
    return real_build_record(*args, **kwargs)
trainer.training_diagnostics.build_record = build_record
main(sys.argv[1:])
"""


def launch(script: Path, run: Path, kill: str | None) -> subprocess.CompletedProcess:
    env = {**ENV, **({"DEPTHLAB_KILL": kill} if kill else {})}
    return subprocess.run([sys.executable, str(script), "--recipe", str(DEMO_RECIPE), "--output", str(run),
                           "--resume", "auto", "--set", *OVERRIDES], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def records(run: Path, name: str) -> list[dict]:
    """The deterministic fields of every record (timings and memory differ between sessions)."""
    timing = {"throughput_img_s", "data_wait_fraction", "peak_host_rss_gib", "peak_gpu_mem_gib", "elapsed_s"}
    lines = (run / name).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def leaves(value, prefix: str = "") -> dict:
    """A record's nested values by path: {"phases.cliff_end": ..., "token_similarity.raw.0": ...}."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in leaves(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Training curves and every per-stage value the Depth tab shows, as (step, value) series by tag[stage]."""
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    out = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
           if tag.startswith(("train/loss", "train/lr", "eval/", "depth/phase/", "depth/attn/"))}
    (depth,) = read_depth_series(run / "tb").values()  # the plugin's reader drops what a resumed session redid
    for tag, series in depth.items():
        if tag.startswith(("depth/token_sim", "depth/attn_consensus", "depth/phases")):
            for i in range(len(series[0][1])):
                out[f"{tag}[{i}]"] = [(step, values[i]) for step, values in series if values[i] is not None]
    return out


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chaos") / "killable_train.py"
    path.write_text(SCRIPT)
    return path


def test_kills_at_any_moment_leave_the_logs_and_weights_of_the_uninterrupted_run(script, tmp_path):
    straight = tmp_path / "straight"
    assert launch(script, straight, None).returncode == 0
    chaos = tmp_path / "chaos"
    # before the first checkpoint (a restart from step 0), inside the 2nd save of a session, between the
    # log and the save of a checkpoint step, during a diagnostics measurement, inside a resumed session's save
    kills = ["log:3", "commit:2", "log:12", "diagnostics:15", "commit:1"]
    for kill in kills:
        proc = launch(script, chaos, kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stderr[-2000:])
    proc = launch(script, chaos, None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished at step 24" in proc.stdout

    for name in ("metrics.jsonl", "diagnostics.jsonl"):
        got, want = records(chaos, name), records(straight, name)
        assert [(r["step"], r.get("kind", r.get("model"))) for r in got] == \
               [(r["step"], r.get("kind", r.get("model"))) for r in want], name
        for a, b in zip(got, want):
            flat_a, flat_b = leaves(a), leaves(b)
            assert flat_a.keys() == flat_b.keys(), (name, a["step"])
            for key, value in flat_b.items():
                same = flat_a[key] == value if not isinstance(value, float) else \
                    flat_a[key] == pytest.approx(value, abs=1e-6)
                assert same, (name, a["step"], key, flat_a[key], value)
    got, want = scalars(chaos), scalars(straight)
    assert got.keys() == want.keys() and "train/loss" in got and "depth/token_sim_centered[2]" in got
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], abs=1e-6), tag
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_model_file(chaos / "checkpoints" / "last" / name).state_dict()
        b = load_model_file(straight / "checkpoints" / "last" / name).state_dict()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert not [p for p in (chaos / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
