"""The protocol every depth-dynamics metric follows: stream a probe set, one stage at a time.

A probe set (a fixed set of images, possibly thousands, sharded over processes) is run in
batches. For each batch, `update_metrics` runs ONE stage-by-stage forward
(`capture.iterate_stages`) and hands every stage to every metric before moving on, so only the
current stage's activations (and, for block stages, its attention) are alive:

    metrics = [TokenSimilarity(), AttentionMetrics()]
    results = run_probe(model, probe_loader, metrics)    # {metric.name: {stage: {...}}}

or, when the caller owns the loop:

    for images, labels in probe_loader:
        update_metrics(model, images, metrics, labels=labels)
    results = compute_metrics(metrics, device=images.device)

A metric (`StreamingMetric`) keeps only named float64 sums (`accumulate`). `all_reduce()` adds
them over ranks (ranks that saw no data contribute zeros), and `compute()` turns them into
plain JSON-serialisable results keyed by stage name, in stage order (`ordered_stages`).
Because everything is a sum, streaming over batches equals one pass over the concatenation
and N processes equal one.

Metrics that need more than one sweep over the probe set (e.g. fit a projection, then score
with it) set `num_passes`; `run_probe` calls `start_pass(p)` before sweep p and `all_reduce()`
after every sweep. Sums already reduced are frozen: accumulating into them again raises.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from diagnostics.capture import EMBED, NORM, PE, Stage, iterate_stages, unwrap_model
from diagnostics.distributed import all_reduce_sum_states

_BLOCK_STAGE = re.compile(r"block_(\d+)$")


def stage_order_key(name: str) -> tuple[int, int]:
    """Sort key putting stages in forward order: embed, pe, block_1 .. block_L, norm."""
    if name == EMBED:
        return (0, 0)
    if name == PE:
        return (1, 0)
    match = _BLOCK_STAGE.match(name)
    if match:
        return (2, int(match.group(1)))
    if name == NORM:
        return (3, 0)
    raise ValueError(f"unknown stage name {name!r} (expected embed, pe, block_<i> or norm)")


def ordered_stages(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=stage_order_key)


@dataclass(frozen=True)
class ProbeBatch:
    """What a metric may need about the batch besides the stage's tokens."""

    model: nn.Module  # the unwrapped timm VisionTransformer (in eval mode during the forward)
    images: torch.Tensor  # (B, C, H, W)
    labels: torch.Tensor | None  # (B,) class indices, when the probe set has them
    num_prefix_tokens: int  # CLS + register tokens, which come first in every stage after `embed`
    has_class_token: bool  # the CLS token exists (then it is token 0 of every stage after `embed`)
    grid_size: tuple[int, int]  # patch grid (rows, cols); patch tokens are in row-major order
    indices: torch.Tensor | None = None  # (B,) positions of the images in the whole probe set

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @classmethod
    def from_model(cls, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
                   indices: torch.Tensor | None = None) -> ProbeBatch:
        model = unwrap_model(model)
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is None or not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
            raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer "
                            "(needs patch_embed, blocks, num_prefix_tokens)")
        if hasattr(patch_embed, "dynamic_feat_size"):
            grid = tuple(patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))
        else:
            grid = tuple(patch_embed.grid_size)
        return cls(model=model, images=images, labels=labels, indices=indices,
                   num_prefix_tokens=int(model.num_prefix_tokens),
                   has_class_token=getattr(model, "cls_token", None) is not None,
                   grid_size=(int(grid[0]), int(grid[1])))


