"""The self-only and nested ISI regressions of one stage, from its reduced per-group sums.

`sums` maps '<group>/<statistic>' (group: fit, val, test) to float64 tensors:

    count ()       sum_h (N, D)   sum_e (N, D)   sq_e (N, D)   hh (N, D, D)   he (N, D, D)
    nested only:   sum_z (k,)     zz (k, k)      hz (N, D, k)  ze (N, k, D)   sq_dev ()

with h_i the stage's token at position i, e_i the `embed` target, and z = Qᵀ(vec H − μ) the
projection on the streamed PCA basis. The nested inputs of position i are [h_i ; Rᵀz], where R
(k × r) is the Rayleigh–Ritz rotation from the training images' Cov(z): their sums follow
linearly from those above, so the top-r components are chosen after streaming. Positions are
processed in chunks to bound the temporaries (≈ 80·chunk·(D + r)² bytes).

Nested fits (`NESTED_FITS`):

- `residual` (default): the self-only ridge h_i → e_i is fitted first, with the multiplier c_self
  chosen on validation, and g = Rᵀz is then fitted to its residual with a penalty of its own,
  α_g = c_g · tr(S)/r, S the covariance of g left after (ridge-)partialling h_i out: a two-block
  ridge with α_h = c_self · tr(C_hh)/D held at the self-only choice (`ridge.two_block_sse_change`).
  c_g is chosen on validation (pooled over positions) from `grid` ∪ {∞}; ∞ is tried first and
  kept on ties, and it reproduces the self-only fit exactly, so R²_all ≥ R²_self on validation
  always and ISI is exactly 0 whenever g does not help on validation.
- `joint`: one multiplier for [h_i ; g] (the estimator before the residual fit). It is biased
  downward when training images are few against D + r: the shared penalty either under-regularises
  the r context inputs (which then overfit) or over-shrinks the self block.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from diagnostics.image_split import GROUP_NAMES
from diagnostics.ridge import (
    IllPosedRegressionWarning,
    RegressionSums,
    heldout_sse,
    heldout_sse_at,
    total_sum_of_squares,
    two_block_heldout_sse_at,
    two_block_sse_change,
)
from diagnostics.streaming_pca import rayleigh_ritz

NESTED_FITS = ("residual", "joint")
# Warn below this many training images per nested input (D + r), for each nested fit. Measured on ViTs whose
# attention is masked to the diagonal (true ISI 0 at every stage; tools/benchmark_isi_bias.py, D + r = 80 and
# 96, 16 and 64 tokens, 5 probe sets each): residual, largest |ISI| over stages and probe sets 0.0008 at
# 1.26x, 0.0003 at 2x, 0.0001 from 2.5x on, but 0.0013 at 1.05x, 0.008 at 0.65x and 0.017 at 0.25x;
# joint, mean ISI at the worst stage -0.04 .. -0.43 at 1.26x, -0.03 at 2x, -0.005 .. -0.03 at 5x and
# -0.002 .. -0.007 at 20x and -0.001 .. -0.003 at 41x (within ±0.001 only from ~40x on, demo, to >80x, ViT-S/8).
WELL_POSED_RATIO = {"residual": 1.25, "joint": 2}
PER_POSITION_WELL_POSED_RATIO = 2  # the self-only fit's (D inputs) and the joint fit's (D + r)
INFINITE = float("inf")
_STATISTICS = ("count", "sum_h", "sum_e", "sq_e", "hh", "he")
_NESTED_STATISTICS = ("sum_z", "zz", "hz", "ze")


def _group_sums(sums: dict[str, torch.Tensor], group: str, nested: bool,
                stage: str) -> dict[str, torch.Tensor]:
    names = _STATISTICS + (_NESTED_STATISTICS if nested else ())
    if f"{group}/count" not in sums:
        raise ValueError(f"ISI at stage {stage!r}: no probe image fell in the {group!r} group; use more "
                         "probe images or larger holdout/validation fractions")
    return {name: sums[f"{group}/{name}"] for name in names}


def _regression_sums(group: dict[str, torch.Tensor], chunk: slice,
                     rotation: torch.Tensor | None) -> RegressionSums:
    hh, he, sum_h = group["hh"][chunk], group["he"][chunk], group["sum_h"][chunk]
    targets = dict(count=group["count"], sum_y=group["sum_e"][chunk], yy=group["sq_e"][chunk])
    if rotation is None:
        return RegressionSums(sum_x=sum_h, xx=hh, xy=he, **targets)
    positions, rank = hh.shape[0], rotation.shape[1]
    hg = group["hz"][chunk] @ rotation  # (c, D, r)
    gg = (rotation.T @ group["zz"] @ rotation).expand(positions, rank, rank)
    xx = torch.cat([torch.cat([hh, hg], -1), torch.cat([hg.transpose(-2, -1), gg], -1)], -2)
    xy = torch.cat([he, rotation.T @ group["ze"][chunk]], -2)
    sum_x = torch.cat([sum_h, (group["sum_z"] @ rotation).expand(positions, rank)], -1)
    return RegressionSums(sum_x=sum_x, xx=xx, xy=xy, **targets)


def pca_rotation(fit: dict[str, torch.Tensor], val: dict[str, torch.Tensor],
                 rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rayleigh–Ritz on the training images (fit + validation): (variances (r,), rotation (k, r))."""
    count = fit["count"] + val["count"]
    mean_z = (fit["sum_z"] + val["sum_z"]) / count
    centered_zz = fit["zz"] + val["zz"] - count * torch.outer(mean_z, mean_z)
    return rayleigh_ritz(centered_zz, min(rank, centered_zz.shape[0]))


