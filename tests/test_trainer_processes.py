"""The trainer as real processes: 2-process DDP (GroupedMLP), SIGTERM preemption, a kill during a save."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ablations.launch import free_port
from models import load_model_file
from tests.conftest import DEMO_RECIPE, REPO, TINY_OVERRIDES
from trainer.checkpoint import complete_checkpoints, read_manifest
from trainer.train import main

PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

DDP_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
from tests.rank_report import RankReport
from trainer.callbacks import Callback
from trainer.loop import train
from trainer.recipe import load_recipe

class PreemptRank1AtStep2(Callback):
    # Only rank 1 is signalled: every rank must still stop at the same step.
    def on_step_end(self, ctx, record):
        if ctx.accelerator.process_index == 1 and record.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

recipe, run_dir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
train(load_recipe(recipe, overrides), Path(run_dir), callbacks=[RankReport(), PreemptRank1AtStep2()])
"""


def test_two_process_ddp_grouped_mlp_ranks_identical_one_writer_and_preemption(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "run"
    # compiled (the eager backend: the graph and the wrappers, without code generation) after the DDP wrapper:
    # the checkpoints' names have no `_orig_mod.` and load everywhere
    overrides = [*TINY_OVERRIDES, "data.source=digits", "variant.kind=grouped_mlp", "model.drop_path_rate=0.1",
                 "train.compile=true", "train.compile_backend=eager",
                 "train.max_steps=4", "checkpoint.every_steps=2", "eval.every_steps=4", "train.ema_decay=0.9"]
    proc = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--main_process_port", str(free_port()),
                           "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(DEMO_RECIPE),
                           str(run), json.dumps(overrides)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["ema"] == ranks[1]["ema"]
    assert all(r["tied"] and r["ema_tied"] for r in ranks)
    # One TensorBoard writer: every event file comes from the main process.
    event_pids = {f.name.split(".")[-2] for f in (run / "tb").rglob("events.out.tfevents.*")}
    assert event_pids == {str(ranks[0]["pid"])}
    # Rank 1 was signalled after step 2: both ranks learn it in step 3's all-reduce and stop there.
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    # Checkpoints written once, with each rank's RNG streams; metrics logged once per step.
    ckpts = complete_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000003"]
    assert "preempt" in read_manifest(ckpts[-1])["tags"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    for c in ckpts:
        assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors", "ema.safetensors"} <= set(
            read_manifest(c)["files"])
    model = load_model_file(ckpts[-1] / "model.safetensors")
    assert model.blocks[1].mlp is model.blocks[0].mlp
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3]


def cli_args(run, *extra):
    return ["--recipe", str(DEMO_RECIPE), "--output", str(run),
            "--set", *TINY_OVERRIDES, "schedule.epochs=500", *extra]


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, fresh_accelerate):
    run = tmp_path / "run"
    proc = subprocess.Popen([PYTHON, "trainer/train.py", *cli_args(run)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way (an epoch is 8 updates)
        if line.startswith("epoch 1/500"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in out and "--resume auto" in out
    command = out.split("resume with:\n")[1].splitlines()[0].strip()
    assert command.startswith("python trainer/train.py --recipe") and f"--output {run}" in command
    last = complete_checkpoints(run / "checkpoints")[-1]
    manifest = read_manifest(last)
    assert "preempt" in manifest["tags"] and manifest["step"] >= 8
    step = manifest["step"]  # 8 updates per epoch; epochs are 1-based, as on the console
    where = f"end of epoch {step // 8}" if step % 8 == 0 else f"in epoch {step // 8 + 1}"
    assert f"stopped by SIGTERM at step {step} ({where}); checkpoint saved: " in out
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    main(cli_args(run, f"train.max_steps={manifest['step'] + 2}") + ["--resume", "auto"])
    assert json.loads((run / "summary.json").read_text())["step"] == manifest["step"] + 2


CTRL_C_TWICE_SCRIPT = """
import os, signal, sys
import trainer.tracking
from trainer.train import main

real_step = trainer.tracking.RunLogger.step
def step(self, record, state):
    real_step(self, record, state)
    if record.step == 9:  # two Ctrl-C in a row (signals sent together may arrive as one)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
trainer.tracking.RunLogger.step = step
main(sys.argv[1:])
"""


def test_ctrl_c_twice_stops_at_once_with_one_line_and_exit_130(tmp_path):
    script = tmp_path / "ctrl_c_twice.py"
    script.write_text(CTRL_C_TWICE_SCRIPT)
    run = tmp_path / "run"
    proc = subprocess.run([PYTHON, str(script), *cli_args(run)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    err = proc.stderr
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"error: interrupted (Ctrl-C twice): the step in progress was not saved; "
                                        f"continue from the last checkpoint with --resume auto (run dir {run})"]


KILL_SCRIPT = """
import os, signal, sys
import trainer.save_restore
from trainer.train import main

real_commit, calls = trainer.save_restore.commit, []
def commit_then_die(tmp, final, manifest):
    calls.append(tmp)
    if len(calls) == 2:  # the second save: all files written, not yet sealed or renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_commit(tmp, final, manifest)
trainer.save_restore.commit = commit_then_die
main(sys.argv[1:])
"""


def test_kill_during_save_keeps_previous_checkpoint_and_resume_auto_uses_it(tmp_path, fresh_accelerate):
    script = tmp_path / "killed_run.py"
    script.write_text(KILL_SCRIPT)
    run = tmp_path / "run"
    args = cli_args(run, "checkpoint.every_steps=2")
    proc = subprocess.run([PYTHON, str(script), *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == ["step_00000002"]
    load_model_file(run / "checkpoints" / "step_00000002" / "model.safetensors")
    main(args + ["train.max_steps=3", "--resume", "auto"])
    state = json.loads((run / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["batch_in_epoch"] == 3
    assert not (run / "checkpoints" / ".tmp-step_00000004").exists()
