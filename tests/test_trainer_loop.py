"""The training loop end to end, in this process: exact resume, non-finite losses, every recipe wired."""

import json
from pathlib import Path

import pytest
import torch

import trainer.loop
from models import load_model_file
from trainer.callbacks import Callback
from trainer.checkpoint import complete_checkpoints, read_manifest
from trainer.loop import NonFiniteLossError, train
from trainer.train import main

REPO = Path(__file__).resolve().parents[1]
# Drop-path (torch RNG) and mixup/cutmix (numpy RNG) make the exactness test depend on every stream.
STOCHASTIC = ["model.drop_path_rate=0.2", "augment.mixup=0.8", "augment.cutmix=1.0", "train.ema_decay=0.9",
              "eval.every_epochs=1", "checkpoint.every_epochs=1"]


def train_records(run_dir, kind="train"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def final_weights(run_dir):
    return load_model_file(Path(run_dir) / "checkpoints" / "last" / "model.safetensors").state_dict()


def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_recipe, fresh_accelerate):
    straight = train(tiny_recipe(*STOCHASTIC), tmp_path / "straight")
    assert straight.status == "finished" and straight.state.step == 16
    # Stop mid-epoch (8 updates per epoch), then resume with --resume auto semantics.
    stopped = train(tiny_recipe(*STOCHASTIC, "train.max_steps=5"), tmp_path / "resumed")
    assert stopped.status == "max_steps" and stopped.state.batch_in_epoch == 5
    resumed = train(tiny_recipe(*STOCHASTIC), tmp_path / "resumed", resume="auto")
    assert resumed.status == "finished"
    a, b = train_records(tmp_path / "straight"), train_records(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 17))  # records after the resume point replaced, once
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6), x["step"]
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
    evals_a, evals_b = train_records(tmp_path / "straight", "eval"), train_records(tmp_path / "resumed", "eval")
    assert [e["top1_ema"] for e in evals_a] == [e["top1_ema"] for e in evals_b]
    for (name, wa), wb in zip(final_weights(tmp_path / "straight").items(),
                              final_weights(tmp_path / "resumed").values()):
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-6, msg=name)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["ema"]["top1_final"] == evals_a[-1]["top1_ema"]


class NaNAfter:
    """A criterion returning NaN on the given (1-based) calls."""

    def __init__(self, criterion, bad_calls):
        self.criterion, self.bad_calls, self.calls = criterion, set(bad_calls), 0

    def __call__(self, logits, targets):
        self.calls += 1
        loss = self.criterion(logits, targets)
        return loss * float("nan") if self.calls in self.bad_calls else loss


