"""Summing streaming statistics across processes.

Metrics accumulate sufficient statistics (sums, counts, second moments) locally, in float64,
then `all_reduce_sum` adds them over all ranks once, before `compute()`. Without an
initialised process group (one process) these are no-ops, so the same code runs everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns the tensor for chaining."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sum_states(states: Mapping[str, torch.Tensor],
                          device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Sum named float64 statistics over ranks, tolerating ranks that never created some of them.

    A rank whose probe shard was empty (or never reached a stage) has fewer keys; the union of
    keys and shapes is agreed first (one small `all_gather_object`), missing statistics enter as
    zeros, and all of them travel in ONE flat float64 buffer (one collective, not one per key).
    Shapes of the same key must agree across ranks. Returns a new dict in sorted key order, on
    `device` (default: the device of the given tensors, else CPU; NCCL needs the rank's GPU).
    """
    if device is None:
        device = next(iter(states.values())).device if states else torch.device("cpu")
    if not is_distributed():
        return {key: states[key].to(device=device, dtype=torch.float64) for key in sorted(states)}
    local_shapes = {key: tuple(value.shape) for key, value in states.items()}
    gathered: list[dict[str, tuple[int, ...]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local_shapes)
    shapes: dict[str, tuple[int, ...]] = {}
    for rank_shapes in gathered:
        for key, shape in (rank_shapes or {}).items():
            if shapes.setdefault(key, shape) != shape:
                raise ValueError(f"statistic {key!r} has shape {shape} on one rank "
                                 f"and {shapes[key]} on another")
    keys = sorted(shapes)
    if not keys:
        return {}
    flat = torch.cat([
        (states[key].to(device=device, dtype=torch.float64) if key in states
         else torch.zeros(shapes[key], dtype=torch.float64, device=device)).reshape(-1)
        for key in keys
    ])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    reduced, offset = {}, 0
    for key in keys:
        size = int(torch.Size(shapes[key]).numel())
        reduced[key] = flat[offset:offset + size].reshape(shapes[key])
        offset += size
    return reduced


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1
