"""The diagnostics a recipe's `diagnostics:` section asks for, run over a fixed probe set.

One place builds the metrics from the section and runs them, for training
(trainer/training_diagnostics.py) and for offline analysis (tools/analyze.py), so both measure alike:

    check_config(cfg, model)                                   # bad knobs -> DiagnosticsSetupError
    probe = load_probe(dataset, cfg, rank, world)                # dataset: (image, label) pairs
    results = run_diagnostics(model, probe, cfg, num_classes)   # collective in multi-process runs
    # {"token_similarity": {stage: ...}, "pe_dominance": ..., "phases": {...}, "isi": ..., ...}

Sharding: process r of W takes probe positions r, r + W, ...; every statistic is a sum reduced
over processes, and the plasticity pairs are drawn once over the whole probe set (process r takes
pairs r, r + W, ...), so W processes give the values of one, up to float summation order. The
image ids handed to the metrics are the images' indices in the eval split: ISI's
fit/validation/test split is a property of the image, not of batching or sharding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from diagnostics.capture import NORM, Stage, stage_names, unwrap_model
from diagnostics.isi import ScramblingIndex
from diagnostics.isi_regressions import WELL_POSED_RATIO
from diagnostics.phases import phases_from_similarity
from diagnostics.plasticity import Plasticity, draw_pairs
from diagnostics.registry import METRICS
from diagnostics.streaming import ProbeBatch, StreamingMetric, run_probe
from models import parameter_dtype
from models.errors import UserError


class DiagnosticsSetupError(UserError):
    """A diagnostics section that cannot run on this model or setup (names the key and value)."""


class DiagnosticsWarning(UserWarning):
    """A diagnostics setting that runs but measures poorly (e.g. too few probe images for ISI)."""


class ProbeAccuracy(StreamingMetric):
    """Top-1 (percent) of the model's head on the probe images: {"norm": {"top1", "num_images"}}.

    A check that the probed weights are the trained ones, and the accuracy of a PE-scale evaluation.
    """

    name = "probe_accuracy"

    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if stage.name != NORM or batch.labels is None:
            return
        predicted = batch.model.forward_head(stage.tokens).argmax(-1)
        self.accumulate("norm/correct", (predicted == batch.labels).sum())
        self.accumulate("norm/images", batch.labels.numel())

    def compute(self) -> dict[str, Any]:
        images = self.sums().get("norm/images")
        if images is None or images.item() == 0:
            return {}
        return {NORM: {"top1": 100.0 * self.sum("norm/correct").item() / images.item(),
                       "num_images": int(images.item())}}


def check_config(cfg: Any, model: nn.Module, where: str = "diagnostics") -> None:
    """Refuse knobs the schema's ranges cannot express; warn where ISI would be ill-conditioned."""
    for key in ("isi_holdout_fraction", "isi_validation_fraction"):
        if getattr(cfg, key) >= 1:
            raise DiagnosticsSetupError(f"{where}.{key} = {getattr(cfg, key)} is out of range: expected < 1")
    if not cfg.metrics:
        raise DiagnosticsSetupError(f"{where}.metrics is empty: list the metrics to compute")
    if "isi" not in cfg.metrics:
        return
    known = stage_names(model)
    unknown = [stage for stage in cfg.isi_stages if stage not in known]
    if unknown:
        raise DiagnosticsSetupError(f"{where}.isi_stages: {unknown} are not stages of this model "
                                    f"({', '.join(known)})")
    try:
        isi = ScramblingIndex.from_config(model, cfg)
    except ValueError as error:
        raise DiagnosticsSetupError(f"{where}: {error}") from None
    # the rule ISI itself warns by (diagnostics/isi_regressions.py), checked before any training step
    train_images = cfg.probe_size * (1 - cfg.isi_holdout_fraction)
    inputs = isi.dim + (min(cfg.isi_pca_rank, isi.sketch_width) if cfg.isi_variant == "nested" else 0)
    ratio = WELL_POSED_RATIO.get(cfg.isi_nested_fit)
    if cfg.isi_variant == "nested" and train_images < ratio * inputs:
        warnings.warn(f"{where}: ISI would fit each position's ridge on about {train_images:.0f} probe images for "
                      f"{inputs} inputs (D + isi_pca_rank), fewer than {ratio:g}x as many, so "
                      f"R² and ISI are biased; raise {where}.probe_size or lower {where}.isi_pca_rank",
                      DiagnosticsWarning, stacklevel=2)


def build_metrics(model: nn.Module, cfg: Any, num_classes: int, *,
                  with_accuracy: bool = True) -> list[StreamingMetric]:
    """Fresh streaming metrics for one probe run (plasticity, which pairs images, runs apart)."""
    metrics: list[StreamingMetric] = []
    for name, spec in METRICS.items():
        if name in cfg.metrics and spec.build is not None:
            metrics += spec.build(model, cfg, num_classes)
    if with_accuracy:
        metrics.append(ProbeAccuracy())
    return metrics


@dataclass
class ProbeData:
    """This process's share of the probe set, held on the host in the eval transform's float32."""

    images: torch.Tensor  # (n_local, C, H, W): probe positions rank, rank + world, ...
    labels: torch.Tensor  # (n_local,)
    ids: torch.Tensor  # (n_local,) int64 image ids (eval-split indices)
    pair_first: torch.Tensor  # (p_local, C, H, W): this process's plasticity pairs
    pair_second: torch.Tensor
    size: int  # images in the whole probe set

    def batches(self, batch_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(images.to(device, dtype), labels.to(device), ids.to(device))
                for images, labels, ids in zip(self.images.split(batch_size), self.labels.split(batch_size),
                                               self.ids.split(batch_size)) if len(images)]


