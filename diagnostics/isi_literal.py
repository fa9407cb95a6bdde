"""The literal all-to-all ISI regression vec(H_ℓ) → vec(E), solved in the dual (science.md §2, option).

With N·D regression inputs (150,528 for ViT-B) the primal normal equations do not fit in memory,
and the dual needs the Gram matrix over *pairs* of images, which no per-batch sum provides. So
this variant, unlike the rest of ISI, holds the flattened patch tokens of every probe image for
the stages of the current pass (and the targets), float32 on the host, and gathers them to every
process after each pass: n·N·D·4 bytes per stage (plus one copy for the targets), e.g. 61 MB for
N = 64, D = 192, n = 1,250; 6 GB per stage for ViT-B on 10k images.

It exists to show why the nested form is the default: the regression is ill-posed unless the
number of training images far exceeds N·D, and then it under-reconstructs even when nothing is
scrambled (science.md: ISI ≈ −0.98 at `embed` for N = 64, D = 192 with 51 training images).
`literal_all_r2` warns (`IllPosedRegressionWarning`) below LITERAL_WELL_POSED_RATIO · N·D images.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from diagnostics.distributed import is_distributed
from diagnostics.image_split import FIT, TEST, VALIDATION
from diagnostics.ridge import IllPosedRegressionWarning, kernel_heldout_sse

LITERAL_WELL_POSED_RATIO = 10  # warn below this many training images per regression input


class HeldFeatures:
    """Rows (images) of named float32 matrices, with each row's group code, kept on the host."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = defaultdict(list)

    def add(self, name: str, codes: np.ndarray, rows: torch.Tensor) -> None:
        self._parts[name].append((np.asarray(codes), rows.detach().reshape(rows.shape[0], -1).float().cpu()))

    def gather(self) -> None:
        """Every process gets every process's rows (same order for every name). Collective."""
        if not is_distributed():
            return
        local = {name: self._concatenated(name) for name in sorted(self._parts)}
        gathered: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        self._parts = defaultdict(list)
        for rank_parts in gathered:
            for name, part in (rank_parts or {}).items():
                self._parts[name].append(part)

    def _concatenated(self, name: str) -> tuple[np.ndarray, torch.Tensor]:
        parts = self._parts[name]
        return np.concatenate([codes for codes, _ in parts]), torch.cat([rows for _, rows in parts])

    def rows(self, name: str, groups: Sequence[int]) -> torch.Tensor:
        """The rows of `name` whose group is in `groups`, in insertion (then rank) order."""
        if not self._parts.get(name):
            raise ValueError(f"no held rows named {name!r}")
        codes, rows = self._concatenated(name)
        return rows[torch.from_numpy(np.isin(codes, list(groups)))]


def literal_all_r2(held: HeldFeatures, stage: str, targets: str, multipliers: Sequence[float],
                   device: torch.device | str = "cpu") -> tuple[float, float, int]:
    """Held-out R² of vec(H) → vec(E) for `stage`, the multiplier picked on the validation group.

    Returns (r2, multiplier, number of training images).
    """
    x = {g: held.rows(stage, [g]).to(device) for g in (FIT, VALIDATION, TEST)}
    y = {g: held.rows(targets, [g]).to(device) for g in (FIT, VALIDATION, TEST)}
    n_train, inputs = x[FIT].shape[0] + x[VALIDATION].shape[0], x[FIT].shape[1]
    if n_train < LITERAL_WELL_POSED_RATIO * inputs:
        warnings.warn(
            f"literal ISI at stage {stage!r}: {n_train} training images for N·D = {inputs} regression inputs "
            f"(fewer than {LITERAL_WELL_POSED_RATIO}× as many); vec(H)→vec(E) is ill-posed here and its R² "
            "falls far below the self-only one even without scrambling (science.md: ISI ≈ −0.98 at `embed` "
            "with 51 images, N·D = 12288). Use the nested variant.", IllPosedRegressionWarning, stacklevel=2)
    validation_sse = kernel_heldout_sse(x[FIT], y[FIT], x[VALIDATION], y[VALIDATION], multipliers)
    best = int(torch.argmin(validation_sse))
    train_x, train_y = torch.cat([x[FIT], x[VALIDATION]]), torch.cat([y[FIT], y[VALIDATION]])
    test_sse = kernel_heldout_sse(train_x, train_y, x[TEST], y[TEST], [multipliers[best]])[0]
    test_y = y[TEST].double()
    test_sst = (test_y - test_y.mean(0)).square().sum()
    return float(1.0 - test_sse / test_sst), float(multipliers[best]), n_train
