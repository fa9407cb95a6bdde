"""DeepSpeed ZeRO-2 through accelerate as 2 real CPU processes (DeepSpeed's CPU accelerator over gloo):
it trains what DDP trains, every rank holds the same weights, a stop-and-resume is exact, and bf16
keeps float32 weights where they matter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablations.launch import free_port
from diagnostics.records import read_diagnostics
from models import load_model_file
from tests.conftest import DEMO_RECIPE, REPO, TINY_OVERRIDES

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

SCRIPT = """
import json, sys
from pathlib import Path
from tests.rank_report import RankReport
from trainer.loop import train
from trainer.recipe import load_recipe

recipe, run_dir, overrides, resume = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] or None
train(load_recipe(recipe, overrides), Path(run_dir), resume=resume, callbacks=[RankReport()])
"""

OVERRIDES = [*TINY_OVERRIDES, "variant.kind=grouped_mlp", "train.ema_decay=0.9", "model.drop_path_rate=0.1",
             "checkpoint.every_steps=3"]  # 64 images / (2 x 8) = 4 updates per epoch, 8 in all
# per-component gradient norms every update, and a token-similarity probe every 2 (whose records carry them)
GRAD_NORMS = ["diagnostics.enabled=true", "diagnostics.metrics=[token_similarity,grad_norms]",
              "diagnostics.every_steps=2", "diagnostics.at_checkpoints=false", "diagnostics.grad_norm_every_steps=1",
              "diagnostics.probe_size=16", "diagnostics.tensorboard_images=never"]


def launch(tmp_path, run, strategy, *extra, resume="", accelerate_args=("--multi_gpu",)):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    overrides = [*OVERRIDES, f"distributed.strategy={strategy}", *extra]
    proc = subprocess.run([ACCELERATE, "launch", *accelerate_args, "--main_process_port", str(free_port()),
                           "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(DEMO_RECIPE),
                           str(run), json.dumps(overrides), resume],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ranks, {r["step"]: r["loss"] for r in losses if r["kind"] == "train"}


def grad_norms_at(run, step):
    record = next(r for r in read_diagnostics(run) if r["step"] == step)
    return {c: [v for v in values if v is not None] for c, values in record["grad_norms"].items()}


def test_zero2_trains_like_ddp_ranks_agree_resume_is_exact_and_bf16_saves_fp32(tmp_path):
    ranks, zero2 = launch(tmp_path, tmp_path / "zero2", "deepspeed", "distributed.zero_stage=2", *GRAD_NORMS)
    assert [r["backend"] for r in ranks] == ["DEEPSPEED", "DEEPSPEED"] and ranks[0]["world"] == 2
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["ema"] == ranks[1]["ema"]
    assert all(r["tied"] for r in ranks)  # GroupedMLP's shared MLP stays one module under ZeRO-2

    # The same update as DDP: equal losses while the weights agree, then only floating-point drift
    # (Adam divides by |grad| + eps, so gradients near zero amplify reduction-order rounding).
    _, ddp = launch(tmp_path, tmp_path / "ddp", "ddp", *GRAD_NORMS)
    # per-component gradient norms read from DeepSpeed's engine (between its backward and its step) equal
    # DDP's, where the weights still agree (step 2: after one identical update)
    for component, values in grad_norms_at(tmp_path / "ddp", 2).items():
        assert values and grad_norms_at(tmp_path / "zero2", 2)[component] == pytest.approx(values, rel=1e-4), component
    assert sorted(zero2) == sorted(ddp) == list(range(1, 9))
    assert zero2[1] == pytest.approx(ddp[1], abs=1e-6) and zero2[2] == pytest.approx(ddp[2], abs=1e-5)
    assert all(zero2[s] == pytest.approx(ddp[s], abs=2e-2) for s in zero2)
    zero2_model = load_model_file(tmp_path / "zero2" / "checkpoints" / "last" / "model.safetensors")
    ddp_model = load_model_file(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors")
    for (name, a), b in zip(zero2_model.state_dict().items(), ddp_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=0, msg=name)

    # Stopped after update 3 (a checkpoint), resumed from DeepSpeed's sharded state: identical run, also when
    # compiled (DeepSpeed's engine.compile, through accelerate; the eager backend keeps the numerics)
    resumed, compiled = tmp_path / "resumed", ["train.compile=true", "train.compile_backend=eager"]
    launch(tmp_path, resumed, "deepspeed", "distributed.zero_stage=2", *compiled, "train.max_steps=3")
    ranks_resumed, losses = launch(tmp_path, resumed, "deepspeed", "distributed.zero_stage=2", *compiled,
                                   resume="auto")
    assert all(losses[s] == pytest.approx(zero2[s], abs=1e-6) for s in zero2)
    assert ranks_resumed[0]["weights"] == ranks[0]["weights"] and ranks_resumed[0]["ema"] == ranks[0]["ema"]
    for name in ("model", "ema"):  # no `_orig_mod.` in the names: they load like any other checkpoint
        load_model_file(resumed / "checkpoints" / "last" / f"{name}.safetensors")

    # `distributed.strategy: auto` under `accelerate launch --use_deepspeed`: the launcher's DeepSpeed, with the
    # recipe's micro-batch (a DeepSpeed config leaves it "auto", and the trainer prepares no dataloader); in bf16:
    # DeepSpeed holds bf16 module weights (inputs are cast to them) over float32 masters, the checkpoint stores
    # the masters and the EMA averages in float32 (bf16 would round its updates away)
    bf16 = tmp_path / "bf16"
    ranks_auto, losses = launch(tmp_path, bf16, "auto", "train.precision='bf16'",
                                accelerate_args=["--use_deepspeed", "--zero_stage", "2"])
    assert [r["backend"] for r in ranks_auto] == ["DEEPSPEED", "DEEPSPEED"]
    assert [r["micro_batch"] for r in ranks_auto] == [8, 8]  # the recipe's train.batch_size
    assert sorted(losses) == sorted(zero2) and all(losses[s] == pytest.approx(zero2[s], abs=5e-3) for s in zero2)
    for name in ("model", "ema"):
        weights = load_model_file(bf16 / "checkpoints" / "last" / f"{name}.safetensors").state_dict()
        qkv = weights["blocks.0.attn.qkv.weight"]
        assert qkv.dtype == torch.float32 and (qkv != qkv.bfloat16().float()).float().mean() > 0.9, name