def _pooled_sse(train: Sequence[dict], scored: dict, rotation: torch.Tensor | None, num_positions: int,
                position_chunk: int, score) -> torch.Tensor:
    """`score(train sums, scored sums)` summed over positions, the train sums pooled over the `train` groups."""
    total = 0.0
    for start in range(0, num_positions, position_chunk):
        chunk = slice(start, start + position_chunk)
        train_sums = [_regression_sums(group, chunk, rotation) for group in train]
        total = total + score(sum(train_sums[1:], train_sums[0]), _regression_sums(scored, chunk, rotation)).sum(0)
    return total


def stage_regression_scores(sums: dict[str, torch.Tensor], *, nested: bool, pca_rank: int,
                            grid: Sequence[float], position_chunk: int, stage: str,
                            nested_fit: str = "residual") -> dict[str, Any]:
    """Held-out pooled R² of the self-only (and nested) regressions, multipliers chosen on validation.

    Adds `ridge_multiplier_residual` (c_g of the residual fit, ∞ when g is dropped; None otherwise).
    """
    if nested_fit not in NESTED_FITS:
        raise ValueError(f"isi nested_fit = {nested_fit!r}: expected one of {', '.join(NESTED_FITS)}")
    fit, val, test = (_group_sums(sums, group, nested, stage) for group in GROUP_NAMES)
    result: dict[str, Any] = dict(num_train_images=int(fit["count"] + val["count"]),
                                  num_test_images=int(test["count"]), pca_rank=None,
                                  pca_explained_variance=None, ridge_multiplier_residual=None)
    rotation = None
    if nested:
        variances, rotation = pca_rotation(fit, val, pca_rank)
        total = sums["fit/sq_dev"] + sums["val/sq_dev"]
        result["pca_rank"] = int(rotation.shape[1])
        result["pca_explained_variance"] = float(variances.sum() / total) if total > 0 else None
    num_positions, dim = fit["sum_h"].shape
    _warn_if_ill_posed(result["num_train_images"], dim, result["pca_rank"], nested, nested_fit, stage)
    val_sst = total_sum_of_squares(_regression_sums(val, slice(None), None)).sum()
    test_sst = total_sum_of_squares(_regression_sums(test, slice(None), None)).sum()
    if not (val_sst > 0 and test_sst > 0):
        raise ValueError(f"ISI at stage {stage!r}: the `embed` targets do not vary over the "
                         "validation/test images")

    # Each multiplier is chosen by the grid's validation SSE (fit → val, one eigendecomposition for the whole
    # grid); only the chosen ones are refitted on the training images and scored on test (Cholesky solves).
    def pooled(rotation: torch.Tensor | None, train: Sequence[dict], scored: dict, score) -> torch.Tensor:
        return _pooled_sse(train, scored, rotation, num_positions, position_chunk, score)

    def r2(sse: torch.Tensor) -> float:
        return float(1.0 - sse / test_sst)

    self_val = pooled(None, [fit], val, lambda train, scored: heldout_sse(train, scored, grid))
    c_self = result["ridge_multiplier_self"] = float(grid[int(torch.argmin(self_val))])  # first of equal minima
    c_residual = None
    if nested and nested_fit == "residual":
        residual_grid = (INFINITE, *grid)  # ∞ first: kept on ties, and exactly the self-only fit
        change_val = pooled(rotation, [fit], val,
                            lambda train, scored: two_block_sse_change(train, scored, dim, c_self, residual_grid))
        change_val[0] = 0.0  # exactly (d = 0 there); guards against −0.0 ties
        c_residual = result["ridge_multiplier_residual"] = float(residual_grid[int(torch.argmin(change_val))])
    if c_residual is not None and c_residual != INFINITE:  # both test fits from one factorisation
        self_test, all_test = pooled(rotation, [fit, val], test, lambda train, scored: two_block_heldout_sse_at(
            train, scored, dim, c_self, c_residual))
    else:
        self_test = all_test = pooled(None, [fit, val], test,
                                      lambda train, scored: heldout_sse_at(train, scored, c_self))
    result["r2_self"] = r2(self_test)
    if not nested:
        return result
    if nested_fit == "joint":
        all_val = pooled(rotation, [fit], val, lambda train, scored: heldout_sse(train, scored, grid))
        c_all = result["ridge_multiplier_all"] = float(grid[int(torch.argmin(all_val))])
        all_test = pooled(rotation, [fit, val], test, lambda train, scored: heldout_sse_at(train, scored, c_all))
    else:
        result["ridge_multiplier_all"] = c_self  # h keeps c_self; g has c_residual (∞: the self-only fit, ISI = 0)
    result["r2_all"] = r2(all_test)
    return result


def _warn_if_ill_posed(num_train: int, dim: int, rank: int | None, nested: bool, nested_fit: str,
                       stage: str) -> None:
    if nested:
        inputs, ratio = dim + (rank or 0), WELL_POSED_RATIO[nested_fit]
        if num_train >= ratio * inputs:
            return
        effect = ("the residual fit's ISI is noisy (|ISI| measured up to 0.0013 at 1x, 0.008 at 0.65x and 0.017 "
                  "at 0.25x on a model whose true ISI is 0)" if nested_fit == "residual" else
                  "the joint nested fit overfits and ISI is biased low (use isi_nested_fit: residual)")
        what = f"{inputs} inputs per position (D = {dim} + r = {rank}); below {ratio:g}x as many images {effect}"
    else:
        inputs, ratio = dim, PER_POSITION_WELL_POSED_RATIO
        if num_train >= ratio * inputs:
            return
        what = (f"D = {dim} inputs per position; below {ratio}x as many images the per-position self-only "
                "regressions overfit and R²_self (hence ISI) is biased")
    warnings.warn(f"ISI at stage {stage!r}: {num_train} training images for {what}; use more probe images",
                  IllPosedRegressionWarning, stacklevel=4)