def nan_criterion(monkeypatch, bad_calls):
    build = trainer.loop.build_criterion
    monkeypatch.setattr(trainer.loop, "build_criterion", lambda *a: NaNAfter(build(*a), bad_calls))


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path, tiny_recipe, monkeypatch,
                                                                  fresh_accelerate):
    nan_criterion(monkeypatch, {5})
    with pytest.raises(NonFiniteLossError) as err:
        train(tiny_recipe("checkpoint.every_steps=2"), tmp_path / "run")
    message = str(err.value)
    assert "at step 5 (epoch 1, batch 5)" in message
    assert message.endswith(str(tmp_path / "run" / "checkpoints" / "step_00000004"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_nonfinite_batches_are_skipped_up_to_the_limit(tmp_path, tiny_recipe, monkeypatch, fresh_accelerate,
                                                      capsys):
    nan_criterion(monkeypatch, {3})
    result = train(tiny_recipe("train.nonfinite_max_skips=1"), tmp_path / "run")
    assert result.status == "finished" and result.state.nonfinite_skips == 1
    assert result.state.step == 15  # one of the 16 updates was skipped
    assert "non-finite loss (nan) at step 3" in capsys.readouterr().out


def test_missing_data_path_exits_2_naming_it(tmp_path, capsys, fresh_accelerate):
    missing = tmp_path / "no_such_imagenet"
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", str(REPO / "recipes" / "vit_s.yaml"), "--output", str(tmp_path / "run"),
              "--set", f"data.root={missing}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_trains_two_steps(recipe, tmp_path, tiny_recipe, fresh_accelerate):
    shrink = ["data.synthetic_train_size=16", "data.synthetic_eval_size=8", "train.batch_size=4",
              "train.max_steps=2", "eval.batch_size=8", "eval.every_steps=2", "model.depth=2"]
    r = tiny_recipe(*shrink, path=REPO / "recipes" / recipe)
    result = train(r, tmp_path / "run")
    assert result.status == "max_steps" and result.state.step == 2
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert read_manifest(ckpt)["step"] == 2
    model = load_model_file(ckpt / "model.safetensors")
    if r.variant.kind == "grouped_mlp":
        assert model.blocks[1].mlp is model.blocks[0].mlp
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["raw"]["top1_final"] is not None and summary["params"] > 0


def test_grad_accumulation_matches_the_large_batch(tmp_path, tiny_recipe, fresh_accelerate):
    """2 micro-batches of 4 (with activation checkpointing) train exactly like batches of 8."""
    train(tiny_recipe("train.max_steps=4"), tmp_path / "big")
    train(tiny_recipe("train.max_steps=4", "train.batch_size=4", "train.grad_accum_steps=2",
                      "train.grad_checkpointing=true"), tmp_path / "accum")
    big, accum = train_records(tmp_path / "big"), train_records(tmp_path / "accum")
    assert [r["step"] for r in accum] == [1, 2, 3, 4]
    for x, y in zip(big, accum):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    # (Weights are not compared element-wise: the key bias gets a mathematically zero gradient, and
    # Adam turns float noise of either summation order into full-size updates there.)


class Recorder(Callback):
    """Uses every hook and every logging channel of the context."""

    def __init__(self):
        self.calls = []

    def on_train_start(self, ctx):
        self.calls.append("start")

    def on_step_end(self, ctx, record):
        self.calls.append("step")

    def on_evaluate(self, ctx, metrics):
        self.calls.append("evaluate")
        ctx.log_scalars({"custom/top1_twice": 2 * metrics["top1"]})
        ctx.log_images({"custom/image": torch.zeros(1, 3, 4, 4)})
        ctx.log_text({"custom/note": "hello"})
        ctx.append_jsonl("custom.jsonl", {"top1": metrics["top1"]})

    def on_checkpoint(self, ctx, path, tags):
        self.calls.append(f"checkpoint:{path.name}:{','.join(tags)}")

    def on_train_end(self, ctx):
        self.calls.append("end")


def test_callbacks_see_every_hook_and_log_to_tensorboard_and_jsonl(tmp_path, tiny_recipe, fresh_accelerate):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = Recorder()
    train(tiny_recipe("train.max_steps=4", "eval.every_steps=2", "checkpoint.every_steps=4"), tmp_path / "run",
          callbacks=[recorder])
    assert recorder.calls[0] == "start" and recorder.calls[-1] == "end"
    assert recorder.calls.count("step") == 4 and recorder.calls.count("evaluate") == 2
    assert "checkpoint:step_00000004:periodic" in recorder.calls
    records = [json.loads(line) for line in (tmp_path / "run" / "custom.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/throughput_img_s", "train/data_wait_fraction",
            "eval/top1", "eval/top5_ema", "custom/top1_twice"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert "custom/image" in events.Tags()["images"]
    assert any("custom/note" in tag for tag in events.Tags()["tensors"])


def test_relaunches_add_no_tensorboard_runs_and_hparams_carry_the_accuracies(tmp_path, tiny_recipe, fresh_accelerate):
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    for extra, resume in ((["train.max_steps=4"], None), ([], "auto"), ([], "auto")):  # the last one: a no-op
        train(tiny_recipe("eval.every_steps=4", *extra), tmp_path / "run", resume=resume)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    tb = tmp_path / "run" / "tb"
    assert [p for p in tb.iterdir() if p.is_dir()] == []  # one run in the selector, not one per launch
    hparams = {value.tag: value.metadata.plugin_data.content for file in sorted(tb.glob("events.out.tfevents.*"))
               for event in EventFileLoader(str(file)).Load() for value in event.summary.value
               if value.metadata.plugin_data.plugin_name == "hparams"}
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"summary/top1_final", "summary/peak_to_final",
                                                              "depth/phase/cliff_size"}
    assert {h.name for h in experiment.hparam_infos} >= {"variant.kind", "optim.lr", "train.seed"}
    final = EventAccumulator(str(tb), size_guidance={"scalars": 0}).Reload().Scalars("summary/top1_final")[-1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert final.step == 16 and final.value == pytest.approx(summary["raw"]["top1_final"], abs=1e-4)
