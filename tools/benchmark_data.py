"""Training-data throughput per core: depthlab's training pipeline against timm's fast path.

Builds once (cached) an ImageFolder of ImageNet-like JPEGs: natural content (random crops, flips and
rescales of scikit-image's bundled photographs), sizes drawn like ImageNet's (mean about 410 x 360, 45 %
with a 500 px long side, a tail up to 1,400 px), JPEG quality ~ N(90, 3). Then, in alternating timed
windows of one run (machine noise hits both sides alike), each side iterates one whole epoch of the set
in this process (num_workers=0, one thread): exactly the work one loader worker does per batch -
read, decode, crop, augment, collate. Work left to the device is not counted on either side:

* timm: `create_loader(..., use_prefetcher=True)` as timm's train.py runs it on GPUs - uint8 tensors
  out of the workers; normalisation and random erasing on the device (its PrefetchLoader);
* depthlab: `build_data`'s training loader (`data.fast_path`, `augment.device_augment`): uint8
  `TrainBatch`es; RandAugment (device_augment), normalisation and erasing on the device.

Images/s per core = images / CPU seconds of this process; the cores needed to feed 8 GPUs at
4,000 img/s each follow from it.

    python tools/benchmark_data.py                        # vit_b and vit_s settings, 1,000 images
    python tools/benchmark_data.py --levers               # also each lever alone, and stage costs
    python tools/benchmark_data.py --recipe recipes/vit_b.yaml --windows 8 --images 2000
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import timm
import torch
from PIL import Image

from trainer.cli import exit_on_user_error
from trainer.data import TrainSet, build_data
from trainer.data.fast_transform import FastPathOptions, build_fast_train_transform
from trainer.data.transforms import build_train_transform
from trainer.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DEPTHLAB_BENCH_CACHE", Path.home() / ".cache" / "depthlab"))
SET_VERSION = 1
GPUS, PER_GPU = 8, 4000


# --- the ImageNet-like JPEG set -------------------------------------------------------------------

def _photographs() -> tuple[list[Image.Image], list[Image.Image]]:
    try:
        import skimage.data as sk
    except ImportError:
        raise SystemExit("error: tools/benchmark_data.py needs scikit-image (pip install scikit-image)") from None
    colour = [sk.astronaut(), sk.chelsea(), sk.coffee(), sk.rocket(), sk.hubble_deep_field(), sk.retina(),
              sk.immunohistochemistry(), *sk.stereo_motorcycle()[:2]]
    grey = [sk.camera(), sk.brick(), sk.grass(), sk.gravel(), sk.coins(), sk.moon(), sk.cell(), sk.clock()]
    return [Image.fromarray(a) for a in colour], [Image.fromarray(a).convert("RGB") for a in grey]


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) like ImageNet's: mostly a 500 px long side, smaller ones, a tail of large ones."""
    u = rng.random()
    if u < 0.45:
        long = 500
    elif u < 0.93:
        long = int(rng.integers(120, 500))
    else:
        long = int(round(math.exp(rng.uniform(math.log(501), math.log(1400)))))
    aspect = [4 / 3, 3 / 2, 1.0, rng.uniform(1.0, 1.8)][rng.choice(4, p=[0.6, 0.15, 0.1, 0.15])]
    short = max(64, int(round(long / aspect)))
    return (long, short) if rng.random() < 0.75 else (short, long)


def make_jpeg(rng: np.random.Generator, colour: list[Image.Image], grey: list[Image.Image]) -> bytes:
    width, height = draw_size(rng)
    source = colour[rng.integers(len(colour))] if rng.random() < 0.85 else grey[rng.integers(len(grey))]
    sw, sh = source.size
    fraction = rng.uniform(0.4, 1.0)
    cw, ch = int(sw * fraction), int(sh * fraction)
    if cw / ch > width / height:
        cw = int(ch * width / height)
    else:
        ch = int(cw * height / width)
    x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    image = source.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(np.clip(round(rng.normal(90, 3)), 75, 98)))
    return out.getvalue()


