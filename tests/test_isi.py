"""Information Scrambling Index: ridge from sums, streaming PCA, the split, and the ISI metric end to end."""

from __future__ import annotations

import json
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from diagnostics.capture import EMBED, Stage, capture
from diagnostics.image_split import FIT, TEST, VALIDATION, content_keys, image_keys, split_groups
from diagnostics.isi import (
    ScramblingIndex,
    isi_reduce_bytes,
    isi_sketch_bytes,
    isi_stage_bytes,
    plan_stage_groups,
)
from diagnostics.neural_collapse import NeuralCollapse
from diagnostics.plasticity import Plasticity
from diagnostics.ridge import (
    IllPosedRegressionWarning,
    RegressionSums,
    centered,
    heldout_sse,
    heldout_sse_at,
    kernel_heldout_sse,
    ridge_penalty_scale,
    ridge_weights,
    total_sum_of_squares,
    two_block_heldout_sse_at,
    two_block_ridge_weights,
    two_block_sse_change,
)
from diagnostics.streaming import ProbeBatch, run_probe
from diagnostics.streaming_pca import (
    centered_range_sketch,
    gaussian_test_matrix,
    orthonormal_basis,
    rayleigh_ritz,
)
from tests import conftest

GRID = (1e-3, 1e-1, 10.0)  # well separated, so the chosen multiplier is not decided by rounding


pytestmark = pytest.mark.usefixtures("single_thread")


tiny_vit = partial(conftest.tiny_vit, embed_dim=8, num_classes=5)


def smooth_images(count: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Low-frequency images (upsampled 2×2 fields + noise): patches of one image share content."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 2, 2, generator=generator)
    fields = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fields + 0.3 * torch.randn(count, 3, size, size, generator=generator)


# ---- ridge from sufficient statistics vs scikit-learn ------------------------------------------------

def sklearn_pooled_r2(x, y, x_test, y_test, multiplier):
    """Per-position sklearn Ridge (fit_intercept), α = c·tr(Cxx)/p; R² pooled over positions and outputs."""
    predictions = []
    for i in range(x.shape[1]):
        centered_x = x[:, i] - x[:, i].mean(0)
        alpha = multiplier * (centered_x ** 2).sum() / x.shape[2]
        predictions.append(Ridge(alpha=alpha, fit_intercept=True).fit(x[:, i], y[:, i]).predict(x_test[:, i]))
    prediction = np.stack(predictions, 1)
    n = len(y_test)
    return r2_score(y_test.reshape(n, -1), prediction.reshape(n, -1), multioutput="variance_weighted")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), features=st.integers(1, 12), outputs=st.integers(1, 5),
       samples=st.integers(3, 40), offset=st.floats(-50, 50))
