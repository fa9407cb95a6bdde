"""Data pipeline: sources, transforms, Mixup, samplers, per-sample seeding, bad data, probe set."""

import copy
import os
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader

from models.errors import UserError
from trainer.data import DataError, build_data, build_probe_dataset, sample_seed
from trainer.data.fast_transform import TrainBatch
from trainer.data.samplers import RepeatedAugSampler, ShardedEvalSampler
from trainer.data.sources import load_split
from trainer.data.transforms import build_eval_transform, build_mixup, build_train_transform
from trainer.recipe import recipe_from_dict

BASE = {
    "model": {"num_classes": 10, "img_size": 16, "in_chans": 3},
    "data": {"source": "digits", "num_workers": 0, "pin_memory": False},
    "augment": {"auto_augment": None, "reprob": 0.0, "mixup": 0.0, "cutmix": 0.0, "repeated_aug": 1,
                "crop_pct": 1.0},
    "train": {"batch_size": 16, "seed": 0},
    "eval": {"batch_size": 32},
}


def make_recipe(**sections):
    data = copy.deepcopy(BASE)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return recipe_from_dict(data)


def batches(loader, count=None):
    """The loader's batches, training batches finished (TrainBatch.to: what the step does on its device)."""
    out = []
    iterator = iter(loader)
    try:
        for i, batch in enumerate(iterator):
            if count is not None and i == count:
                break
            if isinstance(batch[0], TrainBatch):
                batch = (batch[0].to("cpu"), *batch[1:])
            out.append(batch)
    except BaseException:
        # A raised error's traceback keeps the iterator in a reference cycle: shut its workers down now
        # (see close_workers)
        getattr(iterator, "_shutdown_workers", lambda: None)()
        raise
    return out


# --- digits -----------------------------------------------------------------------------------------

def test_digits_split_is_fixed_stratified_and_seeded():
    recipe = make_recipe()
    train, test = load_split(recipe, "train"), load_split(recipe, "eval")
    assert (len(train.dataset), len(test.dataset)) == (1347, 450)
    again = load_split(make_recipe(), "train")
    assert np.array_equal(train.dataset.pixels, again.dataset.pixels)
    assert np.array_equal(train.dataset.labels, again.dataset.labels)
    counts_train, counts_test = Counter(train.dataset.labels.tolist()), Counter(test.dataset.labels.tolist())
    for c in range(10):  # stratified: each class split 3:1 to within one example
        total = counts_train[c] + counts_test[c]
        assert abs(counts_test[c] - 0.25 * total) <= 1
    other = load_split(make_recipe(data={"split_seed": 1}), "eval")
    assert not np.array_equal(other.dataset.pixels, test.dataset.pixels)
    image, label = train.dataset[0]
    assert image.mode == "RGB" and image.size == (8, 8) and 0 <= label < 10
    assert np.asarray(image).max() <= 255 and np.asarray(image).dtype == np.uint8
    gray, _ = load_split(make_recipe(model={"in_chans": 1}, augment={"mean": [0.5], "std": [0.5]}), "train").dataset[0]
    assert gray.mode == "L"


def test_digits_bundle_shapes_and_dtypes():
    bundle = build_data(make_recipe())
    assert bundle.num_train_examples == 1347 and bundle.num_eval_examples == 450 and bundle.num_classes == 10
    assert bundle.steps_per_epoch == 1347 // 16 == len(bundle.train_loader)
    images, targets = batches(bundle.train_loader, 1)[0]
    assert images.shape == (16, 3, 16, 16) and images.dtype == torch.float32 and targets.dtype == torch.int64
    evaluated = batches(bundle.eval_loader)
    assert sum(int(valid.sum()) for _, _, valid in evaluated) == 450
    assert all(valid.dtype == torch.bool for _, _, valid in evaluated)
    assert bundle.skipped_corrupt() == 0


# --- transforms and mixup ---------------------------------------------------------------------------

