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
with it) set `num_passes` (a class default that an instance may override: ISI's depends on how
many stage groups its memory budget allows); `run_probe` calls `start_pass(p)` before sweep p
and `all_reduce()` after every sweep. Sums already reduced are frozen: accumulating into them
again raises; `discard(keys)` drops sums a metric no longer needs (e.g. after deriving a basis).
The later sweeps replay the first sweep's stage tokens instead of running the forward again when they
all fit in `replay_bytes` (default 256 MiB, a recipe's `diagnostics.stage_replay_gb`; the demo's 200
probe images take 30 MB, saving one forward per evaluation; a ViT-B probe set takes far more, so there
the forward runs again).

Image ids: a probe batch may carry integer ids of its images (e.g. their dataset indices),
`(images, labels, ids)`. Metrics that split images (ISI's fit/validation/test groups) key on
them, so the split is exact and identical on every process whatever the batching or sharding;
without ids they hash the pixels.

Results are keyed by `metric.name`. Two instances of one class in one run need distinct names:
set `metric.name = "isi_literal"` on the instance (run_probe refuses duplicates).

The all-reduce packs a metric's fresh sums into buckets of at most `REDUCE_BUCKET_BYTES`
(1 GiB; a single larger sum travels alone), so reducing costs one bucket of extra memory, not a
second copy of every sum.
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
from diagnostics.distributed import all_reduce_sum_states, is_distributed

REDUCE_BUCKET_BYTES = 1 << 30
DEFAULT_REPLAY_BYTES = 256 << 20

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
    indices: torch.Tensor | None = None  # (B,) integer image ids (e.g. dataset indices), unique per image

    @property
    def image_ids(self) -> torch.Tensor | None:
        """The ids metrics key image splits on (`diagnostics.image_split.image_keys`): `indices`."""
        return self.indices

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

    def discard(self, keys: Iterable[str]) -> None:
        """Drop the named sums (reduced or not); unknown keys are ignored."""
        for key in list(keys):
            self._sums.pop(key, None)
            self._reduced.discard(key)

    def all_reduce(self, device: torch.device | str | None = None,
                   bucket_bytes: int = REDUCE_BUCKET_BYTES) -> None:
        """Sum the not-yet-reduced statistics over ranks (no-op in one process); safe to call repeatedly.

        Collective: every rank calls it, even one whose shard was empty (its missing sums count as zeros).
        """
        fresh = {key: value for key, value in self._sums.items() if key not in self._reduced}
        if device is None and self._sums:
            device = next(iter(self._sums.values())).device
        for bucket in _reduce_buckets(fresh, bucket_bytes):
            # popped, so this bucket's unreduced sums are freed before the next bucket is packed
            packed = {key: fresh.pop(key) for key in bucket if key in fresh}
            reduced = all_reduce_sum_states(packed, device=device)
            del packed
            self._sums.update(reduced)
            self._reduced.update(reduced)


def _agreed_shapes(states: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape over the union of every rank's keys (one small all_gather_object when distributed)."""
    local = {key: tuple(value.shape) for key, value in states.items()}
    if not is_distributed():
        return local
    gathered: list[dict[str, tuple[int, ...]] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return {key: shape for rank_shapes in gathered for key, shape in (rank_shapes or {}).items()}


def _reduce_buckets(states: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Sorted keys cut into consecutive buckets of at most `bucket_bytes` float64 bytes, same on every rank."""
    buckets: list[list[str]] = []
    size = 0
    for key, shape in sorted(_agreed_shapes(states).items()):
        nbytes = 8 * int(torch.Size(shape).numel())
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(key)
        size += nbytes
    return buckets


def update_metrics(model: nn.Module, images: torch.Tensor, metrics: Sequence[StreamingMetric],
                   labels: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> None:
    """One stage-by-stage forward of `images`, each stage handed to every metric, then dropped.

    `indices` (integer image ids, e.g. dataset indices) let a metric split images deterministically,
    independent of batching and sharding (e.g. a held-out fraction by image). Metric updates run
    under `torch.no_grad()` (they may call model parts, e.g. the head).
    """
    _forward_into_metrics(ProbeBatch.from_model(model, images, labels, indices), metrics)


def _forward_into_metrics(batch: ProbeBatch, metrics: Sequence[StreamingMetric],
                          replay: StageReplay | None = None) -> None:
    attention = any(metric.needs_attention for metric in metrics)
    kept: list[Stage] = []
    with torch.no_grad():
        for stage in iterate_stages(batch.model, batch.images, attention=attention):
            for metric in metrics:
                metric.update(stage, batch)
            if replay is not None and replay.batches is not None:
                kept.append(Stage(stage.name, stage.tokens))  # tokens only: no later sweep needs attention
    if replay is not None:
        replay.record(batch, kept)


class StageReplay:
    """The first sweep's stage tokens per batch, kept for the later sweeps while they fit in `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes, self.bytes = budget_bytes, 0
        self.batches: list[tuple[ProbeBatch, list[Stage]]] | None = []  # None once over budget

    def record(self, batch: ProbeBatch, stages: list[Stage]) -> None:
        if self.batches is None:
            return
        self.bytes += sum(stage.tokens.numel() * stage.tokens.element_size() for stage in stages)
        if self.bytes > self.budget_bytes:
            self.batches = None  # dropped: the later sweeps run the forward again
        else:
            self.batches.append((batch, stages))

    def replay_into(self, metrics: Sequence[StreamingMetric]) -> None:
        with torch.no_grad():
            for batch, stages in self.batches or []:
                for stage in stages:
                    for metric in metrics:
                        metric.update(stage, batch)


def check_unique_names(metrics: Sequence[StreamingMetric]) -> None:
    """Results are keyed by `metric.name`: refuse two metrics that would overwrite each other."""
    seen: set[str] = set()
    for metric in metrics:
        if metric.name in seen:
            raise ValueError(f"two metrics are named {metric.name!r}; give one a distinct name "
                             f"(e.g. metric.name = '{metric.name}_2') so their results do not collide")
        seen.add(metric.name)


def compute_metrics(metrics: Sequence[StreamingMetric],
                    device: torch.device | str | None = None) -> dict[str, dict[str, Any]]:
    """All-reduce every metric (collective: call on all ranks), then compute; keyed by metric name."""
    check_unique_names(metrics)
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


def run_probe(model: nn.Module, batches: ProbeBatches, metrics: Sequence[StreamingMetric],
              replay_bytes: int = DEFAULT_REPLAY_BYTES) -> dict[str, Any]:
    """Run `metrics` over a probe set and return `{metric.name: metric.compute()}` (same on every rank).

    `batches` yields `images`, `(images, labels)` or `(images, labels, ids)` (labels may be
    None; ids are integer image ids, see the module docstring); it must be re-iterable (a DataLoader, a list)
    or a zero-argument callable returning a fresh iterable when some metric needs several passes.
    Images are moved to the model's device. Later passes replay the first pass's stage tokens when they
    fit in `replay_bytes` on this process (0: always run the forward again).
    """
    check_unique_names(metrics)
    device = next(unwrap_model(model).parameters()).device
    num_passes = max((metric.num_passes for metric in metrics), default=0)
    replay = StageReplay(replay_bytes) if num_passes > 1 and replay_bytes > 0 else None
    for pass_index in range(num_passes):
        active = [metric for metric in metrics if pass_index < metric.num_passes]
        for metric in active:
            metric.start_pass(pass_index)
        if pass_index > 0 and replay is not None and replay.batches is not None and not any(
                metric.needs_attention for metric in active):
            replay.replay_into(active)
        else:
            for item in (batches() if callable(batches) else batches):
                images, labels, indices = _unpack_probe_item(item)
                batch = ProbeBatch.from_model(model, images.to(device),
                                              None if labels is None else labels.to(device),
                                              None if indices is None else indices.to(device))
                _forward_into_metrics(batch, active, replay if pass_index == 0 else None)
        for metric in active:
            metric.all_reduce(device=device)
    return {metric.name: metric.compute() for metric in metrics}