def test_heldout_r2_from_sums_matches_sklearn_ridge(seed, features, outputs, samples, offset):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 2, features)) + offset
    y = x @ rng.normal(size=(features, outputs)) + rng.normal(size=(samples, 2, outputs)) - offset
    x_test = rng.normal(size=(9, 2, features)) + offset
    y_test = x_test @ rng.normal(size=(features, outputs)) + rng.normal(size=(9, 2, outputs))
    train = RegressionSums.from_samples(torch.tensor(x), torch.tensor(y))
    test = RegressionSums.from_samples(torch.tensor(x_test), torch.tensor(y_test))
    multipliers = [1e-4, 0.3, 20.0]
    ours = 1 - heldout_sse(train, test, multipliers).sum(0) / total_sum_of_squares(test).sum()
    for j, multiplier in enumerate(multipliers):
        assert math.isclose(float(ours[j]), sklearn_pooled_r2(x, y, x_test, y_test, multiplier),
                            rel_tol=1e-7, abs_tol=1e-7)
        one = 1 - heldout_sse_at(train, test, multiplier).sum() / total_sum_of_squares(test).sum()  # the direct solve
        assert math.isclose(float(one), float(ours[j]), rel_tol=1e-9, abs_tol=1e-9)
    weights, intercept = ridge_weights(train, 0.3)
    alpha = 0.3 * float(ridge_penalty_scale(centered(train))[0])
    reference = Ridge(alpha=alpha).fit(x[:, 0], y[:, 0])
    np.testing.assert_allclose(weights[0].numpy(), reference.coef_.reshape(outputs, features).T,
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(intercept[0].numpy(), np.reshape(reference.intercept_, outputs),
                               rtol=1e-6, atol=1e-7)


def sklearn_two_block_predict(x, y, x_test, split, multiplier_self, multiplier_residual):
    """sklearn Ridge with a penalty per block: α₁ = c₁·tr(C₁₁)/p₁ on x[:split], α₂ = c₂·tr(S)/p₂ on the rest
    (S = C₂₂ − C₂₁(C₁₁ + α₁I)⁻¹C₁₂), as Ridge(alpha=1) on the features scaled by 1/√α; c₂ = ∞: first block only."""
    centered_x = x - x.mean(0)
    first, second = centered_x[:, :split], centered_x[:, split:]
    alpha_self = multiplier_self * (first ** 2).sum() / split
    if multiplier_residual == math.inf:
        return Ridge(alpha=alpha_self).fit(x[:, :split], y).predict(x_test[:, :split])
    cross = first.T @ second
    schur = second.T @ second - cross.T @ np.linalg.solve(first.T @ first + alpha_self * np.eye(split), cross)
    alpha_residual = multiplier_residual * np.trace(schur) / (x.shape[1] - split)
    scale = np.r_[np.full(split, alpha_self ** -0.5), np.full(x.shape[1] - split, alpha_residual ** -0.5)]
    return Ridge(alpha=1.0).fit(x * scale, y).predict(x_test * scale)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), split=st.integers(1, 6), rest=st.integers(1, 8), outputs=st.integers(1, 4),
       samples=st.integers(4, 30), offset=st.floats(-20, 20))
def test_two_block_ridge_from_sums_matches_sklearn_ridge(seed, split, rest, outputs, samples, offset):
    rng = np.random.default_rng(seed)
    features = split + rest
    x = rng.normal(size=(samples, 2, features)) + offset
    y = x[..., :1] * rng.normal(size=outputs) + x @ rng.normal(size=(features, outputs)) + rng.normal(
        size=(samples, 2, outputs))
    x_test = rng.normal(size=(7, 2, features)) + offset
    y_test = x_test @ rng.normal(size=(features, outputs)) + rng.normal(size=(7, 2, outputs))
    train = RegressionSums.from_samples(torch.tensor(x), torch.tensor(y))
    test = RegressionSums.from_samples(torch.tensor(x_test), torch.tensor(y_test))
    first = [RegressionSums(s.count, s.sum_x[..., :split], s.sum_y, s.xx[..., :split, :split], s.xy[..., :split, :],
                            s.yy) for s in (train, test)]
    multiplier_self, multipliers = 0.05, [math.inf, 1e-3, 0.5, 30.0]
    sse = heldout_sse(*first, [multiplier_self])[..., 0:1] + two_block_sse_change(
        train, test, split, multiplier_self, multipliers)
    for j, multiplier in enumerate(multipliers):
        weights, intercept = two_block_ridge_weights(train, split, multiplier_self, multiplier)
        for i in range(2):
            prediction = sklearn_two_block_predict(x[:, i], y[:, i], x_test[:, i], split, multiplier_self, multiplier)
            reference = ((y_test[:, i] - prediction.reshape(7, outputs)) ** 2).sum()
            assert math.isclose(float(sse[i, j]), reference, rel_tol=1e-7, abs_tol=1e-8)
            alone, both = two_block_heldout_sse_at(train, test, split, multiplier_self, multiplier)[i]  # direct solves
            assert math.isclose(float(both), reference, rel_tol=1e-7, abs_tol=1e-8)
            assert math.isclose(float(alone), float(sse[i, 0]), rel_tol=1e-9, abs_tol=1e-9)  # multipliers[0] = ∞
            ours = x_test[:, i] @ weights[i].numpy() + intercept[i].numpy()
            np.testing.assert_allclose(ours, prediction.reshape(7, outputs), rtol=1e-6, atol=1e-8)
    assert (two_block_sse_change(train, test, split, multiplier_self, [math.inf]) == 0).all()  # exactly