def test_train_transform_follows_the_recipe():
    with_ra = build_train_transform(make_recipe(augment={"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25}))
    kinds = [type(t) for t in with_ra.transforms]
    assert RandAugment in kinds and RandomErasing in kinds
    plain = build_train_transform(make_recipe())
    kinds = [type(t) for t in plain.transforms]
    assert RandAugment not in kinds and RandomErasing not in kinds
    erasing = next(t for t in with_ra.transforms if isinstance(t, RandomErasing))
    assert erasing.probability == 0.25 and erasing.mode == "pixel"


def test_eval_transform_crops_to_img_size_after_resizing_by_crop_pct():
    transform = build_eval_transform(make_recipe(model={"img_size": 24}, augment={"crop_pct": 0.75}))
    resize = transform.transforms[0]
    assert resize.size == 32  # 24 / 0.75
    out = transform(Image.new("RGB", (50, 40)))
    assert out.shape == (3, 24, 24)


def test_mismatched_normalisation_is_a_data_error():
    with pytest.raises(DataError, match=r"augment.mean.*model.in_chans = 1"):
        build_train_transform(make_recipe(model={"in_chans": 1}))


@pytest.mark.parametrize(("mixup", "cutmix", "created"), [(0.0, 0.0, False), (0.8, 0.0, True),
                                                          (0.0, 1.0, True), (0.8, 1.0, True)])
def test_mixup_is_created_iff_an_alpha_is_positive(mixup, cutmix, created):
    recipe = make_recipe(augment={"mixup": mixup, "cutmix": cutmix, "label_smoothing": 0.1})
    fn = build_mixup(recipe)
    assert (fn is not None) == created
    if created:
        x, y = fn(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))


def test_odd_batch_with_mixup_is_rejected():
    with pytest.raises(DataError, match="train.batch_size = 15 must be even"):
        build_data(make_recipe(train={"batch_size": 15}, augment={"mixup": 0.8}))


# --- samplers ---------------------------------------------------------------------------------------

def rank_keys(size, batch, world, repeats, epoch, seed=0, skip=0):
    out = []
    for rank in range(world):
        sampler = RepeatedAugSampler(size, batch, world, rank, repeats=repeats, seed=seed)
        sampler.set_epoch(epoch, skip)
        keys = list(sampler)
        assert len(keys) == len(sampler)
        out.append(keys)
    return out


@settings(max_examples=40, deadline=None)
@given(size=st.integers(24, 300), batch=st.integers(1, 8), world=st.integers(1, 4), repeats=st.integers(1, 4),
       epoch=st.integers(0, 5))
def test_repeated_aug_sampler_properties(size, batch, world, repeats, epoch):
    per_rank = rank_keys(size, batch, world, repeats, epoch)
    steps = size // (batch * world)
    assert all(len(keys) == steps * batch for keys in per_rank)  # equal, batch-exact, <= one dataset
    copies = Counter(k.index for keys in per_rank for k in keys)
    # every drawn image appears `repeats` times, except at most one cut at the end of the epoch
    assert sum(n != repeats for n in copies.values()) <= 1 and max(copies.values(), default=0) <= repeats
    positions = [k.position for keys in per_rank for k in keys]
    assert len(set(positions)) == len(positions)
    if repeats <= world:  # copies of one image land on different ranks
        ranks_of = {}
        for rank, keys in enumerate(per_rank):
            for k in keys:
                assert rank not in ranks_of.setdefault(k.index, set())
                ranks_of[k.index].add(rank)
    # same epoch, same order; skip_batches yields exactly the tail
    assert rank_keys(size, batch, world, repeats, epoch) == per_rank
    skip = steps // 2
    tails = rank_keys(size, batch, world, repeats, epoch, skip=skip)
    assert tails == [keys[skip * batch:] for keys in per_rank]


def test_repeated_aug_sampler_reshuffles_per_epoch_and_repeats_every_index():
    e0 = rank_keys(300, 10, 3, 3, epoch=0)
    e1 = rank_keys(300, 10, 3, 3, epoch=1)
    assert [k.index for k in e0[0]] != [k.index for k in e1[0]]
    copies = Counter(k.index for keys in e0 for k in keys)
    assert set(copies.values()) == {3} and len(copies) == 100
    # repeats == 1: a plain shuffled distributed sampler, every rank disjoint
    plain = rank_keys(300, 10, 3, 1, epoch=0)
    indices = [k.index for keys in plain for k in keys]
    assert sorted(indices) == list(range(300)) and indices != list(range(300))


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 200), world=st.integers(2, 3), batch=st.integers(1, 17))
def test_eval_sharding_counts_every_example_once_with_equal_batches(size, world, batch):
    valid, batch_counts = [], set()
    for rank in range(world):
        sampler = ShardedEvalSampler(size, world, rank)
        keys = list(sampler)
        valid += [k.index for k in keys if k.valid]
        loader = DataLoader(keys, batch_size=batch, collate_fn=list)
        batch_counts.add(len(batches(loader)))
    assert sorted(valid) == list(range(size))
    assert len(batch_counts) == 1


