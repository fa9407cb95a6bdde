"""The diagnostics during real training runs: records, TensorBoard, unchanged training, resume, 2 processes."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diagnostics.records import PER_STAGE_KEYS, read_diagnostics
from diagnostics.tensorboard_logging import STAGE_REGEX
from diagnostics.tensorboard_plugin.plugin import read_depth_series
from models import load_model_file
from tests.conftest import DEMO_RECIPE, TINY_OVERRIDES
from trainer.loop import train
from trainer.recipe import load_recipe
from trainer.training_diagnostics import gradient_access, measures_checkpoint, sharded_weights

# Drop-path (torch RNG) and mixup (numpy RNG) make the loss depend on every RNG stream.
STOCHASTIC = ["model.drop_path_rate=0.2", "augment.mixup=0.8", "augment.cutmix=1.0", "train.ema_decay=0.9"]
ALL_METRICS = "diagnostics.metrics=[token_similarity,isi,attention,neural_collapse,plasticity,grad_norms]"
DIAGNOSTICS = [ALL_METRICS, "diagnostics.tensorboard_images=checkpoints", "diagnostics.enabled=true",
               "diagnostics.model=both", "diagnostics.every_steps=2",
               "diagnostics.grad_norm_every_steps=1", "checkpoint.every_steps=3", "checkpoint.every_epochs=null",
               "eval.every_epochs=null", "checkpoint.save_best=false", "data.synthetic_eval_size=96",
               "diagnostics.probe_size=96", "diagnostics.probe_batch_size=40", "diagnostics.isi_pca_rank=4",
               "diagnostics.isi_pca_oversample=4", "diagnostics.plasticity_pairs=24",
               "diagnostics.isi_ridge_grid=[0.001,0.1,10]", "train.max_steps=4"]


def train_losses(run):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def events(run):
    files = list((Path(run) / "tb").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(files[0].parent), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    return accumulator.Reload()


def reset_accelerate_state():
    """accelerate keeps process-wide singletons; reset them between runs in one test process."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def tiny_train(overrides, run_dir, resume=None):
    result = train(load_recipe(DEMO_RECIPE, [*TINY_OVERRIDES, *overrides]), run_dir, resume=resume)
    reset_accelerate_state()
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 stochastic steps with and without diagnostics (plus resume of the first from step 3)."""
    root = tmp_path_factory.mktemp("diag")
    tiny_train([*STOCHASTIC, *DIAGNOSTICS], root / "with")
    tiny_train([*STOCHASTIC, *(o for o in DIAGNOSTICS if "diagnostics." not in o)], root / "without")
    records_before_resume = read_diagnostics(root / "with")
    tiny_train([*STOCHASTIC, *DIAGNOSTICS], root / "with", resume=str(root / "with" / "checkpoints" / "step_00000003"))
    return {"with": root / "with", "without": root / "without", "records_before_resume": records_before_resume}


def test_diagnostics_do_not_change_training(runs):
    assert train_losses(runs["with"])[:4] == train_losses(runs["without"])  # exactly, every RNG stream restored
    for (name, a), b in zip(load_model_file(runs["with"] / "checkpoints" / "step_00000004" / "model.safetensors")
                            .state_dict().items(),
                            load_model_file(runs["without"] / "checkpoints" / "step_00000004" / "model.safetensors")
                            .state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not (runs["without"] / "diagnostics.jsonl").exists()


def test_records_follow_the_documented_format(runs):
    records = runs["records_before_resume"]
    # every_steps at 2 and 4, the periodic checkpoint at 3; the final save at 4 is not measured twice
    assert [(r["step"], r["model"], r["trigger"]) for r in records] == [
        (2, "raw", "every_steps"), (2, "ema", "every_steps"), (3, "raw", "checkpoint"), (3, "ema", "checkpoint"),
        (4, "raw", "every_steps"), (4, "ema", "every_steps")]
    stages = ["embed", "pe", "block_1", "block_2", "norm"]
    for record in records:
        assert record["stages"] == stages and record["probe_size"] == 96 and record["num_processes"] == 1
        for metric, keys in PER_STAGE_KEYS.items():
            assert set(record[metric]) == set(keys) and all(len(record[metric][k]) == len(stages) for k in keys)
        assert record["attention"]["consensus"][0] is None and record["plasticity"]["MHA"][-1] is None
        assert record["neural_collapse"]["nc4_ncc_mismatch"][:-1] == [None] * 4  # head metrics at norm only
        assert record["isi"]["r2_self"][0] > 0.99 and abs(record["isi"]["isi"][0]) < 0.01  # embed from itself
        assert record["phases"]["cliff_end"] in stages and len(record["phases"]["tau_sensitivity"]) == 3
        assert isinstance(record["pe_dominance"], float) and record["elapsed_s"] > 0
        assert record["grad_norms"]["MHA"][2] > 0 and record["grad_norms"]["MHA"][0] is None
    raw_2, ema_2 = records[0], records[1]
    assert raw_2["token_similarity"] != ema_2["token_similarity"]  # the EMA weights were probed, not the raw ones


def test_tensorboard_depth_tensors_few_scalars_and_images(runs):
    accumulator = events(runs["with"])
    tags = accumulator.Tags()
    scalars = set(tags["scalars"])
    # per-stage values are tensors for the Depth tab; Scalars keeps a few summaries per evaluation
    assert not [tag for tag in scalars if re.search(f"/{STAGE_REGEX}", tag)]
    for tag in ("depth/phase/cliff_size", "depth/phase/plateau_length", "depth/isi/mean", "depth/isi/max",
                "depth/attn/cls_centrality_ratio_last", "depth/nc/nc1_final", "depth/plasticity/MHA_mean",
                "depth/probe/top1", "depth_ema/phase/cliff_size"):
        assert tag in scalars, tag
    assert len([tag for tag in scalars if tag.startswith("depth/")]) <= 12
    assert [e.step for e in accumulator.Scalars("depth/phase/plateau_length")] == [2, 3, 4]  # resumed at 3: once each

    records = {(r["step"], r["model"]): r for r in read_diagnostics(runs["with"])}
    (depth,) = read_depth_series(runs["with"] / "tb").values()  # as the Depth tab reads them
    for tag, metric, key, model in (("depth/token_sim_centered", "token_similarity", "centered", "raw"),
                                    ("depth/isi", "isi", "isi", "raw"), ("depth/nc1", "neural_collapse", "nc1", "raw"),
                                    ("depth_ema/attn_consensus", "attention", "consensus", "ema")):
        content = json.loads(accumulator.SummaryMetadata(tag).plugin_data.content)
        assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "depth"
        assert content["stages"] == ["embed", "pe", "block_1", "block_2", "norm"] and content["model"] == model
        assert [step for step, _ in depth[tag]] == [2, 3, 4], tag  # the resumed steps 3 and 4 once each
        for step, values in depth[tag]:
            assert values == records[step, model][metric][key], (tag, step)  # null where undefined
    phases = depth["depth/phases"][-1][1]
    assert phases[0] == records[4, "raw"]["stages"].index(records[4, "raw"]["phases"]["cliff_end"])
    assert [step for step, _ in depth["depth/grad_norm_FC1"]] == [1, 2, 3, 4]
    assert "custom_scalars__config__" not in tags["tensors"]  # the Depth tab replaces Custom Scalars

    for tag in ("depth/heatmap/token_sim_centered", "depth/heatmap/isi", "depth/heatmap/nc1", "depth/phase_curve",
                "depth_ema/heatmap/attn_consensus"):
        assert tag in tags["images"], tag
    heatmaps = accumulator.Images("depth/heatmap/token_sim_centered")
    assert [e.step for e in heatmaps] == [3, 4]  # images at the checkpoint evaluations only
    assert heatmaps[0].encoded_image_string != heatmaps[-1].encoded_image_string  # rebuilt with more columns


def test_resume_truncates_diagnostics_after_the_checkpoint(runs):
    before, after = runs["records_before_resume"], read_diagnostics(runs["with"])
    assert [(r["step"], r["model"]) for r in after] == [(r["step"], r["model"]) for r in before]
    resumed_4 = after[-2]
    assert resumed_4["token_similarity"] == before[-2]["token_similarity"]  # step 4 redone, same weights


def test_sharded_backends_are_measured_through_a_replica_and_their_gradients_where_they_live():
    def accelerator(kind, stage=None):
        return SimpleNamespace(distributed_type=kind,
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))

    assert sharded_weights(accelerator(DistributedType.MULTI_GPU)) is None
    assert sharded_weights(accelerator(DistributedType.DEEPSPEED, 2)) is None  # ZeRO-1/2: full weights
    assert sharded_weights(accelerator(DistributedType.FSDP)) == "fsdp"
    assert sharded_weights(accelerator(DistributedType.DEEPSPEED, 3)) == "zero3"
    assert gradient_access(accelerator(DistributedType.MULTI_GPU)) == {}
    assert gradient_access(accelerator(DistributedType.FSDP)) == {"sharded": True}
    assert gradient_access(accelerator(DistributedType.DEEPSPEED, 2))["grad_of"].__name__ == "safe_get_full_grad"


def test_preemption_and_best_only_saves_are_not_measured(tiny_recipe):
    cfg = tiny_recipe("diagnostics.enabled=true").diagnostics
    for tags in (["preempt"], ["best"], ["periodic", "preempt"]):
        assert not measures_checkpoint(cfg, tags), tags
    assert measures_checkpoint(cfg, ["periodic"]) and measures_checkpoint(cfg, ["stopped", "best"])


def test_images_final_renders_once_at_the_end_with_every_evaluation(tmp_path, tiny_recipe):
    cadence = ["diagnostics.enabled=true", "diagnostics.metrics=[token_similarity]", "diagnostics.every_steps=1",
               "diagnostics.tensorboard_images=final", "checkpoint.every_steps=2", "checkpoint.every_epochs=null",
               "checkpoint.save_best=false", "eval.every_epochs=null", "train.max_steps=4"]
    train(tiny_recipe(*cadence), tmp_path / "run")
    reset_accelerate_state()
    accumulator = events(tmp_path / "run")
    (depth,) = read_depth_series(tmp_path / "run" / "tb").values()
    assert [step for step, _ in depth["depth/token_sim_centered"]] == [1, 2, 3, 4]
    (image,) = accumulator.Images("depth/heatmap/token_sim_centered")  # not at the periodic save of step 2
    assert image.step == 4 and [e.step for e in accumulator.Images("depth/phase_curve")] == [4]


# 2 processes (written once, the values one process computes): tests/test_faults_launcher.py's 2-process run