def test_kernel_ridge_matches_sklearn_primal_ridge():
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(15, 40)) + 3, rng.normal(size=(6, 40)) + 3  # more inputs than samples
    y, y_test = x @ rng.normal(size=(40, 7)), x_test @ rng.normal(size=(40, 7))
    multipliers = [1e-3, 1.0]
    ours = kernel_heldout_sse(*(torch.tensor(a) for a in (x, y, x_test, y_test)), multipliers)
    scale = ((x - x.mean(0)) ** 2).sum() / x.shape[1]
    for j, multiplier in enumerate(multipliers):
        prediction = Ridge(alpha=multiplier * scale).fit(x, y).predict(x_test)
        assert math.isclose(float(ours[j]), ((y_test - prediction) ** 2).sum(), rel_tol=1e-8)


# ---- streaming randomized PCA vs exact PCA ------------------------------------------------------------

def streamed_pca(x: np.ndarray, rank: int, width: int, power_iterations: int, batch: int = 37):
    """Drive the streaming_pca pieces over batches as ISI does: sketch, power passes, Rayleigh–Ritz."""
    data = torch.tensor(x)
    omega = gaussian_test_matrix(x.shape[1], width, seed=3)
    sketch = sum(b.T @ (b @ omega) for b in data.split(batch))
    mean = data.mean(0)
    basis = orthonormal_basis(centered_range_sketch(sketch, data.sum(0), len(data), omega))
    for _ in range(power_iterations):
        basis = orthonormal_basis(sum((b - mean).T @ ((b - mean) @ basis) for b in data.split(batch)))
    z = (data - mean) @ basis
    variances, rotation = rayleigh_ritz(z.T @ z, rank)
    return variances.numpy(), (basis @ rotation).numpy()


def test_streaming_pca_is_exact_when_the_sketch_spans_the_data():
    x = np.random.default_rng(0).normal(size=(120, 30))
    variances, directions = streamed_pca(x, rank=5, width=30, power_iterations=0)
    _, singular, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(variances, singular[:5] ** 2, rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(directions * vt[:5].T, axis=0)), 1.0, atol=1e-10)


def test_streaming_pca_approximates_exact_pca_with_a_narrow_sketch():
    rng = np.random.default_rng(1)
    spectrum = 1.0 / np.arange(1, 201) ** 1.0  # slowly decaying: where power passes matter
    x = (rng.normal(size=(250, 200)) * spectrum) @ np.linalg.qr(rng.normal(size=(200, 200)))[0] + 5.0
    _, singular, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    errors = []
    for power_iterations in (0, 2):
        variances, directions = streamed_pca(x, rank=8, width=24, power_iterations=power_iterations)
        cosines = np.linalg.svd(vt[:8] @ directions, compute_uv=False)  # cosines of the principal angles
        errors.append((1 - cosines.min(), np.abs(variances / singular[:8] ** 2 - 1).max()))
    assert errors[1][0] < errors[0][0] and errors[1][0] < 0.02 and errors[1][1] < 0.02


# ---- the split ------------------------------------------------------------------------------------------

def test_split_depends_only_on_keys_and_seed():
    keys = np.arange(20000, dtype=np.uint64) * np.uint64(7919)
    groups = split_groups(keys, seed=3, holdout_fraction=0.2, validation_fraction=0.25)
    fractions = np.bincount(groups, minlength=3) / len(keys)
    np.testing.assert_allclose(fractions, [0.8 * 0.75, 0.8 * 0.25, 0.2], atol=0.01)
    order = np.random.default_rng(0).permutation(len(keys))
    assert (split_groups(keys[order], 3, 0.2, 0.25) == groups[order]).all()
    assert (split_groups(keys, 4, 0.2, 0.25) != groups).mean() > 0.3


def test_image_keys_are_content_or_ids():
    images = torch.randn(5, 3, 8, 8)
    assert (content_keys(images[2:4]) == content_keys(images)[2:4]).all()  # independent of batching
    assert len(set(content_keys(images).tolist())) == 5
    copy = images.clone()
    copy[0, 0, 0, 0] += 1e-6
    assert content_keys(copy)[0] != content_keys(images)[0]

    class WithIds(ProbeBatch):
        image_ids = torch.tensor([3, 9])

    batch = WithIds.from_model(tiny_vit(), images[:2])
    assert image_keys(batch).tolist() == [3, 9]


