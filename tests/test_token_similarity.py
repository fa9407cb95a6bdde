"""Token similarity, PE dominance and the streaming protocol (incl. a real 2-process all-reduce)."""

from __future__ import annotations

import itertools
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from diagnostics.attention_metrics import AttentionMetrics
from diagnostics.capture import Stage, iterate_stages
from diagnostics.streaming import ProbeBatch, StreamingMetric, run_probe, update_metrics
from diagnostics.token_similarity import (
    PositionEmbeddingDominance,
    TokenSimilarity,
    similarity_tokens,
    token_similarity_centered,
    token_similarity_raw,
)
from tests import conftest

tiny_vit = partial(conftest.tiny_vit, embed_dim=32, depth=3)


def probe_images(count: int, size: int = 16) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---- brute force: explicit loops over ordered pairs i != j -------------------------------------------

def brute_force_similarity(tokens: np.ndarray, centered: bool) -> float:
    """Mean cosine over i != j; a token without direction (see module doc) has cosine 0 with all."""
    tokens = tokens.astype(np.float64)
    scale = max(np.linalg.norm(token) for token in tokens)
    if centered:
        tokens = tokens - tokens.mean(axis=0)
    n, total = len(tokens), 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            norm_i, norm_j = np.linalg.norm(tokens[i]), np.linalg.norm(tokens[j])
            if norm_i <= 1e-10 * scale or norm_j <= 1e-10 * scale:
                continue
            total += float(tokens[i] @ tokens[j]) / (norm_i * norm_j)
    return total / (n * (n - 1))


@pytest.mark.parametrize("centered", [False, True])
def test_similarity_matches_pairwise_loops(centered):
    tokens = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0)) + 0.5
    tokens[1, 2] = 0.0  # a zero-norm token
    tokens[2, 4] = tokens[2].mean(dim=0) * 1.0  # close to the mean: tiny but non-zero after centering
    metric = token_similarity_centered if centered else token_similarity_raw
    got = metric(tokens)
    expected = [brute_force_similarity(image.numpy(), centered) for image in tokens]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_identical_tokens_are_fully_similar_and_have_no_centered_structure():
    tokens = torch.randn(1, 1, 6).expand(2, 9, 6).clone()
    assert token_similarity_raw(tokens).tolist() == pytest.approx([1.0, 1.0])
    assert token_similarity_centered(tokens).tolist() == [0.0, 0.0]
    assert token_similarity_raw(torch.zeros(1, 4, 3)).tolist() == [0.0]


def test_fewer_than_two_tokens_is_an_error():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_similarity_raw(torch.randn(2, 1, 4))


# ---- invariants ------------------------------------------------------------------------------------

token_sets = st.integers(2, 9).flatmap(lambda n: st.integers(1, 6).flatmap(lambda d: arrays(
    np.float32, (n, d), elements=st.one_of(st.sampled_from([0.0, 1.0, -1.0]),
                                           st.floats(-1e3, 1e3, width=32)))))


@settings(max_examples=150, deadline=None)
@given(token_sets)
def test_centered_similarity_lower_bound(tokens):
    n = tokens.shape[0]
    value = token_similarity_centered(torch.from_numpy(tokens)[None]).item()
    assert value >= -1.0 / (n - 1) - 1e-12
    assert value <= 1.0 + 1e-12


@settings(max_examples=60, deadline=None)
@given(token_sets, st.randoms(use_true_random=False),
       st.floats(1e-3, 1e3), st.sampled_from([token_similarity_raw, token_similarity_centered]))
def test_similarity_ignores_patch_order_and_scale(tokens, rng, scale, metric):
    tokens = torch.from_numpy(tokens)[None].to(torch.float64)
    order = list(range(tokens.shape[1]))
    rng.shuffle(order)
    reference = metric(tokens).item()
    assert metric(tokens[:, order]).item() == pytest.approx(reference, abs=1e-9)
    assert metric(tokens * scale).item() == pytest.approx(reference, abs=1e-9)


# ---- stage tokens, CLS handling --------------------------------------------------------------------

def test_include_cls_adds_only_the_class_token():
    model = tiny_vit(reg_tokens=2)
    images = probe_images(2)
    batch = ProbeBatch.from_model(model, images)
    stages = {stage.name: stage for stage in iterate_stages(model, images)}
    patches = similarity_tokens(stages["block_1"], batch)
    with_cls = similarity_tokens(stages["block_1"], batch, include_cls=True)
    assert patches.shape[1] == 16 and with_cls.shape[1] == 17
    torch.testing.assert_close(with_cls[:, 0], stages["block_1"].tokens[:, 0])
    torch.testing.assert_close(with_cls[:, 1:], stages["block_1"].tokens[:, 3:])
    assert similarity_tokens(stages["embed"], batch, include_cls=True).shape[1] == 16
    metric = TokenSimilarity(include_cls=True)
    update_metrics(model, images, [metric])
    assert metric.compute()["block_1"]["num_tokens"] == 17


def test_include_cls_without_class_token_is_an_error():
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no CLS token"):
        update_metrics(model, probe_images(2), [TokenSimilarity(include_cls=True)])


# ---- PE dominance ----------------------------------------------------------------------------------