def test_eval_loader_over_ranks_counts_each_example_once():
    recipe = make_recipe(data={"source": "synthetic", "synthetic_eval_size": 37}, eval={"batch_size": 5})
    total, batch_counts, labels = 0, set(), []
    for rank in range(3):
        bundle = build_data(recipe, num_processes=3, process_index=rank)
        got = batches(bundle.eval_loader)
        batch_counts.add(len(got))
        total += sum(int(v.sum()) for _, _, v in got)
        labels += [int(t) for _, ts, v in got for t in ts[v]]
    assert total == 37 and len(batch_counts) == 1
    eval_set = bundle.eval_loader.dataset
    assert sorted(labels) == sorted(eval_set[i][1] for i in range(37))


# --- determinism ------------------------------------------------------------------------------------

AUGMENTED = {"augment": {"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.5, "hflip": 0.5, "repeated_aug": 2}}


def test_augmentation_is_independent_of_workers_and_resume_point():
    recipe = make_recipe(**AUGMENTED)
    bundle = build_data(recipe)
    bundle.train_sampler.set_epoch(3)
    full = batches(bundle.train_loader, 4)
    bundle.train_sampler.set_epoch(3, skip_batches=2)
    resumed = batches(bundle.train_loader, 2)
    for (x, y), (rx, ry) in zip(full[2:], resumed, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # repeated copies of one image in a batch get different augmentations
    assert not torch.equal(full[0][0][0], full[0][0][1]) and full[0][1][0] == full[0][1][1]

    recipe_workers = make_recipe(**AUGMENTED, data={"num_workers": 2})
    with_workers = build_data(recipe_workers)
    with_workers.train_sampler.set_epoch(3)
    for (x, y), (wx, wy) in zip(full, batches(with_workers.train_loader, 4), strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)

    bundle.train_sampler.set_epoch(4)
    assert not torch.equal(batches(bundle.train_loader, 1)[0][0], full[0][0])


def test_loading_leaves_the_callers_random_streams_untouched():
    bundle = build_data(make_recipe(**AUGMENTED))
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    batches(bundle.train_loader, 2)
    batches(bundle.eval_loader, 1)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1][1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_sample_seeds_differ_across_epoch_and_position():
    seeds = {sample_seed(0, e, p) for e in range(5) for p in range(200)}
    assert len(seeds) == 1000 and sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(1, 1, 2)


# --- image folders and bad data ---------------------------------------------------------------------

def write_image_folder(root, splits={"train": 4, "val": 2}, classes=("cat", "dog", "eel")):  # noqa: B006
    rng = np.random.default_rng(0)
    for split, per_class in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def folder_recipe(root, **data):
    return make_recipe(data={"source": "imagefolder", "root": str(root), **data}, train={"batch_size": 4},
                       eval={"batch_size": 4})


def test_imagefolder_source(tmp_path):
    root = write_image_folder(tmp_path)
    bundle = build_data(folder_recipe(root))
    assert bundle.class_names == ("cat", "dog", "eel")
    assert bundle.num_train_examples == 12 and bundle.num_eval_examples == 6 and bundle.steps_per_epoch == 3
    images, targets = batches(bundle.train_loader, 1)[0]
    assert images.shape == (4, 3, 16, 16) and set(targets.tolist()) <= {0, 1, 2}
    labels = sorted(int(t) for _, ts, v in bundle.eval_loader for t in ts[v])
    assert labels == [0, 0, 1, 1, 2, 2]
    # the source pickles (spawned workers, the macOS/Windows start method, receive it by pickle)
    raw = bundle.train_loader.dataset.raw.dataset
    copied = pickle.loads(pickle.dumps(raw))
    assert np.array_equal(np.asarray(copied[5][0]), np.asarray(raw[5][0])) and copied[5][1] == raw[5][1]


def test_eval_folder_missing_a_class_keeps_the_training_label_indices(tmp_path):
    root = write_image_folder(tmp_path)
    for f in (root / "val" / "cat").iterdir():
        f.unlink()
    (root / "val" / "cat").rmdir()
    labels = sorted(int(t) for _, ts, v in build_data(folder_recipe(root)).eval_loader for t in ts[v])
    assert labels == [1, 1, 2, 2]


def test_missing_root_or_split_names_the_path(tmp_path):
    root = write_image_folder(tmp_path, splits={"train": 4})
    with pytest.raises(DataError, match=rf"data.root: {root / 'val'} not found .*split 'val'"):
        build_data(folder_recipe(root))
    with pytest.raises(DataError, match="data.root: .*nowhere/train not found"):
        build_data(folder_recipe(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="data.root is required"):
        build_data(make_recipe(data={"source": "imagefolder"}))
    assert issubclass(DataError, UserError)  # entry points print it as one line and exit 2


def test_too_few_model_classes_names_both(tmp_path):
    root = write_image_folder(tmp_path)
    with pytest.raises(DataError, match=r"model.num_classes = 2 is smaller than the 3 classes of .*train"):
        build_data(make_recipe(model={"num_classes": 2}, data={"source": "imagefolder", "root": str(root)}))


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path)
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    truncated = root / "val" / "eel" / "truncated.png"
    truncated.write_bytes((root / "val" / "eel" / "0.png").read_bytes()[:60])

    bundle = build_data(folder_recipe(root))
    with pytest.raises(DataError, match="corrupt image .*broken.jpg"):
        batches(bundle.train_loader)
    with pytest.raises(DataError, match="corrupt image .*truncated.png"):
        batches(bundle.eval_loader)
    in_worker = build_data(folder_recipe(root, num_workers=1))
    with pytest.raises(DataError) as caught:
        batches(in_worker.train_loader)
    assert str(caught.value).startswith("corrupt image") and "broken.jpg" in str(caught.value)

    skipping = build_data(folder_recipe(root, skip_corrupt=True))
    trained = batches(skipping.train_loader)
    assert len(trained) == skipping.steps_per_epoch == 3 and skipping.skipped_corrupt() >= 1
    before = skipping.skipped_corrupt()
    valid = sum(int(v.sum()) for _, _, v in skipping.eval_loader)
    assert valid == 6 and skipping.skipped_corrupt() == before + 1  # the replacement is not counted
    in_worker = build_data(folder_recipe(root, skip_corrupt=True, num_workers=1))
    assert len(batches(in_worker.train_loader)) == 3 and in_worker.skipped_corrupt() == skipping.skipped_corrupt() - 1
    close_workers(in_worker)


def close_workers(bundle) -> None:
    """Shut a bundle's persistent loader workers down now: left to the cyclic GC, their queues may be
    finalised first, and each worker's join then waits torch's 5 s timeout."""
    for loader in (bundle.train_loader, bundle.eval_loader):
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()


# --- hf ---------------------------------------------------------------------------------------------

def save_hf_dataset(path):
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "note": datasets.Value("string")})

    def split(n):
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)) for _ in range(n)],
             "fine_label": [i % 3 for i in range(n)], "note": ["x"] * n}, features=features)

    datasets.DatasetDict({"train": split(12), "test": split(5)}).save_to_disk(str(path))
    return path


