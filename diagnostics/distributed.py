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


def all_reduce_sum_dict(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Sum every tensor of a mapping over ranks (keys must match on all ranks), in a fixed key order."""
    for key in sorted(tensors):
        all_reduce_sum(tensors[key])
    return tensors


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1