# ---- ISI end to end -------------------------------------------------------------------------------------

def brute_force_isi_stage(model, images, stage, pca_rank, seed=0):
    """sklearn Ridge per position on the captured tokens; exact PCA (numpy SVD) for the nested inputs.

    {"self": (R², c), "joint": (R², c), "residual": (R², c_g)}: the joint fit has one multiplier for
    [h_i ; g]; the residual fit keeps the self-only c and picks c_g from ∞ + GRID (∞ first on ties).
    """
    captured = capture(model, images)
    prefix = captured.num_prefix_tokens
    e = captured.stages[EMBED].double().numpy()
    h = captured.stages[stage].double().numpy()
    h = h if stage == EMBED else h[:, prefix:]
    groups = split_groups(content_keys(images), seed, 0.2, 0.2)
    fit, val, test = (groups == FIT), (groups == VALIDATION), (groups == TEST)
    train = fit | val
    flat = h.reshape(len(h), -1)
    _, _, vt = np.linalg.svd(flat[train] - flat[train].mean(0), full_matrices=False)
    pcs = (flat - flat[train].mean(0)) @ vt[:pca_rank].T
    nested = np.concatenate([h, np.repeat(pcs[:, None, :], h.shape[1], axis=1)], axis=2)
    scores = {}
    for kind, x in (("self", h), ("joint", nested)):
        best = max(GRID, key=lambda c: sklearn_pooled_r2(x[fit], e[fit], x[val], e[val], c))
        scores[kind] = (sklearn_pooled_r2(x[train], e[train], x[test], e[test], best), best)

    def two_block_r2(rows, scored, residual):
        predictions = np.stack([sklearn_two_block_predict(nested[rows, i], e[rows, i], nested[scored, i], h.shape[2],
                                                          scores["self"][1], residual)
                                for i in range(h.shape[1])], 1)
        n = scored.sum()
        return r2_score(e[scored].reshape(n, -1), predictions.reshape(n, -1), multioutput="variance_weighted")

    validation = [two_block_r2(fit, val, c) for c in (math.inf, *GRID)]
    best = (math.inf, *GRID)[int(np.argmax(validation))]
    scores["residual"] = (two_block_r2(train, test, best), best)
    return scores


@pytest.mark.parametrize("nested_fit", ["residual", "joint"])
def test_isi_matches_brute_force_sklearn_and_exact_pca(nested_fit):
    model, images = tiny_vit(), smooth_images(300)
    metric = ScramblingIndex(model, pca_rank=6, pca_oversample=1000, ridge_grid=GRID,
                             stages=["pe", "block_2"], nested_fit=nested_fit)
    results = run_probe(model, list(images.split(64)), [metric])["isi"]
    for stage in ("pe", "block_2"):
        reference = brute_force_isi_stage(model, images, stage, pca_rank=6)
        got = results[stage]
        assert math.isclose(got["r2_self"], reference["self"][0], abs_tol=1e-8)
        assert math.isclose(got["r2_all"], reference[nested_fit][0], abs_tol=1e-8)
        assert got["ridge_multiplier_self"] == reference["self"][1]
        if nested_fit == "joint":
            assert got["ridge_multiplier_all"] == reference["joint"][1] and got["ridge_multiplier_residual"] is None
        else:
            assert got["ridge_multiplier_all"] == reference["self"][1]
            assert got["ridge_multiplier_residual"] == reference["residual"][1]
        assert got["isi"] == pytest.approx(reference[nested_fit][0] - reference["self"][0], abs=1e-8)
        assert got["num_train_images"] + got["num_test_images"] == 300
        assert got["nested_fit"] == nested_fit
    if nested_fit == "residual":  # block_2 keeps a finite c_g; both paths of the choice are exercised
        assert results["block_2"]["ridge_multiplier_residual"] < math.inf


