"""Information Scrambling Index (science.md §2): ISI(ℓ) = R²_all(ℓ) − R²_self(ℓ).

How much better the pre-position-embedding patch embeddings E (stage `embed`, targets) are
linearly reconstructed from *all* patch tokens at stage ℓ than from each token alone.

- Self-only, per position i:        h_i → e_i           (D inputs)
- All-to-all "nested" (default):    [h_i ; g(H)] → e_i  (D + r inputs), g(H) = the top-r principal
  components of the whole flattened token set vec(H) ∈ R^{N·D}, fitted on the training images.
  It contains the self-only inputs, so ISI ≈ 0 when nothing is scrambled. Fitted (`nested_fit`)
  as "residual" (default): the self-only map first, then g(H) on its residual with a penalty of
  its own chosen on validation from the grid and ∞ (= drop g(H), ISI exactly 0), so R²_all can
  never fall below R²_self on validation and ISI is not biased down at small probe sets; or
  "joint": one penalty for both blocks, biased down when training images are few against D + r
  (`diagnostics.isi_regressions`; measured in tools/benchmark_isi_bias.py).
- All-to-all "literal" (option):    vec(H) → vec(E) in the dual (`diagnostics.isi_literal`).

Regressions are ridge (scikit-learn `Ridge(fit_intercept=True)` semantics, `diagnostics.ridge`),
α = c · tr(Cxx)/p with c from `ridge_grid` (the residual block: c_g · tr(S)/r, c_g from `ridge_grid`
∪ {∞}, S the covariance of g(H) left after partialling out h_i), chosen per stage and per regression
type by pooled R² of a fit on the *fit* group scored on the *validation* group; then refit on fit + validation
(the training images) and scored by held-out R² = 1 − ΣSSE/ΣSST pooled over positions and
dimensions on the *test* group. Groups come from a seeded hash of each image's key
(`diagnostics.image_split`): `holdout_fraction` of the images are test, `validation_fraction`
of the rest validation, identically in every process.

Streaming: only float64 sums are kept (per position Σhhᵀ, Σheᵀ, Σh, Σe, Σe², per group), summed
over batches and processes. The PCA of vec(H) is a streaming randomized range finder
(`diagnostics.streaming_pca`), so the nested variant takes `2 + pca_power_iterations` passes
over the probe set per stage group: range sketch, power passes, then the regression sums.

Memory. Per stage, during its regression pass, with G = 3 groups, p = N·D, k = r + oversampling
(k ≤ p), float64 (`isi_stage_bytes`):
    nested   8·G·(2·N·D² + 2·N·D·k + k² + 3·N·D + k + 2)  +  8·(p·k + p)   (sums + basis, mean)
    literal  8·G·(2·N·D² + 3·N·D + 1)                       + host: 4·n·p per stage and for E
and, once in multi-process runs, one all-reduce bucket (`isi_reduce_bytes`: the all-reduce packs the
sums into buckets of at most 1 GiB, or one larger sum alone, and frees each before the next). A stage in
its range or power pass holds at most 8·(2·p·k + p) (`isi_sketch_bytes`), and Ω (8·p·k) is held
once. Not counted: the model and its activations, and per-batch temporaries (one N·D² float64
product, 0.92 GB for ViT-B). ViT-B/16 (N = 196, D = 768, r = 256, k = 272): 7.86 GB per stage
(the self-only sums alone 5.56 GB), 110 GB for its 14 fitted stages (embed … norm but pe, below) at once.
`memory_budget_bytes` therefore splits the stages into consecutive groups and pipelines them (group g+1 sketches
while group g regresses): each stage is budgeted at its regression bytes plus one sketch for every
range/power phase (9.17 GB for ViT-B), so 32 GiB gives at most 3 stages per group, 5 groups, and
G_s groups cost G_s + 1 + pca_power_iterations passes (7 here, on one process or on eight). The number of probe images
does not enter (except for `literal`).

Stage `pe` is `embed` plus one fixed vector per position (timm's `_pos_embed`; its dropout is the identity
in eval mode). Every regression here centres its inputs (unpenalised intercept, penalty from the centred
covariance) and the PCA of vec(H) is centred too, so both stages give the same fits exactly: when both are
measured, `pe`'s results are `embed`'s, copied (`copied_stages`), not fitted again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from diagnostics.capture import (
    EMBED,
    PE,
    Stage,
    patch_tokens,
    pe_is_embed_plus_fixed_vectors,
    stage_names,
    unwrap_model,
)
from diagnostics.distributed import world_size
from diagnostics.image_split import GROUP_NAMES, TEST, image_keys, split_groups
from diagnostics.isi_literal import HeldFeatures, literal_all_r2
from diagnostics.isi_regressions import NESTED_FITS, stage_regression_scores
from diagnostics.ridge import DEFAULT_RIDGE_GRID
from diagnostics.streaming import REDUCE_BUCKET_BYTES, ProbeBatch, StreamingMetric, ordered_stages
from diagnostics.streaming_pca import centered_range_sketch, gaussian_test_matrix, orthonormal_basis

ISI_VARIANTS = ("nested", "literal")
_TARGETS = "targets"


def isi_stage_bytes(num_patches: int, dim: int, *, variant: str = "nested", pca_rank: int = 256,
                    pca_oversample: int = 16) -> int:
    """Bytes one stage holds on the device during its regression pass (see the module docstring)."""
    n, d, groups = num_patches, dim, len(GROUP_NAMES)
    if variant == "literal":
        return 8 * groups * (2 * n * d * d + 3 * n * d + 1)
    k = min(pca_rank + pca_oversample, n * d)
    sums = 8 * groups * (2 * n * d * d + 2 * n * d * k + k * k + 3 * n * d + k + 2)  # + count, sq_dev
    return sums + 8 * (n * d * k + n * d)


def isi_reduce_bytes(num_patches: int, dim: int, processes: int) -> int:
    """Extra bytes of one all-reduce in a multi-process run: one packed bucket (0 on one process).

    `StreamingMetric.all_reduce` packs the sums into buckets of at most REDUCE_BUCKET_BYTES (a larger
    single sum travels alone: Σhhᵀ of one group, 8·N·D²) and frees each bucket before packing the next.
    """
    return 0 if processes <= 1 else max(REDUCE_BUCKET_BYTES, 8 * num_patches * dim * dim)


def isi_sketch_bytes(num_patches: int, dim: int, *, pca_rank: int = 256, pca_oversample: int = 16) -> int:
    """Most bytes one stage holds in a range or power pass: the p×k sketch, the previous basis, the mean."""
    p = num_patches * dim
    return 8 * (2 * p * min(pca_rank + pca_oversample, p) + p)


def plan_stage_groups(stages: Sequence[str], stage_bytes: int, budget_bytes: int | None,
                      reserved_bytes: int = 0) -> list[list[str]]:
    """Consecutive stage groups of at most (budget − reserved) // stage_bytes stages (all in one when no budget);
    `reserved_bytes` is held once whatever the grouping (ISI's Ω and all-reduce bucket)."""
    stages = list(stages)
    if budget_bytes is None:
        return [stages]
    per_group = (budget_bytes - reserved_bytes) // stage_bytes
    if per_group < 1:
        reserved = f" less the {reserved_bytes / 2**30:.3g} GiB held once" if reserved_bytes else ""
        raise ValueError(f"ISI memory budget {budget_bytes / 2**30:.3g} GiB{reserved} is below one stage's "
                         f"{stage_bytes / 2**30:.3g} GiB")
    return [stages[i:i + per_group] for i in range(0, len(stages), per_group)]


REGRESSION_CHUNK_BYTES = 64 * 2**20


def regression_position_chunk(num_positions: int, features: int) -> int:
    """Positions whose ridge fits are solved together: as many as keep one (positions, p, p) float64 batch
    within 64 MiB (ViT-B nested: 7; the demo's 64-token model: all 64, a few batched calls instead of
    one per 8 positions, whose Python overhead dominated at that size)."""
    return max(1, min(num_positions, REGRESSION_CHUNK_BYTES // (8 * features * features)))


@dataclass
class _GroupTargets:
    """One group's `embed` targets in a batch, laid out once for every stage's regression sums."""

    by_position: torch.Tensor  # (N, b, D) contiguous
    flat: torch.Tensor  # (b, N·D)
    sum: torch.Tensor  # (N, D)
    sum_of_squares: torch.Tensor  # (N, D)

    @classmethod
    def of(cls, targets: torch.Tensor) -> _GroupTargets:
        return cls(targets.transpose(0, 1).contiguous(), targets.flatten(1), targets.sum(0), targets.square().sum(0))


class ScramblingIndex(StreamingMetric):
    """Streaming ISI per stage; results `{stage: {"isi", "r2_self", "r2_all", ...}}` (see `compute`).

    Multi-pass: run it with `streaming.run_probe`, or call `start_pass(p)` before each sweep
    p < `num_passes` and `all_reduce()` after it. The probe batches must be identical in every
    pass (no random augmentation).
    """

    name = "isi"

    def __init__(self, model: nn.Module, *, variant: str = "nested", pca_rank: int = 256,
                 pca_oversample: int = 16, pca_power_iterations: int = 1, holdout_fraction: float = 0.2,
                 validation_fraction: float = 0.2, seed: int = 0,
                 ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID, stages: Sequence[str] | None = None,
                 memory_budget_bytes: int | None = None, position_chunk: int | None = None,
                 nested_fit: str = "residual") -> None:
        if variant not in ISI_VARIANTS:
            raise ValueError(f"isi variant = {variant!r}: expected one of {', '.join(ISI_VARIANTS)}")
        if nested_fit not in NESTED_FITS:
            raise ValueError(f"isi nested_fit = {nested_fit!r}: expected one of {', '.join(NESTED_FITS)}")
        for label, value in (("pca_rank", pca_rank), ("position_chunk", 1 if position_chunk is None else position_chunk)):
            if value < 1:
                raise ValueError(f"isi {label} = {value} must be >= 1")
        if pca_oversample < 0 or pca_power_iterations < 0:
            raise ValueError("isi pca_oversample and pca_power_iterations must be >= 0")
        if not ridge_grid or min(ridge_grid) <= 0:
            raise ValueError(f"isi ridge_grid = {list(ridge_grid)} must be non-empty and positive")
        split_groups(np.zeros(1, dtype=np.uint64), seed, holdout_fraction, validation_fraction)  # validates
        model = unwrap_model(model)
        self.num_patches, self.dim = int(model.patch_embed.num_patches), int(model.embed_dim)
        known = stage_names(model)
        chosen = known if stages is None else ordered_stages(stages)
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise ValueError(f"isi stages {unknown} are not stages of this model ({', '.join(known)})")
        self.copied_stages = {PE: EMBED} if {PE, EMBED} <= set(chosen) and pe_is_embed_plus_fixed_vectors(model) else {}
        fitted = [stage for stage in chosen if stage not in self.copied_stages]
        self.variant, self.seed, self.ridge_grid = variant, seed, tuple(float(c) for c in ridge_grid)
        self.holdout_fraction, self.validation_fraction = holdout_fraction, validation_fraction
        self.pca_rank, self.nested_fit = pca_rank, nested_fit
        self.sketch_width = min(pca_rank + pca_oversample, self.num_patches * self.dim)
        self.position_chunk = position_chunk if position_chunk is not None else regression_position_chunk(
            self.num_patches, self.dim + (self.sketch_width if variant == "nested" else 0))
        self.phases = ("regression",) if variant == "literal" else (
            ("sketch",) + ("power",) * pca_power_iterations + ("regression",))
        self.stage_bytes = isi_stage_bytes(self.num_patches, self.dim, variant=variant, pca_rank=pca_rank,
                                           pca_oversample=pca_oversample)
        reduce_bytes = isi_reduce_bytes(self.num_patches, self.dim, world_size())
        sketches = len(self.phases) - 1
        sketch_bytes = isi_sketch_bytes(self.num_patches, self.dim, pca_rank=pca_rank,
                                        pca_oversample=pca_oversample)
        omega_bytes = 8 * self.num_patches * self.dim * self.sketch_width if sketches else 0
        self.stage_groups = plan_stage_groups(fitted, self.stage_bytes + sketches * sketch_bytes, memory_budget_bytes,
                                              reserved_bytes=omega_bytes + reduce_bytes)
        self._group_of = {stage: i for i, group in enumerate(self.stage_groups) for stage in group}
        self.num_passes = len(self.stage_groups) + len(self.phases) - 1
        super().__init__()

    @classmethod
    def from_config(cls, model: nn.Module, cfg: Any) -> ScramblingIndex:
        """From a recipe's `diagnostics:` section (its `isi_*` knobs)."""
        budget = None if cfg.isi_memory_budget_gb is None else int(cfg.isi_memory_budget_gb * 2**30)
        return cls(model, variant=cfg.isi_variant, pca_rank=cfg.isi_pca_rank, pca_oversample=cfg.isi_pca_oversample,
                   pca_power_iterations=cfg.isi_pca_power_iterations, holdout_fraction=cfg.isi_holdout_fraction,
                   validation_fraction=cfg.isi_validation_fraction, seed=cfg.isi_seed, ridge_grid=cfg.isi_ridge_grid,
                   stages=cfg.isi_stages or None, memory_budget_bytes=budget,
                   nested_fit=cfg.isi_nested_fit)

    def reset(self) -> None:
        super().reset()
        self._results: dict[str, dict[str, Any]] = {}
        self._means: dict[str, torch.Tensor] = {}
        self._bases: dict[str, torch.Tensor] = {}
        self._omega: torch.Tensor | None = None
        self._held = HeldFeatures()
        self._pass: int | None = None
        self._finished_passes = 0
        self._batch: ProbeBatch | None = None

    # ----- passes -------------------------------------------------------------------------
    def _phase(self, stage: str, pass_index: int) -> str | None:
        step = pass_index - self._group_of[stage]
        return self.phases[step] if 0 <= step < len(self.phases) else None

    def start_pass(self, index: int) -> None:
        if index >= self.num_passes:
            raise ValueError(f"ISI has {self.num_passes} passes; got start_pass({index})")
        if index == 0 and self._finished_passes:
            self.reset()  # a new run over the probe set (e.g. the next checkpoint)
        while self._finished_passes < index:
            self._finish_pass(self._finished_passes)
        self._pass = index

    def _finish_pass(self, index: int) -> None:
        """Turn pass `index`'s reduced sums into bases or results, then drop them."""
        for stage in self._group_of:
            phase = self._phase(stage, index)
            if phase in ("sketch", "power"):
                self._derive_basis(stage, phase)
            elif phase == "regression":
                self._results[stage] = self._stage_result(stage)
                self._means.pop(stage, None)
                self._bases.pop(stage, None)
        StreamingMetric.reset(self)  # drop this pass's sums; derived state lives in attributes
        self._held = HeldFeatures()
        self._finished_passes = index + 1

    def all_reduce(self, device: torch.device | str | None = None) -> None:
        super().all_reduce(device)
        if self.variant == "literal":
            self._held.gather()

    def compute(self) -> dict[str, Any]:
        """`{stage: {isi, r2_self, r2_all, ridge_multiplier_self, ridge_multiplier_all, ridge_multiplier_residual,
        pca_rank, pca_explained_variance, num_train_images, num_test_images, variant, nested_fit}}` in stage
        order. `ridge_multiplier_residual` is the residual fit's c_g (∞: g(H) dropped, ISI = 0 exactly;
        None for the joint fit and the literal variant); `nested_fit` is None for the literal variant."""
        if self._pass is None:
            raise RuntimeError("ISI saw no probe batches")
        if self._pass < self.num_passes - 1:
            raise RuntimeError(f"ISI needs {self.num_passes} passes over the probe set and got "
                               f"{self._pass + 1}; run it with diagnostics.streaming.run_probe")
        if self._finished_passes < self.num_passes:
            self._finish_pass(self.num_passes - 1)
        results = {**self._results, **{copy: dict(self._results[source]) for copy, source in self.copied_stages.items()}}
        return {stage: results[stage] for stage in ordered_stages(results)}

    # ----- streaming ----------------------------------------------------------------------
    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if self._pass is None:
            self.start_pass(0)
        if stage.name == EMBED:
            self._start_batch(stage, batch)
        if stage.name not in self._group_of or self._phase(stage.name, self._pass) is None:
            return
        if batch is not self._batch:
            raise RuntimeError("ISI got a stage of a batch whose `embed` stage it did not see")
        tokens = patch_tokens(stage.tokens, stage.name, batch.num_prefix_tokens).to(torch.float64)
        if tokens.shape[1:] != (self.num_patches, self.dim):
            raise ValueError(f"ISI at stage {stage.name!r}: patch tokens {tuple(tokens.shape[1:])}, expected "
                             f"({self.num_patches}, {self.dim}) (a different image size?)")
        phase = self._phase(stage.name, self._pass)
        if phase == "regression":
            self._accumulate_regression(stage.name, tokens)
        else:
            self._accumulate_sketch(stage.name, tokens, phase)

    def _start_batch(self, stage: Stage, batch: ProbeBatch) -> None:
        codes = split_groups(image_keys(batch), self.seed, self.holdout_fraction, self.validation_fraction)
        device = stage.tokens.device
        self._batch, self._codes = batch, codes
        self._targets = stage.tokens.to(torch.float64)
        self._rows = {code: torch.from_numpy(np.flatnonzero(codes == code)).to(device)
                      for code in range(len(GROUP_NAMES)) if (codes == code).any()}
        train = np.flatnonzero(codes != TEST)
        self._train_rows = torch.from_numpy(train).to(device) if train.size else None
        regressing = any(self._phase(s, self._pass) == "regression" for s in self._group_of)
        self._group_targets = {code: _GroupTargets.of(self._targets[rows])
                               for code, rows in self._rows.items()} if regressing else {}
        if self.variant == "literal" and regressing:
            self._held.add(_TARGETS, codes, self._targets)

    def _accumulate_sketch(self, stage: str, tokens: torch.Tensor, phase: str) -> None:
        if self._train_rows is None:
            return
        x = tokens[self._train_rows].flatten(1)
        if phase == "sketch":
            self.accumulate(f"{stage}/sketch/count", float(x.shape[0]))
            self.accumulate(f"{stage}/sketch/sum", x.sum(0))
            self.accumulate(f"{stage}/sketch/range", x.T @ (x @ self._test_matrix(x.device)))
        else:
            x = x - self._means[stage]
            self.accumulate(f"{stage}/power/range", x.T @ (x @ self._bases[stage]))

    def _test_matrix(self, device: torch.device) -> torch.Tensor:
        """The seeded Gaussian Ω (N·D, k), shared by every stage (and identical on every process)."""
        if self._omega is None or self._omega.device != device:
            self._omega = gaussian_test_matrix(self.num_patches * self.dim, self.sketch_width, self.seed,
                                               device)
        return self._omega

    def _derive_basis(self, stage: str, phase: str) -> None:
        sums = self.sums()
        if f"{stage}/{phase}/range" not in sums:
            raise ValueError(f"ISI at stage {stage!r}: no training images in the probe set")
        if phase == "sketch":
            count, total = sums[f"{stage}/sketch/count"], sums[f"{stage}/sketch/sum"]
            self._means[stage] = total / count
            sketch = centered_range_sketch(sums[f"{stage}/sketch/range"], total, count,
                                           self._test_matrix(total.device))
        else:
            sketch = sums[f"{stage}/power/range"]
        self._bases[stage] = orthonormal_basis(sketch)

    def _accumulate_regression(self, stage: str, tokens: torch.Tensor) -> None:
        nested = self.variant == "nested"
        for code, rows in self._rows.items():
            h, e = tokens[rows], self._group_targets[code]
            prefix = f"{stage}/{GROUP_NAMES[code]}/"
            h_by_position = h.transpose(0, 1).contiguous()  # (N, b, D): contiguous batches multiply faster
            self.accumulate(prefix + "count", float(h.shape[0]))
            self.accumulate(prefix + "sum_h", h.sum(0))
            self.accumulate(prefix + "sum_e", e.sum)
            self.accumulate(prefix + "sq_e", e.sum_of_squares)
            self.accumulate(prefix + "hh", h_by_position.transpose(1, 2) @ h_by_position)
            self.accumulate(prefix + "he", h_by_position.transpose(1, 2) @ e.by_position)
            if nested:
                centered = h.flatten(1) - self._means[stage]
                z = centered @ self._bases[stage]  # (b, k)
                self.accumulate(prefix + "sum_z", z.sum(0))
                self.accumulate(prefix + "zz", z.T @ z)
                self.accumulate(prefix + "hz", h.permute(1, 2, 0) @ z)  # (N, D, k)
                self.accumulate(prefix + "ze", (z.T @ e.flat).unflatten(1, h.shape[1:]).transpose(0, 1))  # (N, k, D)
                self.accumulate(prefix + "sq_dev", centered.square().sum())
        if self.variant == "literal":
            self._held.add(stage, self._codes, tokens)

    # ----- results ------------------------------------------------------------------------
    def _stage_result(self, stage: str) -> dict[str, Any]:
        prefix = stage + "/"
        sums = {key[len(prefix):]: value for key, value in self.sums().items() if key.startswith(prefix)}
        scores = stage_regression_scores(sums, nested=self.variant == "nested", pca_rank=self.pca_rank,
                                         grid=self.ridge_grid, position_chunk=self.position_chunk,
                                         stage=stage, nested_fit=self.nested_fit)
        if self.variant == "literal":
            device = next(iter(sums.values())).device
            r2_all, multiplier_all, _ = literal_all_r2(self._held, stage, _TARGETS, self.ridge_grid, device)
            scores.update(r2_all=r2_all, ridge_multiplier_all=multiplier_all)
        scores["isi"] = scores["r2_all"] - scores["r2_self"]
        scores["variant"] = self.variant
        scores["nested_fit"] = self.nested_fit if self.variant == "nested" else None
        return {key: scores[key] for key in (
            "isi", "r2_self", "r2_all", "ridge_multiplier_self", "ridge_multiplier_all", "ridge_multiplier_residual",
            "pca_rank", "pca_explained_variance", "num_train_images", "num_test_images", "variant", "nested_fit")}
