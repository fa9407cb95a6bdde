"""Attention hub metrics against explicit loops, attention recomputed from qkv, and invariants."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.attention_metrics import (
    AttentionMetrics,
    attention_consensus,
    attention_entropy,
    cls_centrality,
    mean_attention_distance,
)
from diagnostics.capture import iterate_stages
from diagnostics.streaming import run_probe, update_metrics
from tests import conftest

tiny_vit = partial(conftest.tiny_vit, img_size=32, embed_dim=32, depth=4)


def probe_images(count: int, size: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(2))


def random_attention(batch: int, heads: int, tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(batch, heads, tokens, tokens, generator=generator)).softmax(dim=-1)


# ---- brute force: explicit loops --------------------------------------------------------------------

def brute_force_metrics(attention: torch.Tensor, prefix: int, grid: tuple[int, int]) -> dict[str, list]:
    A = attention.to(torch.float64).numpy()
    batch, heads, tokens, _ = A.shape
    patches = range(prefix, tokens)
    n = tokens - prefix
    out = {"cls": [], "aci": [], "entropy": [], "distance": []}
    for b in range(batch):
        cls = aci = entropy = distance = 0.0
        for h in range(heads):
            cls += sum(A[b, h, i, 0] for i in patches) / n
            rows = {i: A[b, h, i, prefix:] / A[b, h, i, prefix:].sum() for i in patches}
            pair_sum = 0.0
            for i in patches:
                for j in patches:
                    if i != j:
                        pair_sum += rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
            aci += pair_sum / (n * (n - 1))
            entropy += sum(-p * math.log(p) for q in range(tokens) for p in A[b, h, q] if p > 0) / tokens
            for i in patches:
                ri, ci = divmod(i - prefix, grid[1])
                for j in patches:
                    rj, cj = divmod(j - prefix, grid[1])
                    distance += rows[i][j - prefix] * math.hypot(ri - rj, ci - cj) / n
        for key, value in zip(out, (cls, aci, entropy, distance)):
            out[key].append(value / heads)
    return out


@pytest.mark.parametrize("prefix", [1, 3])
def test_metrics_match_explicit_loops(prefix):
    grid = (3, 4)
    attention = random_attention(2, 3, prefix + 12, seed=prefix)
    expected = brute_force_metrics(attention, prefix, grid)
    np.testing.assert_allclose(cls_centrality(attention, prefix), expected["cls"], rtol=1e-10)
    np.testing.assert_allclose(attention_consensus(attention, prefix), expected["aci"], rtol=1e-10)
    np.testing.assert_allclose(attention_entropy(attention), expected["entropy"], rtol=1e-10)
    np.testing.assert_allclose(mean_attention_distance(attention, prefix, grid), expected["distance"],
                               rtol=1e-10)


def test_self_attention_only_has_zero_distance_entropy_and_consensus():
    prefix, grid = 1, (2, 3)
    attention = torch.eye(prefix + 6).expand(2, 2, -1, -1)
    assert mean_attention_distance(attention, prefix, grid).tolist() == [0.0, 0.0]
    assert attention_entropy(attention).tolist() == [0.0, 0.0]
    assert attention_consensus(attention, prefix).tolist() == [0.0, 0.0]
    assert cls_centrality(attention, prefix).tolist() == [0.0, 0.0]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="leaves fewer than 2 patch tokens"):
        attention_consensus(random_attention(1, 1, 3), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="needs a CLS token"):
        cls_centrality(random_attention(1, 1, 4), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="grid"):
        mean_attention_distance(random_attention(1, 1, 10), 1, (2, 3))


# ---- the attention the metrics see: softmax(q kᵀ · scale) of each block, q/k norms applied ---------------

def recomputed_attention(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Post-softmax attention of every block, recomputed from its qkv on its norm1 input (fused forward)."""
    probabilities = []
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks:
            attn, h = block.attn, block.norm1(x)
            qkv = attn.qkv(h).reshape(*h.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            probabilities.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            x = block(x)
    return probabilities


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2, "qk_norm": True}])
def test_captured_attention_equals_attention_recomputed_from_qkv(kwargs):
    model, images = tiny_vit(**kwargs), probe_images(3)
    with torch.no_grad():  # random-init attention is nearly uniform; sharpen it so the check has teeth
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
            if isinstance(block.attn.q_norm, torch.nn.LayerNorm):  # qk_norm undoes the qkv scale
                block.attn.q_norm.weight.mul_(8.0)
    reference, fused = recomputed_attention(model, images), [block.attn.fused_attn for block in model.blocks]
    stages = list(iterate_stages(model, images, attention=True))
    captured = [stage.attention for stage in stages if stage.attention is not None]
    assert len(captured) == len(reference) == 4
    for got, expected in zip(captured, reference):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert max(a.max().item() for a in reference) > 0.3
    # the explicit path is timm's own: the stages equal the model's forward to float rounding, and each
    # module's fused_attn is as it was
    with torch.no_grad():
        torch.testing.assert_close(stages[-1].tokens, model.forward_features(images), rtol=1e-4, atol=1e-5)
    assert [block.attn.fused_attn for block in model.blocks] == fused