def test_random_init_vit_reference_nested_isi_is_zero_and_embed_is_exact():
    """science.md §2 reference: random init (tokens barely mixed) keeps nested ISI within ±0.002; N = 64.

    Random images: with spatially correlated ones the final LayerNorm, which drops each token's
    scale, gives ISI(norm) ≈ 0.03, because neighbours linearly restore it (see the README).
    """
    model = tiny_vit(img_size=32, embed_dim=16, depth=4)
    metric = ScramblingIndex(model, pca_rank=16, pca_oversample=8)
    images = torch.randn(800, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = run_probe(model, list(images.split(100)), [metric])["isi"]
    assert list(results) == ["embed", "pe", "block_1", "block_2", "block_3", "block_4", "norm"]
    assert results["embed"]["r2_self"] > 1 - 1e-6 and abs(results["embed"]["isi"]) < 1e-6
    for stage, values in results.items():
        assert abs(values["isi"]) <= 0.002, (stage, values)


def shuffled_stage_isi(shuffle: bool) -> dict:
    """ISI of a synthetic stage whose tokens are the `embed` tokens, permuted per image when `shuffle`."""
    model, images = tiny_vit(), smooth_images(400)
    metric = ScramblingIndex(model, pca_rank=8, pca_oversample=8, ridge_grid=GRID, stages=["block_1"])
    generator = torch.Generator().manual_seed(5)
    orders = torch.stack([torch.randperm(16, generator=generator) for _ in images])  # fixed for every pass
    for pass_index in range(metric.num_passes):
        metric.start_pass(pass_index)
        for batch_images, order in zip(images.split(100), orders.split(100)):
            batch = ProbeBatch.from_model(model, batch_images)
            embed = capture(model, batch_images).stages[EMBED]
            tokens = embed.gather(1, order.unsqueeze(-1).expand_as(embed)) if shuffle else embed
            metric.update(Stage(EMBED, embed), batch)
            metric.update(Stage("block_1", torch.cat([torch.zeros_like(tokens[:, :1]), tokens], 1)), batch)
        metric.all_reduce()
    return metric.compute()["block_1"]


def test_shuffling_tokens_lowers_r2_self_and_raises_isi():
    intact, shuffled = shuffled_stage_isi(False), shuffled_stage_isi(True)
    assert intact["r2_self"] > 0.999 and abs(intact["isi"]) < 1e-3
    assert shuffled["r2_self"] < intact["r2_self"] - 0.2
    assert shuffled["isi"] > intact["isi"] + 0.05


def test_streaming_batches_and_stage_groups_equal_one_shot():
    model, images = tiny_vit(), smooth_images(200)
    options = dict(pca_rank=4, pca_oversample=4, pca_power_iterations=1, ridge_grid=GRID)
    one_shot = run_probe(model, [images], [ScramblingIndex(model, **options)])["isi"]
    per_stage = isi_stage_bytes(16, 8, pca_rank=4, pca_oversample=4) + 2 * isi_sketch_bytes(
        16, 8, pca_rank=4, pca_oversample=4)
    omega = 8 * 128 * 8
    grouped_metric = ScramblingIndex(model, memory_budget_bytes=2 * per_stage + omega, **options)
    assert grouped_metric.copied_stages == {"pe": "embed"}  # 4 stages fitted of 5
    assert [len(group) for group in grouped_metric.stage_groups] == [2, 2]
    assert grouped_metric.num_passes == 2 + 3 - 1  # pipelined: group g+1 sketches while g regresses
    streamed = run_probe(model, list(images.split(23)), [grouped_metric])["isi"]
    assert_results_close(streamed, one_shot, rel=1e-9)
    rerun = run_probe(model, list(images.split(50)), [grouped_metric])["isi"]  # reused at the next checkpoint
    assert_results_close(rerun, one_shot, rel=1e-9)


@pytest.mark.filterwarnings("ignore::diagnostics.ridge.IllPosedRegressionWarning")  # literal: 114 images, N·D = 128
@pytest.mark.parametrize("variant", ["nested", "literal"])
def test_pe_stage_is_copied_from_embed_and_equals_its_own_fit(variant):
    """pe = embed + a fixed vector per position, which every (centred) regression and the PCA remove."""
    model, images = tiny_vit(), smooth_images(150)
    options = dict(variant=variant, pca_rank=4, pca_oversample=4, ridge_grid=GRID)
    both = ScramblingIndex(model, **options)
    assert both.copied_stages == {"pe": "embed"} and "pe" not in both._group_of
    results = run_probe(model, [images], [both])["isi"]
    assert list(results) == ["embed", "pe", "block_1", "block_2", "norm"]
    assert results["pe"] == results["embed"]
    alone = ScramblingIndex(model, stages=["pe"], **options)  # without embed, pe is fitted
    assert alone.copied_stages == {}
    fitted = run_probe(model, [images], [alone])["isi"]
    assert_results_close(fitted, {"pe": results["pe"]}, rel=1e-7)
    assert fitted["pe"]["r2_self"] > 0.99  # and the comparison has teeth: pe's own tokens are what was fitted


def test_a_model_with_its_own_position_embedding_fits_pe():
    model = tiny_vit()
    timm_pos_embed = model._pos_embed
    model._pos_embed = lambda x: timm_pos_embed(x * (1.0 + x.square()))  # pe is no longer embed + fixed vectors
    metric = ScramblingIndex(model, pca_rank=4, pca_oversample=4, ridge_grid=GRID)
    assert metric.copied_stages == {} and "pe" in metric._group_of
    results = run_probe(model, [smooth_images(150)], [metric])["isi"]
    assert results["pe"]["r2_self"] != results["embed"]["r2_self"]


def test_later_passes_replay_the_first_pass_tokens_within_the_budget():
    model, images = tiny_vit(), smooth_images(120)
    options = dict(pca_rank=4, pca_oversample=4, pca_power_iterations=1, ridge_grid=GRID)
    forwards = []
    model.patch_embed.register_forward_hook(lambda module, args, out: forwards.append(len(out)))
    results = {}
    for label, budget in (("replayed", 1 << 30), ("recomputed", 0), ("over budget", 1)):
        forwards.clear()
        metric = ScramblingIndex(model, **options)
        results[label] = run_probe(model, list(images.split(40)), [metric], replay_bytes=budget)["isi"]
        assert len(forwards) == 3 * (1 if label == "replayed" else metric.num_passes), label
    assert metric.num_passes == 3
    assert results["replayed"] == results["recomputed"] == results["over budget"]


def assert_results_close(got: dict, expected: dict, rel: float) -> None:
    assert got.keys() == expected.keys()
    for stage, values in expected.items():
        assert got[stage].keys() == values.keys()
        for key, value in values.items():
            if isinstance(value, float):
                assert got[stage][key] == pytest.approx(value, rel=rel, abs=1e-12), (stage, key)
            else:
                assert got[stage][key] == value, (stage, key)


def test_memory_formula_counts_the_sums_actually_held():
    model, images = tiny_vit(), smooth_images(120)
    metric = ScramblingIndex(model, pca_rank=4, pca_oversample=3, stages=["pe", "block_1"])
    for pass_index in range(metric.num_passes):
        run_probe_pass(model, images, metric, pass_index)
    held = sum(t.nbytes for t in metric.sums().values())
    held += sum(t.nbytes for t in metric._bases.values()) + sum(t.nbytes for t in metric._means.values())
    assert held == 2 * isi_stage_bytes(16, 8, pca_rank=4, pca_oversample=3)
    vit_b = isi_stage_bytes(196, 768, pca_rank=256, pca_oversample=16)
    assert round(vit_b / 1e9, 2) == 7.86
    vit_b_planned = vit_b + 2 * isi_sketch_bytes(196, 768)
    assert round(vit_b_planned / 1e9, 2) == 9.17
    assert [len(g) for g in plan_stage_groups([f"s{i}" for i in range(14)], vit_b_planned, 32 * 10**9)] == [
        3, 3, 3, 3, 2]


@pytest.mark.parametrize("processes", [1, 8])
def test_vit_b_plan_is_the_same_on_one_process_and_on_eight(monkeypatch, processes):
    """The all-reduce adds one 1 GiB bucket, not a second copy of every sum: 14 stages fitted (pe copied from embed),
    5 groups, 7 passes."""
    import timm

    import diagnostics.isi
    monkeypatch.setattr(diagnostics.isi, "world_size", lambda: processes)
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224")
    metric = ScramblingIndex(vit_b, pca_rank=256, pca_oversample=16, pca_power_iterations=1,
                             memory_budget_bytes=32 * 2**30)
    assert metric.copied_stages == {"pe": "embed"}
    assert [len(group) for group in metric.stage_groups] == [3, 3, 3, 3, 2]
    assert metric.num_passes == 7
    assert isi_reduce_bytes(196, 768, processes) == (0 if processes == 1 else 2**30)


def run_probe_pass(model, images, metric, pass_index):
    from diagnostics.streaming import update_metrics
    metric.start_pass(pass_index)
    for batch_images in images.split(50):
        update_metrics(model, batch_images, [metric])
    metric.all_reduce()


def test_literal_variant_is_ill_posed_at_small_n_and_warns():
    """science.md: N = 64, D = 192, ~51 training images -> literal ISI ≈ −0.98 at `embed` (true value 0)."""
    model = tiny_vit(img_size=32, embed_dim=192, depth=1, num_heads=3)
    metric = ScramblingIndex(model, variant="literal", stages=["embed"])
    with pytest.warns(IllPosedRegressionWarning) as caught:
        images = torch.randn(70, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        results = run_probe(model, list(images.split(35)), [metric])["isi"]
    assert any("literal ISI at stage 'embed': " in str(w.message) for w in caught)
    assert 45 <= results["embed"]["num_train_images"] <= 60
    assert results["embed"]["r2_self"] > 0.95 and results["embed"]["isi"] < -0.5


def test_incomplete_passes_and_bad_arguments_raise():
    model = tiny_vit()
    metric = ScramblingIndex(model, pca_rank=4)
    from diagnostics.streaming import update_metrics
    update_metrics(model, smooth_images(8), [metric])
    with pytest.raises(RuntimeError, match="needs 3 passes"):
        metric.compute()
    with pytest.raises(ValueError, match="not stages of this model"):
        ScramblingIndex(model, stages=["block_9"])
    with pytest.raises(ValueError, match=r"budget 9.31e-07 GiB less the [0-9.e-]+ GiB held once is below one stage"):
        ScramblingIndex(model, memory_budget_bytes=1000)  # the budget as given, and what Ω takes of it
    tiny = ScramblingIndex(model, variant="literal", stages=["embed"])
    with warnings.catch_warnings(), pytest.raises(ValueError, match="no probe image fell in the"):
        warnings.simplefilter("ignore")
        run_probe(model, [smooth_images(2)], [tiny])


# ---- two real processes (gloo): every part-B streaming metric in one spawn (spawning costs ~10 s) ----------

def part_b_metrics(model):
    literal = ScramblingIndex(model, variant="literal", ridge_grid=GRID, stages=["block_1"])
    literal.name = "isi_literal"  # two ISI instances in one probe run need distinct result keys
    return [ScramblingIndex(model, pca_rank=4, ridge_grid=GRID, stages=["pe", "norm"]), literal,
            NeuralCollapse(model)]


def probe_set():
    images = smooth_images(150)
    return images, torch.arange(150) // 40  # classes 0-3; the first 70 images hold only classes 0 and 1


def plasticity_pairs():
    pool = smooth_images(12, seed=3)
    return pool[:6], pool[6:]


def _distributed_worker(rank: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        warnings.simplefilter("ignore", IllPosedRegressionWarning)
        model, (images, labels) = tiny_vit(), probe_set()
        shard = slice(0, 70) if rank == 0 else slice(70, None)  # rank 0 never sees classes 2 and 3
        batches = list(zip(images[shard].split(32), labels[shard].split(32)))
        results = run_probe(model, batches, part_b_metrics(model))
        pairs = Plasticity()
        first, second = plasticity_pairs()
        pairs.update_pairs(model, first[rank::2], second[rank::2])
        pairs.all_reduce()
        results["plasticity"] = pairs.compute()
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(results, handle)
    finally:
        dist.destroy_process_group()


def test_two_process_all_reduce_equals_single_process(tmp_path):
    mp.spawn(_distributed_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    model, (images, labels) = tiny_vit(), probe_set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllPosedRegressionWarning)
        single = run_probe(model, list(zip(images.split(50), labels.split(50))), part_b_metrics(model))
    pairs = Plasticity()
    pairs.update_pairs(model, *plasticity_pairs())
    single["plasticity"] = pairs.compute()
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results.keys() == single.keys()
        for name in single:
            assert_results_close(results[name], single[name], rel=1e-7)
