"""The self-only and nested ISI regressions of one stage, from its reduced per-group sums.

`sums` maps '<group>/<statistic>' (group: fit, val, test) to float64 tensors:

    count ()       sum_h (N, D)   sum_e (N, D)   sq_e (N, D)   hh (N, D, D)   he (N, D, D)
    nested only:   sum_z (k,)     zz (k, k)      hz (N, D, k)  ze (N, k, D)   sq_dev ()

with h_i the stage's token at position i, e_i the `embed` target, and z = Qᵀ(vec H − μ) the
projection on the streamed PCA basis. The nested inputs of position i are [h_i ; Rᵀz], where R
(k × r) is the Rayleigh–Ritz rotation from the training images' Cov(z): their sums follow
linearly from those above, so the top-r components are chosen after streaming. Positions are
processed in chunks to bound the temporaries (≈ 80·chunk·(D + r)² bytes).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from diagnostics.image_split import GROUP_NAMES
from diagnostics.ridge import IllPosedRegressionWarning, RegressionSums, heldout_sse, total_sum_of_squares
from diagnostics.streaming_pca import rayleigh_ritz

PER_POSITION_WELL_POSED_RATIO = 2  # warn below this many training images per per-position input
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


def stage_regression_scores(sums: dict[str, torch.Tensor], *, nested: bool, pca_rank: int,
                            grid: Sequence[float], position_chunk: int, stage: str) -> dict[str, Any]:
    """Held-out pooled R² of the self-only (and nested) regressions, multipliers chosen on validation."""
    fit, val, test = (_group_sums(sums, group, nested, stage) for group in GROUP_NAMES)
    result: dict[str, Any] = dict(num_train_images=int(fit["count"] + val["count"]),
                                  num_test_images=int(test["count"]), pca_rank=None,
                                  pca_explained_variance=None)
    kinds: dict[str, torch.Tensor | None] = {"self": None}
    if nested:
        variances, rotation = pca_rotation(fit, val, pca_rank)
        total = sums["fit/sq_dev"] + sums["val/sq_dev"]
        result["pca_rank"] = int(rotation.shape[1])
        result["pca_explained_variance"] = float(variances.sum() / total) if total > 0 else None
        kinds["all"] = rotation
    num_positions, dim = fit["sum_h"].shape
    inputs = dim + (result["pca_rank"] or 0)
    if result["num_train_images"] < PER_POSITION_WELL_POSED_RATIO * inputs:
        warnings.warn(
            f"ISI at stage {stage!r}: {result['num_train_images']} training images for {inputs} inputs per "
            f"position (D = {dim}{f' + r = {inputs - dim}' if nested else ''}); below "
            f"{PER_POSITION_WELL_POSED_RATIO}x as many images the per-position regressions overfit and "
            "R² (hence ISI) is biased; use more probe images", IllPosedRegressionWarning, stacklevel=3)
    val_sse = dict.fromkeys(kinds, 0.0)
    test_sse = dict.fromkeys(kinds, 0.0)
    val_sst = test_sst = 0.0
    for start in range(0, num_positions, position_chunk):
        chunk = slice(start, start + position_chunk)
        for kind, rotation in kinds.items():
            fit_sums, val_sums, test_sums = (_regression_sums(g, chunk, rotation) for g in (fit, val, test))
            val_sse[kind] = val_sse[kind] + heldout_sse(fit_sums, val_sums, grid).sum(0)
            test_sse[kind] = test_sse[kind] + heldout_sse(fit_sums + val_sums, test_sums, grid).sum(0)
        val_sst = val_sst + total_sum_of_squares(val_sums).sum()
        test_sst = test_sst + total_sum_of_squares(test_sums).sum()
    if not (val_sst > 0 and test_sst > 0):
        raise ValueError(f"ISI at stage {stage!r}: the `embed` targets do not vary over the "
                         "validation/test images")
    for kind in kinds:
        best = int(torch.argmin(val_sse[kind]))
        result[f"r2_{kind}"] = float(1.0 - test_sse[kind][best] / test_sst)
        result[f"ridge_multiplier_{kind}"] = float(grid[best])
    return result