def build_image_folder(root: Path, images: int = 1000, classes: int = 10, eval_images: int = 20,
                       seed: int = 0) -> Path:
    """`root`/train/<class>/*.JPEG and `root`/val/...: made once, reused while the parameters match."""
    stamp = {"version": SET_VERSION, "images": images, "classes": classes, "eval_images": eval_images, "seed": seed}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == stamp:
        return root
    colour, grey = _photographs()
    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", eval_images)):
        for i in range(count):
            folder = root / split / f"class_{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{split}_{i:06d}.JPEG").write_bytes(make_jpeg(rng, colour, grey))
    manifest.write_text(json.dumps(stamp))
    return root


def describe_set(root: Path) -> str:
    files = sorted((root / "train").rglob("*.JPEG"))
    sizes = np.array([Image.open(f).size for f in files])
    kb = np.mean([f.stat().st_size for f in files]) / 1e3
    return (f"{len(files)} JPEGs, mean {sizes[:, 0].mean():.0f} x {sizes[:, 1].mean():.0f} px, "
            f"{100 * (sizes.min(1) >= 448).mean():.0f} % with both sides >= 448, mean {kb:.0f} KB")


# --- the two sides ----------------------------------------------------------------------------------

def bench_recipe(recipe_path: Path, root: Path, batch: int, overrides: list[str]):
    return load_recipe(recipe_path, [f"data.root={root}", "data.num_workers=0", "data.pin_memory=false",
                                     f"train.batch_size={batch}", "augment.repeated_aug=1",
                                     "data.source=imagefolder", *overrides])


def depthlab_epochs(recipe, options: FastPathOptions | None) -> Callable[[int], int]:
    """One epoch of depthlab's training loader per call (returns images); options=None: today's path."""
    bundle = build_data(recipe)
    train_set: TrainSet = bundle.train_loader.dataset
    if options is None:
        train_set.transform = build_train_transform(recipe)
        bundle.train_loader.collate_fn = torch.utils.data.default_collate
    else:
        fast = build_fast_train_transform(recipe, options)
        train_set.transform = fast
        bundle.train_loader.collate_fn = fast.collate

    def epoch(index: int) -> int:
        bundle.train_sampler.set_epoch(index)
        return sum(len(targets) for _, targets in bundle.train_loader)
    return epoch


def timm_epochs(recipe, root: Path) -> Callable[[int], int]:
    """One epoch of timm's create_loader(use_prefetcher=True) worker side per call."""
    from timm.data import ImageDataset, create_loader

    from trainer.data.transforms import _allow_zero_bit_posterize

    a, m = recipe.augment, recipe.model
    dataset = ImageDataset(str(root / "train"))
    loader = create_loader(
        dataset, input_size=(m.in_chans, m.img_size, m.img_size), batch_size=recipe.train.batch_size,
        is_training=True, use_prefetcher=True, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
        color_jitter=a.color_jitter, auto_augment=a.auto_augment, interpolation=a.train_interpolation,
        mean=tuple(a.mean), std=tuple(a.std), re_prob=a.reprob, re_mode=a.remode, re_count=a.recount,
        num_workers=0, device=torch.device("cpu"), persistent_workers=False)
    # Pillow 13 rejects timm's 0-bit posterize (about 1 image in 2,000): the same patch as depthlab's
    _allow_zero_bit_posterize(dataset.transform)
    worker_side = loader.loader  # the DataLoader inside the PrefetchLoader: what the workers run

    def epoch(index: int) -> int:
        return sum(len(targets) for _, targets in worker_side)
    return epoch