def test_hf_source_from_a_saved_dataset_dict(tmp_path):
    root = save_hf_dataset(tmp_path / "ds")
    recipe = make_recipe(data={"source": "hf", "root": str(root), "eval_split": "test", "image_column": "img",
                               "label_column": "fine_label"}, train={"batch_size": 4})
    bundle = build_data(recipe)
    assert bundle.class_names == ("a", "b", "c") and bundle.num_train_examples == 12
    images, targets = batches(bundle.train_loader, 1)[0]
    assert images.shape == (4, 3, 16, 16) and targets.dtype == torch.int64
    labels = sorted(int(t) for _, ts, v in bundle.eval_loader for t in ts[v])
    assert labels == [0, 0, 1, 1, 2]
    raw = bundle.train_loader.dataset.raw.dataset
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(raw))[7][0]), np.asarray(raw[7][0]))

    with pytest.raises(DataError, match=r"data.label_column = 'label' is not a column .*fine_label"):
        build_data(make_recipe(data={"source": "hf", "root": str(root), "eval_split": "test", "image_column": "img"}))
    with pytest.raises(DataError, match=r"has no split 'val' \(splits: \['test', 'train'\]\)"):
        build_data(make_recipe(data={"source": "hf", "root": str(root), "image_column": "img",
                                     "label_column": "fine_label"}))


