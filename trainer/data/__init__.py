"""The data pipeline: recipe -> transforms, datasets, rank-aware loaders, Mixup, probe set.

    bundle = build_data(recipe, accelerator.num_processes, accelerator.process_index)
    for epoch in range(start_epoch, epochs):
        bundle.train_sampler.set_epoch(epoch, skip_batches=batches_done_in_this_epoch)
        for images, targets in bundle.train_loader:          # CPU; .to(device) finishes a TrainBatch there
            images, targets = images.to(device), targets.to(device)
            if bundle.mixup_fn is not None:
                images, targets = bundle.mixup_fn(images, targets)   # soft targets [B, num_classes]
    for images, targets, valid in bundle.eval_loader:        # count only valid items
        ...

The transforms themselves live in `trainer.data.transforms` (the reference, timm's) and
`trainer.data.fast_transform` (the default uint8 training path, finished on the device by
`trainer.data.device_augment`); this module opens the splits and builds datasets and loaders on them.

The loaders are NOT meant for `accelerator.prepare`: the samplers shard over ranks themselves.
Augmentation randomness is a pure function of (train.seed, epoch, position in the epoch): each
training sample seeds `random`, `numpy` and `torch` before its transform (and, in the main
process, restores the caller's RNG state afterwards), so results do not depend on
`data.num_workers` or on where a run was resumed.

Corrupt images: with `data.skip_corrupt: false` the first one raises `DataError` naming the file.
With `true`, an unreadable sample is replaced by the next readable index (wrapping around), the
same way on every run; in evaluation the replacement is marked `valid=False` so it is not
counted. `DataBundle.skipped_corrupt()` returns how many unreadable reads this process (workers
included) has replaced so far, train and eval together; sum it over ranks to log a global count.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from trainer.data.fast_transform import FastTrainTransform, TrainSample, build_fast_train_transform
from trainer.data.samplers import EvalKey, RepeatedAugSampler, ShardedEvalSampler, TrainKey
from trainer.data.sources import CorruptImageError, DataError, RawSplit, load_split
from trainer.data.transforms import build_eval_transform, build_mixup, build_train_transform
from trainer.rng import preserved_rng_state

__all__ = ["DataBundle", "DataError", "build_data", "build_eval_loader", "build_probe_dataset", "preserved_rngs",
           "sample_seed", "seed_rngs"]


class CorruptImageCounter:
    """Unreadable images one dataset has replaced so far, in this process and its loader workers.

    One shared slot per process (the main one, then one per worker id), each written only by its
    owner: no lock, no lost updates, and it works with any multiprocessing start method.
    """

    def __init__(self, num_workers: int = 0) -> None:
        self._slots = multiprocessing.RawArray("q", num_workers + 1)

    def increment(self) -> None:
        worker = get_worker_info()
        self._slots[0 if worker is None else (worker.id + 1) % len(self._slots)] += 1

    def __call__(self) -> int:
        return sum(self._slots)


@dataclass
class DataBundle:
    # (images, targets int64 [B]), drop_last; images float32 [B, C, H, W], or on the fast path a TrainBatch
    # of uint8 images whose .to(device) gives that float32 tensor, finished on the device
    train_loader: DataLoader
    eval_loader: DataLoader  # (images, targets, valid bool [B]); same batch count on every rank
    val_loader: DataLoader | None  # like eval_loader, on the data.val_fraction held out of training; or None
    train_sampler: RepeatedAugSampler  # call .set_epoch(epoch, skip_batches) before each epoch
    eval_sampler: ShardedEvalSampler
    mixup_fn: Mixup | None  # apply on device to (images, targets); None when mixup == cutmix == 0
    num_classes: int  # width of the label space (model.num_classes); >= len(class_names)
    class_names: tuple[str, ...]  # classes found in the training split
    num_train_examples: int  # training split size (before repeated augmentation)
    num_eval_examples: int
    steps_per_epoch: int  # full training batches per process per epoch
    skipped_corrupt: Callable[[], int]  # unreadable images replaced so far (train + eval, this rank)



# --- per-sample seeding -----------------------------------------------------------------------------

def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A well-mixed 63-bit seed for one training sample."""
    words = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, epoch, position]).generate_state(2)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_rngs(seed: int) -> None:
    """Seed `random`, `numpy` and torch's CPU generator (torch.manual_seed would reseed CUDA too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)


@contextmanager
def preserved_rngs() -> Iterator[None]:
    """In the main process, restore `random`, `numpy` and torch's CPU RNG state on exit, so the
    training loop's random stream does not depend on data loading; a worker's RNG is its own.
    (Saving numpy's state costs ~0.15 ms, so batches do it once: see `TrainSet.__getitems__`.)"""
    if get_worker_info() is not None:
        yield
        return
    with preserved_rng_state(cuda=False):  # the per-sample seeding below touches CPU streams only
        yield


class LeaveStopSignalsToMainProcess:
    """`worker_init_fn`: loader workers ignore Ctrl-C, and SIGTERM until the main process exits.

    Slurm preemption and Ctrl-C signal the whole process group; a worker that died of it would
    crash the main process mid-step instead of letting it finish the step and save. But
    multiprocessing's exit hook SIGTERMs and then joins every live worker (persistent loaders
    still referenced when the interpreter exits), so an unconditional SIG_IGN would hang the exit
    forever. The main process therefore sets a shared flag at exit, and a worker honours SIGTERM
    once it is set (exit code 0, so torch does not report a failed worker).
    """

    def __init__(self) -> None:
        self.main_process_exiting = multiprocessing.Event()
        # Registered after multiprocessing's own exit hook (imported by Event), so it runs first.
        atexit.register(self.main_process_exiting.set)

    def __call__(self, worker_id: int) -> None:
        del worker_id
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.main_process_exiting.is_set():
            os._exit(0)


def leave_stop_signals_to_main_process() -> LeaveStopSignalsToMainProcess:
    """One per process: every loader shares its exit flag and its single exit hook."""
    return _signals_of_process(os.getpid())  # keyed by pid: a forked child gets its own flag


@functools.cache
def _signals_of_process(pid: int) -> LeaveStopSignalsToMainProcess:
    return LeaveStopSignalsToMainProcess()


# --- datasets ---------------------------------------------------------------------------------------

def _read(raw: RawSplit, index: int, skip_corrupt: bool, counter: CorruptImageCounter,
          load: Callable[[Dataset, int], tuple[Any, int]] | None = None) -> tuple[Any, int, bool]:
    """(image, target, is_original): the sample at `index`, or with skip_corrupt the next readable one.
    `load(dataset, i)` reads example i (default: `dataset[i]`)."""
    size = len(raw.dataset)
    for offset in range(size):
        try:
            image, target = (load or _getitem)(raw.dataset, (index + offset) % size)
            return image, target, offset == 0
        except CorruptImageError as e:
            if not skip_corrupt:
                raise DataError(f"corrupt image {e} (set data.skip_corrupt=true to skip unreadable images)") from None
            counter.increment()
    raise DataError(f"{raw.description}: no readable image at all")


def _getitem(dataset: Dataset, index: int) -> tuple[Any, int]:
    return dataset[index]


def _encoded(dataset: Dataset, index: int) -> tuple[Any, int]:
    """(EncodedImage, target) where the source keeps its images encoded, else the decoded (image, target)."""
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    encoded = getattr(dataset, "encoded", None)
    return encoded(index) if encoded is not None else dataset[index]


class TrainSet(Dataset):
    """Training samples keyed by `TrainKey`; the transform is seeded from (seed, epoch, position)."""

    def __init__(self, raw: RawSplit, transform: Any, seed: int, skip_corrupt: bool, counter: CorruptImageCounter):
        self.raw, self.transform, self.seed = raw, transform, seed
        self.skip_corrupt, self.counter = skip_corrupt, counter

    def __len__(self) -> int:
        return len(self.raw.dataset)

    def __getitem__(self, key: TrainKey | int) -> tuple[torch.Tensor, int]:
        with preserved_rngs():
            return self._load(key)

    def __getitems__(self, keys: list[TrainKey]) -> list[tuple[torch.Tensor, int]]:
        """A whole batch (the DataLoader's batched fetch), saving the caller's RNG state once."""
        with preserved_rngs():
            return [self._load(key) for key in keys]

    def _load(self, key: TrainKey | int) -> tuple[torch.Tensor, int]:
        if not isinstance(key, TrainKey):
            key = TrainKey(int(key), 0, int(key))
        if isinstance(self.transform, FastTrainTransform):
            # decoding needs the crop box, so the sample is seeded first (anew for a replacement)
            seed = sample_seed(self.seed, key.epoch, key.position)

            def load(dataset: Dataset, index: int) -> tuple[TrainSample, int]:
                item, target = _encoded(dataset, index)
                seed_rngs(seed)
                return self.transform(item), target

            sample, target, _ = _read(self.raw, key.index, self.skip_corrupt, self.counter, load)
            return sample, target
        image, target, _ = _read(self.raw, key.index, self.skip_corrupt, self.counter)
        if self.transform is None:
            return image, target
        seed_rngs(sample_seed(self.seed, key.epoch, key.position))
        return self.transform(image), target


class EvalSet(Dataset):
    """Evaluation samples keyed by `EvalKey`: (image, target, valid)."""

    def __init__(self, raw: RawSplit, transform: Any, skip_corrupt: bool, counter: CorruptImageCounter):
        self.raw, self.transform = raw, transform
        self.skip_corrupt, self.counter = skip_corrupt, counter

    def __len__(self) -> int:
        return len(self.raw.dataset)

    def __getitem__(self, key: EvalKey | int) -> tuple[torch.Tensor, int, bool]:
        if not isinstance(key, EvalKey):
            key = EvalKey(int(key), True)
        image, target, is_original = _read(self.raw, key.index, self.skip_corrupt, self.counter)
        if self.transform is not None:
            image = self.transform(image)
        return image, target, key.valid and is_original


class ProbeSet(Dataset):
    """A fixed list of evaluation indices with the eval transform: (image, target)."""

    def __init__(self, eval_set: EvalSet, indices: list[int]):
        self.eval_set, self.indices = eval_set, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, target, _ = self.eval_set[self.indices[i]]
        return image, target


# --- assembly ---------------------------------------------------------------------------------------

def _eval_set(recipe: Any, raw: RawSplit, counter: CorruptImageCounter) -> EvalSet:
    transform = None if recipe.data.source == "synthetic" else build_eval_transform(recipe)
    return EvalSet(raw, transform, recipe.data.skip_corrupt, counter)


def _check_classes(recipe: Any, *splits: RawSplit) -> None:
    for split in splits:
        if len(split.class_names) > recipe.model.num_classes:
            raise DataError(f"model.num_classes = {recipe.model.num_classes} is smaller than the "
                            f"{len(split.class_names)} classes of {split.description}")


def build_eval_loader(recipe: Any, num_processes: int = 1, process_index: int = 0) -> DataLoader:
    """The eval split only (no training data is opened), sharded exactly once over the processes
    (`--eval-only`)."""
    raw = load_split(recipe, "eval")
    _check_classes(recipe, raw)
    dataset = _eval_set(recipe, raw, CorruptImageCounter(recipe.data.num_workers))
    return DataLoader(dataset, batch_size=recipe.eval.batch_size,
                      sampler=ShardedEvalSampler(len(dataset), num_processes, process_index),
                      num_workers=recipe.data.num_workers,
                      pin_memory=recipe.data.pin_memory and torch.cuda.is_available())


def hold_out(raw: RawSplit, fraction: float, seed: int) -> tuple[RawSplit, RawSplit]:
    """(training, validation): a seeded random `fraction` of `raw`'s examples for validation (P3's per-seed
    80/20 split of the downstream training set)."""
    order = torch.randperm(len(raw.dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    count = round(fraction * len(order))
    if not 0 < count < len(order):
        raise DataError(f"data.val_fraction = {fraction} of the {len(order)} examples of {raw.description} leaves "
                        "no validation or no training example")
    validation, training = sorted(order[:count]), sorted(order[count:])
    return (RawSplit(Subset(raw.dataset, training), raw.class_names, f"{raw.description} (training part)"),
            RawSplit(Subset(raw.dataset, validation), raw.class_names,
                     f"{raw.description} (validation part: {fraction:g}, seed {seed})"))


def build_data(recipe: Any, num_processes: int = 1, process_index: int = 0) -> DataBundle:
    """Datasets, rank-aware loaders and Mixup for process `process_index` of `num_processes`."""
    d, t = recipe.data, recipe.train
    train_raw, eval_raw = load_split(recipe, "train"), load_split(recipe, "eval")
    _check_classes(recipe, train_raw, eval_raw)
    val_raw = None
    if d.val_fraction is not None:
        train_raw, val_raw = hold_out(train_raw, d.val_fraction, t.seed)
    mixup_fn = build_mixup(recipe)
    if mixup_fn is not None and t.batch_size % 2:
        raise DataError(f"train.batch_size = {t.batch_size} must be even when augment.mixup or augment.cutmix > 0")

    train_counter, eval_counter = CorruptImageCounter(d.num_workers), CorruptImageCounter(d.num_workers)
    train_transform = None
    if d.source != "synthetic":  # data.fast_path (recipe knob; default on): uint8 batches finished on the device
        fast = build_fast_train_transform(recipe) if d.fast_path else None
        train_transform = fast or build_train_transform(recipe)
    train_set = TrainSet(train_raw, train_transform, t.seed, d.skip_corrupt, train_counter)
    eval_set = _eval_set(recipe, eval_raw, eval_counter)
    val_set = None if val_raw is None else _eval_set(recipe, val_raw, eval_counter)
    train_sampler = RepeatedAugSampler(len(train_set), t.batch_size, num_processes, process_index,
                                       repeats=recipe.augment.repeated_aug, seed=t.seed)
    if train_sampler.steps_per_epoch == 0:
        raise DataError(f"{train_raw.description} has {len(train_set)} examples, fewer than one global batch "
                        f"(train.batch_size = {t.batch_size} x {num_processes} processes)")
    eval_sampler = ShardedEvalSampler(len(eval_set), num_processes, process_index)

    worker_init_fn = leave_stop_signals_to_main_process() if d.num_workers > 0 else None

    def loader(dataset: Dataset, sampler: Any, batch_size: int, drop_last: bool, collate_fn: Any = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=d.num_workers,
            collate_fn=collate_fn,
            pin_memory=d.pin_memory and torch.cuda.is_available(), persistent_workers=d.num_workers > 0,
            # Own generator: the loader draws its worker base seed from it, not from the global RNG.
            generator=torch.Generator().manual_seed(t.seed * 7919 + process_index),
            worker_init_fn=worker_init_fn)

    return DataBundle(
        train_loader=loader(train_set, train_sampler, t.batch_size, True,
                            train_transform.collate if isinstance(train_transform, FastTrainTransform) else None),
        eval_loader=loader(eval_set, eval_sampler, recipe.eval.batch_size, False),
        val_loader=None if val_set is None else loader(
            val_set, ShardedEvalSampler(len(val_set), num_processes, process_index), recipe.eval.batch_size, False),
        train_sampler=train_sampler, eval_sampler=eval_sampler, mixup_fn=mixup_fn,
        num_classes=recipe.model.num_classes, class_names=train_raw.class_names,
        num_train_examples=len(train_set), num_eval_examples=len(eval_set),
        steps_per_epoch=train_sampler.steps_per_epoch,
        skipped_corrupt=lambda: train_counter() + eval_counter())


def build_probe_dataset(recipe: Any, size: int, seed: int) -> Dataset:
    """A fixed, seeded subset of the eval split with the eval transform, yielding (image, target).

    The same `seed` gives the same images in the same (shuffled, class-mixed) order at every
    checkpoint; `size` larger than the split gives all of it.
    """
    eval_set = _eval_set(recipe, load_split(recipe, "eval"), CorruptImageCounter())
    order = torch.randperm(len(eval_set), generator=torch.Generator().manual_seed(seed))
    return ProbeSet(eval_set, order[:size].tolist())