def test_pe_dominance_matches_pos_embed_rows_over_patch_embed_norms():
    model = tiny_vit()
    with torch.no_grad():
        model.pos_embed.normal_()  # make the ratio far from 0
    images = probe_images(5)
    metric = PositionEmbeddingDominance()
    for part in images.split(2):
        update_metrics(model, part, [metric])
    got = metric.compute()["pe"]
    with torch.no_grad():
        pos_norm = model.pos_embed[0, 1:].norm(dim=-1).mean().item()
        embed_norm = model.patch_embed(images).norm(dim=-1).mean().item()
    assert got["pos_embed_norm"] == pytest.approx(pos_norm, rel=1e-5)
    assert got["patch_embed_norm"] == pytest.approx(embed_norm, rel=1e-6)
    assert got["pe_dominance"] == pytest.approx(pos_norm / embed_norm, rel=1e-5)


# ---- streaming protocol ----------------------------------------------------------------------------

def all_metrics() -> list[StreamingMetric]:
    return [TokenSimilarity(), PositionEmbeddingDominance(), AttentionMetrics()]


def test_streaming_over_batches_equals_one_shot():
    model, images = tiny_vit(), probe_images(7)
    one_shot = run_probe(model, [images], all_metrics())
    streamed = run_probe(model, list(images.split(3)), all_metrics())
    assert list(streamed["token_similarity"]) == ["embed", "pe", "block_1", "block_2", "block_3", "norm"]
    assert_results_close(streamed, one_shot)


def test_accumulating_after_all_reduce_is_refused():
    metric = TokenSimilarity()
    update_metrics(tiny_vit(), probe_images(2), [metric])
    metric.all_reduce()
    metric.all_reduce()  # idempotent: nothing fresh to reduce
    with pytest.raises(RuntimeError, match="already all-reduced"):
        update_metrics(tiny_vit(), probe_images(2), [metric])


def assert_results_close(got, expected, rtol: float = 1e-9):
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].keys() == expected[name].keys(), name
        for stage, values in expected[name].items():
            for key, value in values.items():
                if value is None or isinstance(value, int):
                    assert got[name][stage][key] == value
                else:
                    assert math.isclose(got[name][stage][key], value, rel_tol=rtol, abs_tol=1e-12), \
                        (name, stage, key)


# ---- a real 2-process run (gloo), incl. a rank with an empty shard ---------------------------------

def _distributed_worker(rank: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model, images = tiny_vit(), probe_images(7)
        halves = {0: images[:4], 1: images[4:]}
        results = {"split": run_probe(model, list(halves[rank].split(3)), all_metrics()),
                   "empty_rank_1": run_probe(model, [images] if rank == 0 else [], all_metrics())}
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def test_two_process_all_reduce_equals_single_process(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    single = run_probe(tiny_vit(), [probe_images(7)], all_metrics())
    for rank, scenario in itertools.product((0, 1), ("split", "empty_rank_1")):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert_results_close(results[scenario], single)


def test_stage_without_attention_is_ignored_by_attention_metrics():
    metric = AttentionMetrics()
    batch = ProbeBatch.from_model(tiny_vit(), probe_images(1))
    metric.update(Stage("block_1", torch.randn(1, 17, 32)), batch)
    assert metric.compute() == {}


class RecordingMetric(StreamingMetric):
    """Counts what the protocol hands a metric over two passes."""

    name = "recording"
    num_passes = 2

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[int] = []
        self.indices: list[int] = []

    def start_pass(self, index: int) -> None:
        self.passes.append(index)

    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if stage.name == "embed":
            self.accumulate(f"embed/labels_pass{self.passes[-1]}", batch.labels.sum())
            self.indices += batch.indices.tolist()

    def compute(self):
        return {key: value.item() for key, value in self.sums().items()}


def test_run_probe_passes_labels_indices_and_runs_every_pass():
    model, images = tiny_vit(), probe_images(5)
    labels, indices = torch.arange(5) * 10, torch.arange(5)
    batches = [(images[:3], labels[:3], indices[:3]), (images[3:], labels[3:], indices[3:])]
    metric = RecordingMetric()
    results = run_probe(model, batches, [metric, TokenSimilarity()])
    assert metric.passes == [0, 1]
    assert metric.indices == [0, 1, 2, 3, 4] * 2
    assert results["recording"] == {"embed/labels_pass0": 100.0, "embed/labels_pass1": 100.0}
    assert results["token_similarity"]["embed"]["num_tokens"] == 16  # one-pass metrics run once
    with pytest.raises(ValueError, match="a probe batch is images"):
        run_probe(model, [(images, labels, indices, indices)], [TokenSimilarity()])


def test_a_model_that_is_not_a_vit_is_rejected():
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        update_metrics(torch.nn.Linear(3, 3), probe_images(1), [TokenSimilarity()])


def test_pe_scale_scales_the_patch_rows_only_unless_asked_for_all():
    from diagnostics.capture import scaled_position_embedding

    model = tiny_vit()
    original = model.pos_embed.detach().clone()
    with scaled_position_embedding(model, 0.5):
        torch.testing.assert_close(model.pos_embed[:, :1], original[:, :1])  # CLS row as trained
        torch.testing.assert_close(model.pos_embed[:, 1:], 0.5 * original[:, 1:])
    with scaled_position_embedding(model, 0.0, rows="all"):
        assert model.pos_embed.abs().max() == 0
    torch.testing.assert_close(model.pos_embed, original)  # restored
