"""Rank-aware samplers: repeated augmentation for training, exact-once sharding for evaluation.

Both samplers know the number of processes and their own rank, so the training loop hands its
loaders to no `accelerator.prepare` (which would re-wrap the sampler and break repeated
augmentation, the reason timm's RepeatAugSampler only works with timm's own loader).

They yield keys rather than bare indices: a `TrainKey` carries the epoch and the sample's position
in the epoch's global order, so the dataset can seed its augmentation from (seed, epoch, position)
and a resumed run draws exactly the augmentations the uninterrupted run would have drawn. An
`EvalKey` says whether a slot is a real example or padding that keeps the ranks in step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Sampler


class TrainKey(NamedTuple):
    index: int  # dataset index
    epoch: int
    position: int  # position in the epoch's global (all-rank) sample order; unique within an epoch


class EvalKey(NamedTuple):
    index: int
    valid: bool  # False for padding slots, which must not be counted


class RepeatedAugSampler(Sampler[TrainKey]):
    """DeiT's RASampler, made rank-aware, batch-exact, deterministic per epoch and resumable.

    Per epoch: a permutation of the dataset seeded with `seed + epoch`, each index repeated
    `repeats` times in a row, the sequence cut to `steps_per_epoch * batch_size * num_replicas`
    samples (about one dataset's worth, so an epoch keeps its usual length and sees about
    1/repeats of the images, each `repeats` times) and dealt round-robin over the ranks, so the
    copies of one image land on different ranks whenever repeats <= num_replicas. With
    repeats == 1 this is a plain shuffled distributed sampler that drops the incomplete tail.

    Every rank yields exactly `steps_per_epoch * batch_size` keys, so with `drop_last=True`
    batches no sample is silently dropped and all ranks run the same number of steps.
    `set_epoch(epoch, skip_batches)` starts the epoch `skip_batches` batches in; the skipped keys
    are never yielded, so their images are never loaded.
    """

    def __init__(self, dataset_size: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 repeats: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if repeats < 1 or batch_size < 1:
            raise ValueError(f"repeats ({repeats}) and batch_size ({batch_size}) must be >= 1")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.repeats = repeats
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.skip_batches = 0

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per rank per epoch (the global epoch covers at most `dataset_size` samples)."""
        return self.dataset_size // (self.batch_size * self.num_replicas)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if not 0 <= skip_batches <= self.steps_per_epoch:
            raise ValueError(f"skip_batches = {skip_batches} is outside [0, {self.steps_per_epoch}]")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def global_order(self) -> torch.Tensor:
        """Dataset indices of this epoch in global order (all ranks), before dealing to ranks."""
        total = self.steps_per_epoch * self.batch_size * self.num_replicas
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        unique = math.ceil(total / self.repeats)
        return order[:unique].repeat_interleave(self.repeats)[:total]

    def __iter__(self) -> Iterator[TrainKey]:
        order = self.global_order()
        positions = range(self.rank, len(order), self.num_replicas)
        start = self.skip_batches * self.batch_size
        for position in positions[start:]:
            yield TrainKey(int(order[position]), self.epoch, position)

    def __len__(self) -> int:
        """Keys left in the current epoch after `skip_batches` (what one iteration yields)."""
        return (self.steps_per_epoch - self.skip_batches) * self.batch_size


class ShardedEvalSampler(Sampler[EvalKey]):
    """Every example exactly once over all ranks, and the same number of slots on every rank.

    Rank r takes indices r, r + W, r + 2W, ...; ranks with one example fewer get a padding slot
    (`valid=False`, pointing at a real index so it loads like any other). Equal slot counts mean
    equal batch counts, so collectives inside the evaluation step (FSDP, DeepSpeed, gather) cannot
    hang; metrics must count only `valid` items.
    """

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        if dataset_size < 1:
            raise ValueError("cannot shard an empty evaluation set")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[EvalKey]:
        indices = range(self.rank, self.dataset_size, self.num_replicas)
        for index in indices:
            yield EvalKey(index, True)
        for _ in range(len(self) - len(indices)):
            yield EvalKey(0, False)

    def __len__(self) -> int:
        return math.ceil(self.dataset_size / self.num_replicas)
