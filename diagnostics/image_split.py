"""A seeded split of probe images into fit / validation / test groups that every process agrees on.

Each image gets a 64-bit key and a uniform number u = hash(seed, key) ∈ [0, 1); the image is

    test        if u < holdout_fraction
    validation  if the rest of u falls in the first `validation_fraction` of the training range
    fit         otherwise

so the groups depend only on (seed, key): not on batching, sharding, order or the number of
processes. Fractions hold in expectation (binomial counts), which is what lets a sharded stream
split without ever seeing the whole probe set; callers report the realised counts.

Keys are the image ids when the batch carries them (`batch.image_ids`, e.g. dataset indices), else
an exact integer hash of the image's pixel bits: identical images get identical keys on every
device, so duplicates never straddle the split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FIT, VALIDATION, TEST = 0, 1, 2
GROUP_NAMES = ("fit", "val", "test")

_HASH_SEED = 0x5EED_D1A6  # fixed: the content hash must not depend on any user seed
_MAX_HASHED_VALUES = 1 << 23  # keeps the exact int64 sums below 2^63 (2^23 · 2^16 · 2^24)
_weights_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a well-mixed 64-bit hash."""
    z = np.asarray(values, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _content_weights(numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (numel, str(device))
    if key not in _weights_cache:
        generator = torch.Generator(device="cpu").manual_seed(_HASH_SEED)
        weights = torch.randint(1, 1 << 24, (2, numel), generator=generator, dtype=torch.int64)
        _weights_cache[key] = (weights[0].to(device), weights[1].to(device))
    return _weights_cache[key]


def content_keys(images: torch.Tensor) -> np.ndarray:
    """Exact 64-bit keys (B,) of the float32 pixel bits of each image: Σ bits·w in integer arithmetic."""
    flat = images.detach().to(torch.float32).reshape(images.shape[0], -1).contiguous()
    if flat.shape[1] > _MAX_HASHED_VALUES:
        raise ValueError(f"images of {flat.shape[1]} values are too large to hash exactly "
                         f"(max {_MAX_HASHED_VALUES}); give the batch `image_ids` instead")
    bits = flat.view(torch.int32).to(torch.int64)
    low_weights, high_weights = _content_weights(flat.shape[1], flat.device)
    low = ((bits & 0xFFFF) * low_weights).sum(1)
    high = (((bits >> 16) & 0xFFFF) * high_weights).sum(1)
    low_np = low.cpu().numpy().astype(np.uint64)
    high_np = high.cpu().numpy().astype(np.uint64)
    return splitmix64(low_np ^ splitmix64(high_np))


def image_keys(batch: Any) -> np.ndarray:
    """Keys (B,) uint64 of a probe batch: its `image_ids` when present, else `content_keys(images)`."""
    ids = getattr(batch, "image_ids", None)
    if ids is None:
        return content_keys(batch.images)
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"image_ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64).view(np.uint64)


def split_groups(keys: np.ndarray, seed: int, holdout_fraction: float,
                 validation_fraction: float) -> np.ndarray:
    """Group codes (FIT, VALIDATION, TEST) for uint64 keys; see the module docstring."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction = {holdout_fraction} must be in (0, 1)")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction = {validation_fraction} must be in (0, 1)")
    seed_hash = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    mixed = splitmix64(np.asarray(keys, dtype=np.uint64) ^ seed_hash)
    uniform = (mixed >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    groups = np.full(uniform.shape, FIT, dtype=np.int64)
    within_train = (uniform - holdout_fraction) / (1.0 - holdout_fraction)
    groups[within_train < validation_fraction] = VALIDATION
    groups[uniform < holdout_fraction] = TEST
    return groups