def _load(dataset: Dataset, positions: list[int], batch_size: int,
          num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Its own generator: iterating a DataLoader otherwise draws a seed from the global RNG.
    loader = DataLoader(Subset(dataset, positions), batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    parts = list(loader)
    return torch.cat([images for images, _ in parts]), torch.cat([torch.as_tensor(labels) for _, labels in parts])


def load_probe(dataset: Dataset, cfg: Any, rank: int = 0, world_size: int = 1,
               num_workers: int = 0, pair_sources: tuple[Dataset, Dataset] | None = None) -> ProbeData:
    """Load this process's probe images and plasticity pair images (once; reused at every evaluation).

    Plasticity pairs: by default `plasticity_pairs` random pairs of distinct probe images (seeded by
    `plasticity_seed`); with `pair_sources` = (A, B), P3's pairing: image k of A (the pretraining
    distribution's validation set) with image k of B (the downstream test set), k < plasticity_pairs."""
    size = len(dataset)
    if size < 2:
        raise DiagnosticsSetupError(f"the probe set has {size} image(s); diagnostics need at least 2")
    shard = list(range(rank, size, world_size))
    pairs: list[int] = []
    if "plasticity" in cfg.metrics:
        first, second = draw_pairs(size, None, cfg.plasticity_pairs, cfg.plasticity_seed)
        pairs = [int(position) for k in range(rank, len(first), world_size) for position in (first[k], second[k])]
    # A process loads its shard and its pairs' images; with more processes than images it may load none.
    needed = sorted(set(shard) | set(pairs)) or [0]
    if pair_sources is not None:
        pairs = []  # this process's indexed pairs are loaded from their own sources below
    images, labels = _load(dataset, needed, cfg.probe_batch_size, num_workers)
    row = {position: index for index, position in enumerate(needed)}
    shard_rows = torch.tensor([row[p] for p in shard], dtype=torch.long)
    pair_rows = torch.tensor([row[p] for p in pairs], dtype=torch.long).reshape(-1, 2)
    ids = torch.as_tensor(getattr(dataset, "indices", range(size)), dtype=torch.int64)
    first_images, second_images = images[pair_rows[:, 0]], images[pair_rows[:, 1]]
    if pair_sources is not None and "plasticity" in cfg.metrics:
        first_images, second_images = _indexed_pairs(pair_sources, cfg, rank, world_size, num_workers)
    return ProbeData(images=images[shard_rows], labels=labels[shard_rows], ids=ids[shard], size=size,
                     pair_first=first_images, pair_second=second_images)


def _indexed_pairs(sources: tuple[Dataset, Dataset], cfg: Any, rank: int, world_size: int,
                   num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image k of each source, for this process's share of k < plasticity_pairs (k = rank, rank + world, ...)."""
    count = min(cfg.plasticity_pairs, *(len(source) for source in sources))
    if count < 1:
        raise DiagnosticsSetupError("plasticity_pairing = 'indexed': a pair source holds no image")
    mine = list(range(rank, count, world_size)) or [0]
    first, second = (_load(source, mine, cfg.probe_batch_size, num_workers)[0] for source in sources)
    if rank >= count:  # more processes than pairs: this one measures none
        first, second = first[:0], second[:0]
    return first, second


def plasticity_results(model: nn.Module, probe: ProbeData, cfg: Any, device: torch.device,
                       dtype: torch.dtype) -> dict[str, Any]:
    metric = Plasticity(mode=cfg.plasticity_mode)
    chunk = cfg.probe_batch_size
    for first, second in zip(probe.pair_first.split(chunk), probe.pair_second.split(chunk)):
        metric.update_pairs(model, first.to(device, dtype), second.to(device, dtype))
    metric.all_reduce(device=device)  # collective: every process, even one without pairs
    return metric.compute()


def run_diagnostics(model: nn.Module, probe: ProbeData, cfg: Any, num_classes: int, *,
                    with_accuracy: bool = True) -> dict[str, Any]:
    """Every enabled probe metric on `model` (eval mode, no grad, unwrapped); keyed by result name.

    Collective in multi-process runs (call on every process with its own `probe` shard); every
    process returns the same results.
    """
    model = unwrap_model(model)
    device, dtype = next(model.parameters()).device, parameter_dtype(model)
    metrics = build_metrics(model, cfg, num_classes, with_accuracy=with_accuracy)
    results = run_probe(model, lambda: probe.batches(cfg.probe_batch_size, device, dtype), metrics,
                        replay_bytes=int(cfg.stage_replay_gb * 2**30))
    if "plasticity" in cfg.metrics:
        results["plasticity"] = plasticity_results(model, probe, cfg, device, dtype)
    if "token_similarity" in results:
        results["phases"] = phases_from_similarity(
            results["token_similarity"], include_norm=cfg.phase_include_norm, tau_floor=cfg.phase_tau_floor,
            tau_fraction=cfg.phase_tau_fraction, tau_scales=cfg.phase_tau_scales).to_dict()
    return results