def timed(fn: Callable[[int], int], index: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    images = fn(index)
    return images / (time.process_time() - cpu), images / (time.perf_counter() - wall)


def interleave(sides: dict[str, Callable[[int], int]], windows: int) -> dict[str, list[float]]:
    """Per-core img/s of each side per window, alternating the order every window (one warm-up first)."""
    for fn in sides.values():
        fn(0)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for window in range(windows):
        for name in (list(sides) if window % 2 == 0 else list(reversed(sides))):
            rates[name].append(timed(sides[name], window + 1)[0])
    return rates


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} img/s/core [{min(values):.0f}, {max(values):.0f}]"


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Per-window ratios a/b (the two measured side by side in that window)."""
    return [x / y for x, y in zip(a, b, strict=True)]


# --- stage costs and levers ---------------------------------------------------------------------------

def stage_costs(root: Path, recipe) -> None:
    """Where the time goes in timm's fast path, one image at a time (ms per image, CPU)."""
    from timm.data import create_transform
    from torchvision.transforms import functional as F

    from trainer.data.transforms import _allow_zero_bit_posterize

    a, m = recipe.augment, recipe.model
    fast = create_transform(m.img_size, is_training=True, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
                            auto_augment=a.auto_augment, interpolation=a.train_interpolation, mean=tuple(a.mean),
                            std=tuple(a.std), re_prob=a.reprob, re_mode=a.remode, use_prefetcher=True)
    _allow_zero_bit_posterize(fast)
    crop, flip = fast.transforms[0], fast.transforms[1]
    blobs = [f.read_bytes() for f in sorted((root / "train").rglob("*.JPEG"))]

    def decode(b: bytes) -> Image.Image:
        with Image.open(io.BytesIO(b)) as image:
            return image.convert("RGB")
    stages = {"decode (Pillow)": decode, "+ RandomResizedCrop": lambda b: crop(decode(b)),
              "+ flip, to uint8 tensor": lambda b: F.pil_to_tensor(flip(crop(decode(b)))),
              "+ RandAugment (timm fast path)": lambda b: fast(decode(b))}
    print("stage costs, timm's per-image ops (ms/image, CPU, best of 3):")
    previous = 0.0
    for name, fn in stages.items():
        best = math.inf
        for _ in range(3):
            start = time.process_time()
            for b in blobs:
                fn(b)
            best = min(best, (time.process_time() - start) / len(blobs) * 1e3)
        print(f"  {name:32s} {best:6.3f} ms  (+{best - previous:.3f})")
        previous = best


LEVERS = {  # name: options (None: today's CPU path), each lever on top of "uint8 out"
    "today (float, CPU erasing)": None,
    "uint8 out, device norm/erasing": FastPathOptions(tensor_decode=False, draft=False, tensor_resize=False,
                                                      device_augment=False),
}
LEVERS["+ tensor decode"] = replace(LEVERS["uint8 out, device norm/erasing"], tensor_decode=True)
LEVERS["+ draft decode"] = replace(LEVERS["uint8 out, device norm/erasing"], draft=True)
LEVERS["+ tensor resize"] = replace(LEVERS["uint8 out, device norm/erasing"], tensor_resize=True)
LEVERS["+ device RandAugment"] = replace(LEVERS["uint8 out, device norm/erasing"], device_augment=True)
LEVERS["all but device RandAugment"] = FastPathOptions(device_augment=False)
LEVERS["all (default)"] = FastPathOptions()


def prepared_copy(root: Path, max_short_side: int = 320) -> Path:
    """tools/prepare_dataset.py's copy of the set (cached next to it)."""
    import datasets

    from tools.prepare_dataset import prepare

    datasets.disable_progress_bars()
    out = root.parent / f"{root.name}_short{max_short_side}"
    if not (out / "dataset_dict.json").is_file():
        prepare(root, out, ["train", "val"], max_short_side=max_short_side)
    return out


def input_change(recipe, prepared_recipe) -> str:
    """How much the prepared copy changes what the model sees, at the model's resolution: the
    deterministic evaluation view (resize to img_size / crop_pct, centre crop) of every training image,
    from the original and from the prepared copy."""
    from trainer.data.sources import load_split
    from trainer.data.transforms import build_eval_transform

    transform = build_eval_transform(recipe)
    raw_a, raw_b = load_split(recipe, "train").dataset, load_split(prepared_recipe, "train").dataset
    a = torch.stack([transform(raw_a[i][0]) for i in range(len(raw_a))])
    b = torch.stack([transform(raw_b[i][0]) for i in range(len(raw_b))])
    std = torch.tensor(recipe.augment.std).view(1, -1, 1, 1) * 255
    a, b = a * std, b * std  # grey levels (the mean offsets cancel)
    changed = (a - b).flatten(1).abs().amax(1) > 0
    return (f"{100 * changed.float().mean():.0f} % of the images changed; mean |difference| "
            f"{(a - b).abs().mean():.2f} grey levels ({(a[changed] - b[changed]).abs().mean():.2f} on the changed "
            f"ones); per-channel mean {(a.mean((0, 2, 3)) - b.mean((0, 2, 3))).abs().max():.2f}, std "
            f"{(a.std((0, 2, 3)) - b.std((0, 2, 3))).abs().max():.2f} levels at most")


