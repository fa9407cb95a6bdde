"""Per-component gradient norms against a brute-force walk over named parameters."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from diagnostics.grad_norms import GRAD_COMPONENTS, component_grad_norms
from tests import conftest

pytestmark = pytest.mark.usefixtures("single_thread")


PREFIXES = {"LN1": "norm1.", "MHA": "attn.", "LN2": "norm2.", "FC1": "mlp.fc1.", "FC2": "mlp.fc2."}


tiny_vit = partial(conftest.tiny_vit, eval=False, depth=4, num_classes=3)


def backward(model: torch.nn.Module) -> None:
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0])).backward()


def brute_force(model, block: int, component: str) -> float:
    """sqrt(Σ grad²) over `blocks.<block>.<prefix>*` (named_parameters lists a shared tensor once)."""
    prefix = f"blocks.{block}.{PREFIXES[component]}"
    grads = [p.grad for name, p in model.named_parameters() if name.startswith(prefix) and p.grad is not None]
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def test_norms_match_brute_force():
    model = tiny_vit()
    backward(model)
    got = component_grad_norms(model)
    for component in GRAD_COMPONENTS:
        assert list(got[component]) == [f"block_{i + 1}" for i in range(4)]
        for i in range(4):
            expected = brute_force(model, i, component)
            assert got[component][f"block_{i + 1}"] == pytest.approx(expected, rel=1e-5)
    assert got["mlp_groups"] == {f"block_{i + 1}": [f"block_{i + 1}"] for i in range(4)}


def test_grouped_mlp_shared_mlp_is_counted_once_under_its_first_block():
    model = tiny_vit({"kind": "grouped_mlp", "group_size": 2})
    backward(model)
    got = component_grad_norms(model)
    for component in ("FC1", "FC2"):
        assert list(got[component]) == ["block_1", "block_3"]
        # the shared tensor's grad already sums both blocks' contributions; counted once, not twice
        assert got[component]["block_1"] == pytest.approx(brute_force(model, 0, component), rel=1e-5)
        assert got[component]["block_3"] == pytest.approx(brute_force(model, 2, component), rel=1e-5)
    assert list(got["MHA"]) == [f"block_{i + 1}" for i in range(4)]
    assert got["mlp_groups"] == {"block_1": ["block_1", "block_2"], "block_3": ["block_3", "block_4"]}


def test_frozen_components_are_null_and_non_blocks_are_rejected():
    model = tiny_vit()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".attn." in name or name.startswith("head"))
    backward(model)
    got = component_grad_norms(model)
    assert all(value is None for value in got["FC1"].values())
    assert all(value > 0 for value in got["MHA"].values())
    model.blocks[0] = torch.nn.Linear(16, 16)
    with pytest.raises(TypeError, match="not a timm pre-norm Block"):
        component_grad_norms(model)