def test_attention_capture_refuses_a_module_without_timms_explicit_path():
    model = tiny_vit()
    del model.blocks[0].attn.attn_drop
    with pytest.raises(TypeError, match="is not a timm Attention"):
        list(iterate_stages(model, probe_images(1), attention=True))


# ---- invariants -------------------------------------------------------------------------------------

# (batch, heads, prefix tokens, grid rows, grid cols)
shapes = st.tuples(*(st.integers(1, 3) for _ in range(3)), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=40, deadline=None)
@given(shapes.filter(lambda s: s[3] * s[4] >= 2))
def test_uniform_attention(shape):
    batch, heads, prefix, rows, cols = shape
    tokens = prefix + rows * cols
    attention = torch.full((batch, heads, tokens, tokens), 1.0 / tokens)
    np.testing.assert_allclose(cls_centrality(attention, prefix) * tokens, 1.0, rtol=1e-6)
    np.testing.assert_allclose(attention_entropy(attention) / math.log(tokens), 1.0, rtol=1e-6)
    np.testing.assert_allclose(attention_consensus(attention, prefix), 1.0, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shapes.filter(lambda s: s[3] * s[4] >= 2), st.integers(0, 2**16))
def test_consensus_is_one_when_all_patch_rows_are_equal(shape, seed):
    batch, heads, prefix, rows, cols = shape
    tokens = prefix + rows * cols
    attention = random_attention(batch, heads, tokens, seed=seed)
    attention[:, :, prefix:] = attention[:, :, prefix:prefix + 1]  # every patch query copies one row
    np.testing.assert_allclose(attention_consensus(attention, prefix), 1.0, rtol=1e-12)


# ---- the streaming metric on real models -------------------------------------------------------------

def test_random_init_vit_attends_uniformly():
    model = tiny_vit()
    result = run_probe(model, [probe_images(8)], [AttentionMetrics()])["attention"]
    assert list(result) == ["block_1", "block_2", "block_3", "block_4"]
    for values in result.values():
        assert values["num_tokens"] == 65
        assert values["cls_centrality_ratio"] == pytest.approx(1.0, abs=0.03)
        assert values["entropy_normalized"] == pytest.approx(1.0, abs=1e-3)
        assert values["consensus"] == pytest.approx(1.0, abs=1e-3)


def test_chunked_update_equals_whole_batch_and_streams_like_one_shot():
    model, images = tiny_vit(), probe_images(5)
    whole = run_probe(model, [images], [AttentionMetrics()])
    chunked = run_probe(model, list(images.split(2)), [AttentionMetrics(chunk_elements=1)])
    for stage, values in whole["attention"].items():
        assert chunked["attention"][stage] == pytest.approx(values, rel=1e-10)


def test_model_without_cls_token_reports_no_centrality():
    model = tiny_vit(class_token=False, global_pool="avg")
    metric = AttentionMetrics()
    update_metrics(model, probe_images(2), [metric])
    values = metric.compute()["block_1"]
    assert values["cls_centrality"] is None and values["cls_centrality_ratio"] is None
    assert values["num_tokens"] == 64 and 0 < values["mean_distance"] < 10