def load_recipe_like(recipe, overrides: dict[str, str]):
    """`recipe` with a few `section.key` overrides (values as YAML)."""
    import yaml

    from trainer.recipe import recipe_from_dict, recipe_to_dict

    data = recipe_to_dict(recipe)
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = yaml.safe_load(value)
    return recipe_from_dict(data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", help="default: recipes/vit_b.yaml and recipes/vit_s.yaml")
    p.add_argument("--root", type=Path, help=f"the JPEG set (default: {CACHE}/bench_jpegs_<images>)")
    p.add_argument("--images", type=int, default=1000, help="training JPEGs in the set (one window = one epoch)")
    p.add_argument("--windows", type=int, default=6, help="timed windows per side (alternating)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--levers", action="store_true", help="also measure each lever alone, and timm's stage costs")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    return p.parse_args(argv)


@exit_on_user_error
def gpu_device_augment(augment) -> bool:
    """augment.device_augment as on a CUDA machine (null = on), whatever this machine has."""
    return True if augment.device_augment is None else augment.device_augment


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # what a loader worker has
    root = build_image_folder(args.root or CACHE / f"bench_jpegs_{args.images}", images=args.images)
    print(f"set {root}: {describe_set(root)}")
    print(f"timm {timm.__version__}, torch {torch.__version__}, Pillow {Image.__version__}; one process, one thread; "
          f"{args.windows} alternating windows of one epoch per side (median [min, max])")
    recipes = [Path(r) for r in args.recipe] if args.recipe else [REPO / "recipes" / "vit_b.yaml",
                                                                   REPO / "recipes" / "vit_s.yaml"]
    for recipe_path in recipes:
        recipe = bench_recipe(recipe_path, root, args.batch_size, args.overrides)
        a = recipe.augment
        print(f"\n{recipe_path.name}: img_size {recipe.model.img_size}, {a.auto_augment}, interpolation "
              f"{a.train_interpolation}, reprob {a.reprob} ({a.remode}), hflip {a.hflip}")
        sides = {"depthlab": depthlab_epochs(recipe, FastPathOptions(
                     device_augment=gpu_device_augment(a))),
                 "timm fast path": timm_epochs(recipe, root)}
        rates = interleave(sides, args.windows)
        for name, values in rates.items():
            print(f"  {name:16s} {summary(values)}")
        per_window = ratios(rates["depthlab"], rates["timm fast path"])
        print(f"  ratio depthlab / timm: {statistics.median(per_window):.2f} "
              f"(per window {', '.join(f'{r:.2f}' for r in per_window)})")
        for name, values in rates.items():
            cores = GPUS * PER_GPU / statistics.median(values)
            print(f"  cores to feed {GPUS} GPUs x {PER_GPU:,} img/s: {name:16s} {cores:5.0f}")
        if args.levers:
            stage_costs(root, recipe)
            lever_sides = {"timm fast path": sides["timm fast path"]}
            lever_sides.update({name: depthlab_epochs(recipe, options) for name, options in LEVERS.items()})
            lever_rates = interleave(lever_sides, max(2, args.windows // 2))
            print("levers (each on top of 'uint8 out' unless marked), interleaved with timm's fast path:")
            for name, values in lever_rates.items():
                r = statistics.median(ratios(values, lever_rates["timm fast path"]))
                print(f"  {name:32s} {summary(values)}  / timm {r:.2f}")
            prepared = prepared_copy(root)
            prepared_recipe = load_recipe_like(recipe, {"data.source": "hf", "data.root": f"'{prepared}'"})
            prepared_rates = interleave({
                "timm fast path": sides["timm fast path"], "depthlab": sides["depthlab"],
                "depthlab, prepared copy": depthlab_epochs(prepared_recipe, FastPathOptions(
                    device_augment=gpu_device_augment(a)))}, max(2, args.windows // 2))
            print("prepared copy (tools/prepare_dataset.py, shorter side <= 320, quality 90, arrow shards):")
            for name, values in prepared_rates.items():
                r = statistics.median(ratios(values, prepared_rates["timm fast path"]))
                print(f"  {name:32s} {summary(values)}  / timm {r:.2f}")
            print(f"  what it changes: {input_change(recipe, prepared_recipe)}")


if __name__ == "__main__":
    main()
