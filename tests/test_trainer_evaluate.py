"""Evaluation metrics and run summaries against brute-force references; backend refusals."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import accelerator as distributed
from trainer.accelerator import DistributedSetupError, check_backend
from trainer.evaluate import evaluate
from trainer.run_dir import accuracy_summary


class FixedLogits(torch.nn.Module):
    """Returns precomputed logits for the batch whose first pixel holds the batch index."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits[int(images[0, 0, 0, 0])]


def test_top1_top5_count_only_valid_examples(fresh_accelerate):
    torch.manual_seed(0)
    num_batches, batch, classes = 3, 7, 10
    logits = torch.randn(num_batches, batch, classes)
    targets = torch.randint(0, classes, (num_batches, batch))
    valid = torch.rand(num_batches, batch) > 0.3
    loader = [(torch.full((batch, 1, 2, 2), float(i)), targets[i], valid[i]) for i in range(num_batches)]
    got = evaluate({"": FixedLogits(logits)}, loader, Accelerator(cpu=True), classes)
    # brute force over the valid examples only
    hits1 = hits5 = count = 0
    for i in range(num_batches):
        for j in range(batch):
            if valid[i, j]:
                order = sorted(range(classes), key=lambda c: -logits[i, j, c].item())
                hits1 += order[0] == targets[i, j].item()
                hits5 += targets[i, j].item() in order[:5]
                count += 1
    assert got["top1"] == pytest.approx(100 * hits1 / count, abs=1e-3)
    assert got["top5"] == pytest.approx(100 * hits5 / count, abs=1e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=20))
def test_peak_to_final_is_best_minus_last_and_never_negative(values):
    evals = [{"step": i, "epoch": i + 1, "top1": v, "top5": v} for i, v in enumerate(values)]
    s = accuracy_summary(evals)
    assert s["top1_final"] == values[-1] and s["top1_best"] == max(values)
    assert s["best_epoch"] == values.index(max(values)) + 1  # the earliest best
    assert s["peak_to_final"] == pytest.approx(max(values) - values[-1], abs=1e-6) and s["peak_to_final"] >= 0
    assert accuracy_summary(evals, "_ema") is None


def fake_accelerator(kind, zero_stage=2):
    return SimpleNamespace(distributed_type=kind,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))


@pytest.mark.parametrize("kind,stage", [(DistributedType.FSDP, 2), (DistributedType.DEEPSPEED, 3)])
def test_grouped_mlp_is_refused_where_a_shared_mlp_would_be_split(kind, stage, tiny_recipe):
    recipe = tiny_recipe("variant.kind=grouped_mlp", "train.ema_decay=null")
    with pytest.raises(DistributedSetupError, match="grouped_mlp"):
        check_backend(recipe, fake_accelerator(kind, stage))
    check_backend(recipe, fake_accelerator(DistributedType.DEEPSPEED, 2))  # ZeRO-2 keeps full parameters
    check_backend(recipe, fake_accelerator(DistributedType.MULTI_GPU))


def test_missing_deepspeed_is_a_clear_error(tiny_recipe, monkeypatch):
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DistributedSetupError, match=r"pip install 'depthlab\[deepspeed\]'"):
        distributed._deepspeed_plugin(tiny_recipe("distributed.strategy=deepspeed"))


@pytest.mark.parametrize("kind,stage", [(DistributedType.FSDP, 2), (DistributedType.DEEPSPEED, 3)])
def test_an_ema_is_refused_where_parameters_are_sharded(kind, stage, tiny_recipe):
    with pytest.raises(DistributedSetupError, match=r"train.ema_decay under (FSDP|DeepSpeed ZeRO-3)"):
        check_backend(tiny_recipe("train.ema_decay=0.99"), fake_accelerator(kind, stage))
    check_backend(tiny_recipe("train.ema_decay=0.99"), fake_accelerator(DistributedType.DEEPSPEED, 2))


def test_skipping_bad_batches_is_refused_under_deepspeed(tiny_recipe):
    # DeepSpeed steps inside backward: the update is applied before the loss could be checked.
    with pytest.raises(DistributedSetupError, match="train.nonfinite_max_skips = 2 under DeepSpeed"):
        check_backend(tiny_recipe("train.nonfinite_max_skips=2"), fake_accelerator(DistributedType.DEEPSPEED, 2))
    check_backend(tiny_recipe("train.nonfinite_max_skips=2"), fake_accelerator(DistributedType.MULTI_GPU))


def test_deepspeed_without_a_launcher_is_a_clear_error(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(DistributedSetupError, match="needs a distributed launcher: `accelerate launch --use_deepspeed"):
        distributed.build_accelerator(tiny_recipe("distributed.strategy=deepspeed"), tmp_path)