class StreamingMetric(abc.ABC):
    """A metric accumulated over probe batches from float64 sums, reduced over ranks, then computed.

    Subclasses implement `update(stage, batch)` (called once per stage per batch, stages in
    forward order) and `compute()`; they store statistics only through `accumulate`.
    """

    name: ClassVar[str]  # key of this metric's results (e.g. "token_similarity")
    needs_attention: ClassVar[bool] = False  # block stages must carry attention probabilities
    num_passes: ClassVar[int] = 1  # sweeps over the probe set

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._reduced: set[str] = set()

    @abc.abstractmethod
    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        """Fold one stage of one batch into the sums."""

    @abc.abstractmethod
    def compute(self) -> dict[str, Any]:
        """Plain results (floats, ints, None, lists, dicts) keyed by stage name, in stage order."""

    def start_pass(self, index: int) -> None:
        """Called before sweep `index` (0-based) of a multi-pass metric; earlier sweeps' sums are reduced."""
        return None  # one-pass metrics need nothing here

    def accumulate(self, key: str, value: torch.Tensor | float) -> None:
        """Add `value` to the float64 sum `key`, created as zeros of `value`'s shape on first use."""
        if key in self._reduced:
            raise RuntimeError(f"{type(self).__name__}: sum {key!r} was already all-reduced; reset() first")
        value = torch.as_tensor(value).detach().to(torch.float64)
        if key in self._sums:
            self._sums[key] += value
        else:
            self._sums[key] = value.clone()

    def sums(self) -> dict[str, torch.Tensor]:
        """The current sums (read-only view by convention)."""
        return self._sums

    def sum(self, key: str) -> torch.Tensor:
        return self._sums[key]

    def stages_seen(self) -> list[str]:
        """Stages that have sums (keys are '<stage>/<statistic>'), in forward order."""
        return ordered_stages(key.split("/", 1)[0] for key in self._sums if "/" in key)

    def all_reduce(self, device: torch.device | str | None = None) -> None:
        """Sum the not-yet-reduced statistics over ranks (no-op in one process); safe to call repeatedly."""
        fresh = {key: value for key, value in self._sums.items() if key not in self._reduced}
        if device is None and self._sums:
            device = next(iter(self._sums.values())).device
        reduced = all_reduce_sum_states(fresh, device=device)
        self._sums.update(reduced)
        self._reduced.update(reduced)


def update_metrics(model: nn.Module, images: torch.Tensor, metrics: Sequence[StreamingMetric],
                   labels: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> None:
    """One stage-by-stage forward of `images`, each stage handed to every metric, then dropped.

    `indices` (global positions in the probe set) let a metric split images deterministically,
    independent of batching and sharding (e.g. a held-out fraction by image).
    """
    batch = ProbeBatch.from_model(model, images, labels, indices)
    attention = any(metric.needs_attention for metric in metrics)
    for stage in iterate_stages(batch.model, images, attention=attention):
        for metric in metrics:
            metric.update(stage, batch)


def compute_metrics(metrics: Sequence[StreamingMetric],
                    device: torch.device | str | None = None) -> dict[str, dict[str, Any]]:
    """All-reduce every metric (collective: call on all ranks), then compute; keyed by metric name."""
    results = {}
    for metric in metrics:
        metric.all_reduce(device=device)
        results[metric.name] = metric.compute()
    return results


def _unpack_probe_item(item: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if not isinstance(item, (tuple, list)):
        return item, None, None
    if not 1 <= len(item) <= 3:
        raise ValueError("a probe batch is images, (images, labels) or (images, labels, indices); "
                         f"got {len(item)} items")
    images, labels, indices = (*item, None, None)[:3]
    return images, labels, indices


ProbeBatches = Iterable[Any] | Callable[[], Iterable[Any]]


def run_probe(model: nn.Module, batches: ProbeBatches, metrics: Sequence[StreamingMetric]) -> dict[str, Any]:
    """Run `metrics` over a probe set and return `{metric.name: metric.compute()}` (same on every rank).

    `batches` yields `images`, `(images, labels)` or `(images, labels, indices)` (labels may be
    None); it must be re-iterable (a DataLoader, a list)
    or a zero-argument callable returning a fresh iterable when some metric needs several passes.
    Images are moved to the model's device.
    """
    device = next(unwrap_model(model).parameters()).device
    for pass_index in range(max((metric.num_passes for metric in metrics), default=0)):
        active = [metric for metric in metrics if pass_index < metric.num_passes]
        for metric in active:
            metric.start_pass(pass_index)
        for item in (batches() if callable(batches) else batches):
            images, labels, indices = _unpack_probe_item(item)
            update_metrics(model, images.to(device), active,
                           labels=None if labels is None else labels.to(device),
                           indices=None if indices is None else indices.to(device))
        for metric in active:
            metric.all_reduce(device=device)
    return {metric.name: metric.compute() for metric in metrics}
