"""One-time preparation of an ImageFolder for faster training reads (what FFCV users do).

Writes a 🤗 `datasets` DatasetDict (arrow shards, `save_to_disk`) with the splits of `<root>`
(ImageNet layout: `<root>/<split>/<class>/<image>`): columns `image` (JPEG bytes) and `label`
(ClassLabel, the training split's class folders in sorted order: the indices of data.source=imagefolder).
An image whose shorter side exceeds `--max-short-side` is resized (bicubic, antialiased) to that shorter
side and re-encoded as a JPEG of `--quality`; every other image keeps its original bytes. Train from it
with depthlab's `hf` source:

    python tools/prepare_dataset.py /data/imagenet /data/imagenet-320 --max-short-side 320
    accelerate launch … trainer/train.py --recipe recipes/vit_b.yaml \\
        --set data.source=hf data.root=/data/imagenet-320

It changes the inputs slightly: a resized image is one more bicubic resize and JPEG generation away
from the original (tools/benchmark_data.py --levers prints how much, in grey levels, on its set).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def shrink(data: bytes, max_short_side: int, quality: int) -> tuple[bytes, bool]:
    """(bytes, resized): the image re-encoded at shorter side `max_short_side`, or unchanged if it fits."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if min(width, height) <= max_short_side:
            return data, False
        factor = max_short_side / min(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        if image.format == "JPEG":
            image.draft(image.mode, size)  # DCT-domain reduction first, never below the target size
        image = image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode)
        out = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=quality)
        return out.getvalue(), True


def split_examples(directory: Path, classes: list[str]) -> Iterator[tuple[Path, int]]:
    for label, name in enumerate(classes):
        folder = directory / name
        if not folder.is_dir():
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                yield Path(entry.path), label


def prepare(root: Path, out: Path, splits: list[str], max_short_side: int = 320, quality: int = 90,
            shard_size_mb: int = 500) -> dict[str, tuple[int, int]]:
    """Write the DatasetDict; returns {split: (images, resized)}."""
    import datasets

    train = root / splits[0]
    classes = sorted(e.name for e in os.scandir(train) if e.is_dir())
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    counts, parts = {}, {}
    for split in splits:
        resized = 0

        def rows(split: str = split) -> Iterator[dict]:
            nonlocal resized
            for path, label in split_examples(root / split, classes):
                data, changed = shrink(path.read_bytes(), max_short_side, quality)
                resized += changed
                yield {"image": {"bytes": data, "path": path.name}, "label": label}

        parts[split] = datasets.Dataset.from_generator(rows, features=features)
        counts[split] = (len(parts[split]), resized)
    datasets.DatasetDict(parts).save_to_disk(str(out), max_shard_size=f"{shard_size_mb}MB")
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="ImageFolder root holding <split>/<class>/<image>")
    p.add_argument("out", type=Path, help="output directory (a datasets save_to_disk DatasetDict)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="first = the split naming the classes")
    p.add_argument("--max-short-side", type=int, default=320)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--shard-size-mb", type=int, default=500)
    args = p.parse_args(argv)
    counts = prepare(args.root, args.out, args.splits, args.max_short_side, args.quality, args.shard_size_mb)
    for split, (images, resized) in counts.items():
        print(f"{split}: {images} images, {resized} resized to shorter side {args.max_short_side}")
    print(f"wrote {args.out} (train with --set data.source=hf data.root={args.out})")


if __name__ == "__main__":
    main()