# --- probe set --------------------------------------------------------------------------------------

def test_probe_set_is_fixed_by_its_seed():
    recipe = make_recipe()
    a, b, c = (build_probe_dataset(recipe, 20, seed) for seed in (0, 0, 1))
    assert len(a) == 20 and a.indices == b.indices != c.indices
    assert torch.equal(a[3][0], b[3][0]) and a[3][0].shape == (3, 16, 16)
    assert len(set(a.indices)) == 20 and len({a[i][1] for i in range(20)}) > 1  # class-mixed
    assert sorted(build_probe_dataset(recipe, 10_000, 0).indices) == list(range(450))


@pytest.mark.parametrize("policy", ["rand-m10-mstd0-inc1", "v0"])
def test_zero_bit_posterize_gives_a_black_image_instead_of_a_pillow_error(policy):
    transform = build_train_transform(make_recipe(augment={"auto_augment": policy}))
    augmenter = next(t for t in transform.transforms if hasattr(t, "ops") or hasattr(t, "policy"))
    ops = list(getattr(augmenter, "ops", [])) + [op for sub in getattr(augmenter, "policy", []) for op in sub]
    posterize = [op for op in ops if op.name.startswith("Posterize")]
    assert posterize
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize[0].aug_fn(image, 0)).max() == 0
    assert np.asarray(posterize[0].aug_fn(image, 1)).max() == 128


def started_synthetic_loader(num_workers):
    """(bundle, iterator) of a synthetic training loader whose workers have served one batch."""
    recipe = make_recipe(data={"source": "synthetic", "num_workers": num_workers, "synthetic_train_size": 64},
                         train={"batch_size": 8})
    bundle = build_data(recipe)
    bundle.train_sampler.set_epoch(0)
    iterator = iter(bundle.train_loader)
    next(iterator)
    return bundle, iterator


def test_loader_workers_leave_preemption_signals_to_the_main_process():
    """Slurm signals the whole process group: a worker must survive SIGTERM so the trainer can save."""
    import signal

    bundle, iterator = started_synthetic_loader(num_workers=1)
    worker = iterator._workers[0]
    os.kill(worker.pid, signal.SIGTERM)
    os.kill(worker.pid, signal.SIGINT)
    assert sum(1 for _ in iterator) == bundle.steps_per_epoch - 1  # the epoch completes
    assert worker.exitcode in (None, 0)


def test_a_process_that_exits_with_live_loader_workers_does_not_hang(tmp_path):
    """Persistent workers still referenced at interpreter exit get multiprocessing's SIGTERM and
    must honour it then; ignoring it would leave the exit joining them forever."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "leak_workers.py"
    script.write_text(textwrap.dedent("""
        from tests.test_data import started_synthetic_loader
        _, LEAKED = started_synthetic_loader(num_workers=2)
        assert all(w.is_alive() for w in LEAKED._workers)
        print("workers alive at exit", flush=True)
    """))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    assert "workers alive at exit" in done.stdout
