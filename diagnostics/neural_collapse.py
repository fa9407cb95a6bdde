"""Neural-collapse geometry of class features per stage (science.md §4; Papyan, Han & Donoho 2020).

Features per image at a stage: at `norm`, what the classifier head reads
(`forward_head(pre_logits=True)`: the CLS token after `fc_norm` for timm's default
`global_pool="token"`); at earlier stages the model's own pooling of that stage's tokens
(`model.pool`: the CLS token of the residual stream, or the mean patch token for avg-pool models).
With the C' classes present in the probe set (absent classes are dropped everywhere, including
from the head rows and logits, and their number is reported), class means μ_c, the class-balanced
global mean μ_G = mean_c μ_c (the sample mean on a balanced probe set; it centres the simplex
exactly on an unbalanced one) and M = [μ_c − μ_G] (D × C'):

    NC1  tr(Σ_W Σ_B^†) / C'       Σ_W = mean over images of (h − μ_y)(h − μ_y)ᵀ, Σ_B = M Mᵀ / C'
    NC2  ‖MᵀM/‖MᵀM‖_F − (I − 11ᵀ/C')/√(C'−1)‖_F   (distance to a simplex ETF); equinorm CV =
         std/mean of ‖μ_c − μ_G‖ (population std)
    NC3  ‖W/‖W‖_F − Mᵀ/‖M‖_F‖_F with the head weight W (C' × D)   — `norm` stage only: no head
         reads the other stages, so they report null
    NC4  fraction of images whose nearest class mean (Euclidean, present classes) differs from
         the head's argmax over present classes; logit margin = mean of z_y − max_{c≠y} z_c
         (present classes; positive = correct)                       — `norm` stage only

Streaming: one pass of per-class sums and counts and the total second moment Σhhᵀ (float64),
Σ_W = (Σhhᵀ − Σ_c n_c μ_c μ_cᵀ)/n, all summed over ranks. NC4 needs the global class means before
classifying, so each process keeps its own `norm` features and logits (n_local·(D + C) float64,
e.g. 16 MB for 1,000 ImageNet images on ViT-B); `all_reduce` first sums the class statistics,
then classifies the kept rows against the global means and sums the NC4 counts in a second
collective. A stage whose classes all share one mean (e.g. the CLS token at `pe`, identical for
every image) has no between-class geometry: its metrics are null.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diagnostics.capture import EMBED, NORM, Stage, stage_names, unwrap_model
from diagnostics.streaming import ProbeBatch, StreamingMetric, ordered_stages

RESULT_KEYS = ("nc1", "nc2_etf_gap", "nc2_equinorm_cv", "nc3_self_duality", "nc4_ncc_mismatch",
               "logit_margin", "num_classes_present", "num_samples")
_DEGENERATE_RELATIVE = 1e-9  # ‖M‖_F below this × ‖μ_G‖: no between-class structure


def stage_features(stage: Stage, model: nn.Module) -> torch.Tensor:
    """(B, D) features of a stage: the head's input at `norm`, the model's pooling elsewhere."""
    if stage.name == NORM:
        return model.forward_head(stage.tokens, pre_logits=True)
    if hasattr(model, "pool"):
        return model.pool(stage.tokens)
    return stage.tokens[:, 0]


def collapse_geometry(class_sums: torch.Tensor, class_counts: torch.Tensor, second_moment: torch.Tensor,
                      head_weight: torch.Tensor | None = None) -> dict[str, Any]:
    """NC1, NC2 (ETF gap, equinorm CV) and, with a head, NC3, from float64 sufficient statistics."""
    present = class_counts > 0
    num_present = int(present.sum())
    result: dict[str, Any] = dict(nc1=None, nc2_etf_gap=None, nc2_equinorm_cv=None, nc3_self_duality=None,
                                  num_classes_present=num_present, num_samples=int(class_counts.sum()))
    if num_present < 2:
        return result
    counts = class_counts[present]
    means = class_sums[present] / counts.unsqueeze(-1)  # (C', D)
    global_mean = means.mean(0)
    centered_means = means - global_mean  # rows are the columns of M
    norm_m = torch.linalg.matrix_norm(centered_means)
    if norm_m <= _DEGENERATE_RELATIVE * max(float(global_mean.norm()), 1e-300):
        return result
    within = (second_moment - (means.T * counts) @ means) / counts.sum()
    between = centered_means.T @ centered_means / num_present
    result["nc1"] = float(torch.trace(within @ torch.linalg.pinv(between, hermitian=True)) / num_present)
    gram = centered_means @ centered_means.T
    eye = torch.eye(num_present, dtype=gram.dtype, device=gram.device)
    simplex = (eye - 1.0 / num_present) / (num_present - 1) ** 0.5
    result["nc2_etf_gap"] = float(torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - simplex))
    lengths = centered_means.norm(dim=1)
    result["nc2_equinorm_cv"] = float(lengths.std(unbiased=False) / lengths.mean())
    if head_weight is not None:
        weight = head_weight[present]
        result["nc3_self_duality"] = float(torch.linalg.matrix_norm(
            weight / torch.linalg.matrix_norm(weight) - centered_means / norm_m))
    return result


def nearest_mean_mismatch(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                          class_means: torch.Tensor,
                          present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mismatches, margin sum) over the rows: nearest-class-mean vs argmax, z_y − max_{c≠y} z_c."""
    classes = torch.nonzero(present).squeeze(1)
    distances = torch.cdist(features, class_means[classes])
    nearest = classes[distances.argmin(1)]
    present_logits = logits[:, classes]
    predicted = classes[present_logits.argmax(1)]
    true_logit = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = present_logits.masked_fill(classes.unsqueeze(0) == labels.unsqueeze(1), float("-inf"))
    margins = true_logit - others.max(1).values
    return (nearest != predicted).sum().to(torch.float64), margins.sum()


class NeuralCollapse(StreamingMetric):
    """Streaming NC1–NC4 per stage; needs labels. Results `{stage: {nc1, nc2_etf_gap, ...}}`."""

    name = "neural_collapse"

    def __init__(self, model: nn.Module, num_classes: int | None = None, *, all_stages: bool = True) -> None:
        model = unwrap_model(model)
        self.num_classes = int(num_classes if num_classes is not None else model.num_classes)
        if self.num_classes < 2:
            raise ValueError(f"neural collapse needs at least 2 classes, got num_classes = "
                             f"{self.num_classes}")
        head = getattr(model, "head", None)
        if isinstance(head, nn.Linear) and head.out_features != self.num_classes:
            raise ValueError(f"neural collapse num_classes = {self.num_classes} but the model's head has "
                             f"{head.out_features} outputs")
        self.stages = [s for s in stage_names(model) if s != EMBED] if all_stages else [NORM]
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._final_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._head_weight: torch.Tensor | None = None
        self._classified = False

    @torch.no_grad()  # the head runs here, outside iterate_stages' no_grad
    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if stage.name not in self.stages:
            return
        if batch.labels is None:
            raise ValueError("neural collapse needs the probe labels (batches of (images, labels))")
        labels = batch.labels.to(stage.tokens.device).long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"probe labels must be in [0, {self.num_classes}); got "
                             f"{int(labels.min())}..{int(labels.max())}")
        raw_features = stage_features(stage, batch.model)
        features = raw_features.to(torch.float64)
        sums = torch.zeros(self.num_classes, features.shape[1], dtype=torch.float64, device=features.device)
        self.accumulate(f"{stage.name}/class_sums", sums.index_add_(0, labels, features))
        self.accumulate(f"{stage.name}/class_counts", torch.bincount(labels, minlength=self.num_classes))
        self.accumulate(f"{stage.name}/second_moment", features.T @ features)
        head = getattr(batch.model, "head", None)
        if stage.name == NORM and isinstance(head, nn.Linear):
            self._final_rows.append((features, head(raw_features).to(torch.float64), labels))
            self._head_weight = head.weight.detach().to(torch.float64).clone()

    def all_reduce(self, device: torch.device | str | None = None) -> None:
        super().all_reduce(device)
        if NORM not in self.stages or self._classified:
            return
        self._classified = True
        sums = self.sums()
        if f"{NORM}/class_counts" in sums:
            counts = sums[f"{NORM}/class_counts"]
            means = sums[f"{NORM}/class_sums"] / counts.clamp_min(1).unsqueeze(-1)
            present = counts > 0
            for features, logits, labels in self._final_rows:
                if int(present.sum()) >= 2:
                    device = means.device
                    mismatches, margins = nearest_mean_mismatch(features.to(device), logits.to(device),
                                                                labels.to(device), means, present)
                    self.accumulate(f"{NORM}/nc4_mismatches", mismatches)
                    self.accumulate(f"{NORM}/margin_sum", margins)
        self._final_rows = []
        super().all_reduce(device)  # collective on every rank, even one that kept no rows

    def compute(self) -> dict[str, Any]:
        results = {}
        sums = self.sums()
        for stage in ordered_stages(s for s in self.stages if f"{s}/class_counts" in sums):
            counts = sums[f"{stage}/class_counts"]
            head_weight = self._head_weight if stage == NORM else None
            result = collapse_geometry(sums[f"{stage}/class_sums"], counts, sums[f"{stage}/second_moment"],
                                       head_weight.to(counts.device) if head_weight is not None else None)
            mismatches = sums.get(f"{stage}/nc4_mismatches")
            ready = mismatches is not None and result["nc1"] is not None
            result["nc4_ncc_mismatch"] = float(mismatches / counts.sum()) if ready else None
            result["logit_margin"] = float(sums[f"{stage}/margin_sum"] / counts.sum()) if ready else None
            results[stage] = {key: result[key] for key in RESULT_KEYS}
        return results
