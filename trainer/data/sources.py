"""Data sources: where raw examples come from (`data.source` in the recipe).

`load_split(recipe, role)` returns the raw train or eval split of the recipe's source as a
`RawSplit`: a map-style dataset of (PIL image, label) before any transform (synthetic: a ready
float tensor) plus the class names. Sources raise `DataError` for a missing root, folder, split or
column, and `CorruptImageError` (caught by `trainer.data`) for an image that cannot be decoded.

Sources of encoded images (imagefolder, hf) also have `encoded(index) -> (EncodedImage, label)`:
the file not decoded yet, so the training path can decode it to a uint8 tensor
(`decode_to_tensor`), at reduced scale where its crop allows (`EncodedImage.open` reads the header only).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from models.errors import UserError

Role = Literal["train", "eval"]

# What PIL raises for unreadable, truncated or hostile files.
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(UserError):
    """Unusable data: a missing root/folder/split/column, a corrupt image, too few classes."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises as DataError("Caught DataError in DataLoader worker ...
        # Original Traceback ... DataError: <message>"); keep the one-line message for the CLI.
        if message.startswith("Caught DataError"):
            message = message.rstrip().rsplit("DataError: ", 1)[-1]
        super().__init__(message)



class CorruptImageError(Exception):
    """An image that cannot be decoded; `where` names the file (or dataset row)."""

    def __init__(self, where: str, cause: BaseException):
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")
        self.where = where


@dataclass
class RawSplit:
    dataset: Dataset  # __getitem__(i) -> (PIL.Image | Tensor, int)
    class_names: tuple[str, ...]
    description: str  # for messages, e.g. "/data/imagenet/val" or "hf cifar10 split 'test'"


def pil_mode(in_chans: int) -> str:
    if in_chans not in (1, 3):
        raise DataError(f"model.in_chans = {in_chans}: image sources give 1 (L) or 3 (RGB) channels; "
                        "use data.source=synthetic for other channel counts")
    return "L" if in_chans == 1 else "RGB"


def decode_image(file: str | Path | io.BytesIO, mode: str, where: str) -> Image.Image:
    try:
        with Image.open(file) as image:
            return image.convert(mode)  # convert() forces the full decode inside the try
    except IMAGE_DECODE_ERRORS as e:
        raise CorruptImageError(where, e) from None


@dataclass(frozen=True)
class EncodedImage:
    """One image before decoding: a file path or the file's bytes, the mode to decode to (L/RGB) and
    where it comes from (for messages)."""

    source: str | bytes
    mode: str
    where: str

    def read(self) -> bytes:
        if isinstance(self.source, bytes):
            return self.source
        try:
            with open(self.source, "rb") as f:
                return f.read()
        except OSError as e:
            raise CorruptImageError(self.where, e) from None

    def open(self, data: bytes | None = None) -> Image.Image:
        """The lazily opened PIL image (header parsed, pixels not decoded yet)."""
        try:
            return Image.open(io.BytesIO(self.read() if data is None else data))
        except IMAGE_DECODE_ERRORS as e:
            raise CorruptImageError(self.where, e) from None

    def decode(self) -> Image.Image:
        """Exactly what the source's `__getitem__` returns."""
        return decode_image(io.BytesIO(self.read()), self.mode, self.where)


def decode_to_tensor(encoded: EncodedImage, size_hook: Any = None,
                     tensor_decode: bool = True) -> tuple[torch.Tensor | Image.Image, int, Any]:
    """Decode `encoded`: (pixels, scale, extra).

    `size_hook(width, height) -> (scale, extra)`, when given, is called with the full size from the
    header before any pixel is decoded. A `scale` of 2, 4 or 8 asks for a JPEG decoded at 1/scale in
    the DCT domain (Pillow's `draft`): the pixels are then that reduced PIL image, and the returned
    scale says by how much it was reduced (1 where it was not: not a JPEG, or Pillow declined).
    Otherwise the pixels are, pixel for pixel, what `encoded.decode()` gives: with `tensor_decode` a
    uint8 [C, H, W] tensor (channels-last memory) - baseline/progressive RGB or grey JPEGs decoded to
    RGB by torchvision's libjpeg-turbo decoder (the library Pillow uses, without Pillow's RGBX
    unpacking and copies), everything else by Pillow - else Pillow's image.
    """
    data = encoded.read()
    image = encoded.open(data)
    width = image.size[0]
    scale, extra = size_hook(*image.size) if size_hook is not None else (1, None)
    try:
        if scale > 1 and image.format == "JPEG":
            drafted = image.draft(encoded.mode, (image.size[0] // scale, image.size[1] // scale))
            done = 1 if drafted is None else round(width / drafted[1][2])
            return image.convert(encoded.mode), done, extra
        if tensor_decode and image.format == "JPEG" and encoded.mode == "RGB" and image.mode in ("RGB", "L"):
            from torchvision.io import ImageReadMode, decode_jpeg

            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), 1, extra
            except RuntimeError:
                pass  # Pillow decides whether the file is corrupt, and says so the usual way
        image = image.convert(encoded.mode)
        if not tensor_decode:
            return image, 1, extra
        array = np.array(image)
        return torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1), 1, extra
    except IMAGE_DECODE_ERRORS as e:
        raise CorruptImageError(encoded.where, e) from None


# --- digits: scikit-learn's 1,797 8x8 handwritten digits, embedded in the package ------------------

class DigitsImages(Dataset):
    """8x8 digits as uint8 PIL images (values 0..16 scaled to 0..255); the transforms upsample."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, mode: str):
        self.pixels, self.labels, self.mode = pixels, labels, mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = Image.fromarray(self.pixels[index])  # uint8 2-D -> mode "L"
        return (image.convert(self.mode) if self.mode != "L" else image), int(self.labels[index])


def digits_split(recipe: Any, role: Role) -> RawSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=recipe.data.digits_test_fraction,
                                           random_state=recipe.data.split_seed, stratify=digits.target)
    chosen = np.sort(train_idx if role == "train" else test_idx)
    dataset = DigitsImages(pixels[chosen], digits.target[chosen], pil_mode(recipe.model.in_chans))
    names = tuple(str(name) for name in digits.target_names)
    return RawSplit(dataset, names, f"digits {role} split (split_seed={recipe.data.split_seed})")


# --- synthetic: random tensors for benchmarks (no decode, no transform) ----------------------------

class SyntheticImages(Dataset):
    """Standard-normal images and uniform labels for throughput benchmarks: `POOL` images made once
    and cycled (a batch is then as cheap as its collate copy), each index with its own fixed label."""

    POOL = 64

    def __init__(self, size: int, num_classes: int, shape: tuple[int, int, int], seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(num_classes, (size,), generator=generator).tolist()
        self.pool = torch.randn((min(size, self.POOL), *shape), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pool[index % len(self.pool)], self.labels[index]


def synthetic_split(recipe: Any, role: Role) -> RawSplit:
    m, d = recipe.model, recipe.data
    size = d.synthetic_train_size if role == "train" else d.synthetic_eval_size
    seed = 2 * recipe.train.seed + (0 if role == "train" else 1)
    dataset = SyntheticImages(size, m.num_classes, (m.in_chans, m.img_size, m.img_size), seed)
    return RawSplit(dataset, tuple(str(c) for c in range(m.num_classes)), f"synthetic {role} split")


# --- imagefolder: <root>/<split>/<class>/<image> (ImageNet layout) --------------------------------

def _class_folders(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


class FolderImages(ImageFolder):
    """ImageFolder with the class list fixed by the training split (a val/ missing a class keeps the
    same label indices) and decode errors reported with the file name."""

    def __init__(self, directory: Path, classes: list[str], mode: str):
        self.fixed_classes, self.mode = list(classes), mode
        super().__init__(str(directory), allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        unknown = sorted(set(_class_folders(Path(directory))) - set(self.fixed_classes))
        if unknown:
            raise DataError(f"{directory}: class folders {unknown[:5]} are not in the training split")
        return self.fixed_classes, {name: i for i, name in enumerate(self.fixed_classes)}

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return decode_image(path, self.mode, where=path), target

    def encoded(self, index: int) -> tuple[EncodedImage, int]:
        path, target = self.samples[index]
        return EncodedImage(path, self.mode, path), target


def imagefolder_split(recipe: Any, role: Role) -> RawSplit:
    d = recipe.data
    if not d.root:
        raise DataError("data.root is required for data.source=imagefolder (the folder holding "
                        f"{d.train_split}/ and {d.eval_split}/)")
    split = d.train_split if role == "train" else d.eval_split
    directory = Path(d.root).expanduser() / split
    if not directory.is_dir():
        raise DataError(f"data.root: {directory} not found (expected class folders for split '{split}')")
    train_directory = Path(d.root).expanduser() / d.train_split
    class_directory = train_directory if train_directory.is_dir() else directory
    classes = _class_folders(class_directory)
    if not classes:
        raise DataError(f"data.root: {class_directory} has no class folders (expected <split>/<class>/<image>)")
    dataset = FolderImages(directory, classes, pil_mode(recipe.model.in_chans))
    if len(dataset) == 0:
        raise DataError(f"data.root: {directory} holds no images (extensions: .jpg .jpeg .png .bmp .webp ...)")
    return RawSplit(dataset, tuple(classes), str(directory))


# --- hf: a `datasets` dataset from the hub cache, a save_to_disk directory or local data files ------

class HFImages(Dataset):
    """Rows of a `datasets.Dataset`, images decoded here so a bad one is reported by row and file."""

    def __init__(self, table: Any, image_column: str, label_column: str, mode: str, description: str):
        from datasets import Image as ImageFeature

        table = table.select_columns([image_column, label_column])
        self.table = table.cast_column(image_column, ImageFeature(decode=False))
        self.image_column, self.label_column = image_column, label_column
        self.mode, self.description = mode, description

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        encoded, target = self.encoded(index)
        return encoded.decode(), target

    def encoded(self, index: int) -> tuple[EncodedImage, int]:
        row = self.table[index]
        encoded = row[self.image_column]
        where = f"{self.description} row {index}" + (f" ({encoded['path']})" if encoded.get("path") else "")
        source = encoded.get("bytes") or encoded.get("path")
        if source is None:
            raise CorruptImageError(where, ValueError("no image bytes or path"))
        return EncodedImage(source, self.mode, where), int(row[self.label_column])


def _hf_table(recipe: Any, split: str) -> tuple[Any, str]:
    import datasets

    d = recipe.data
    if d.root:
        root = Path(d.root).expanduser()
        if not root.exists():
            raise DataError(f"data.root: {root} not found (expected a datasets save_to_disk directory "
                            "or data files)")
        description = f"hf {root} split '{split}'"
        if (root / "dataset_dict.json").is_file():
            splits = datasets.load_from_disk(str(root))
            if split not in splits:
                raise DataError(f"data.root: {root} has no split '{split}' (splits: {sorted(splits)})")
            return splits[split], description
        if (root / "state.json").is_file():
            raise DataError(f"data.root: {root} holds a single saved Dataset; save a DatasetDict "
                            f"with the splits '{d.train_split}' and '{d.eval_split}'")
        target, config = str(root), None
    elif d.hf_name:
        target, config = d.hf_name, d.hf_config
        description = f"hf {d.hf_name}" + (f" ({d.hf_config})" if d.hf_config else "") + f" split '{split}'"
    else:
        raise DataError("data.source=hf needs data.hf_name (a datasets name) or data.root (a local copy)")
    try:
        return datasets.load_dataset(target, config, split=split), description
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        raise DataError(f"cannot load {description}: {str(e).splitlines()[0]}") from None


def hf_split(recipe: Any, role: Role) -> RawSplit:
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    d = recipe.data
    split = d.train_split if role == "train" else d.eval_split
    table, description = _hf_table(recipe, split)
    for key in ("image_column", "label_column"):
        column = getattr(d, key)
        if column not in table.column_names:
            raise DataError(f"data.{key} = '{column}' is not a column of {description} "
                            f"(columns: {table.column_names})")
    if not isinstance(table.features[d.image_column], ImageFeature):
        raise DataError(f"data.image_column = '{d.image_column}' of {description} is "
                        f"{table.features[d.image_column]!r}, not an Image column")
    labels = np.asarray(table.with_format("numpy")[d.label_column])
    if len(labels) == 0:
        raise DataError(f"{description} is empty")
    if labels.min() < 0:
        raise DataError(f"{description}: column '{d.label_column}' has negative labels "
                        f"({int(labels.min())}, i.e. unlabelled rows); pick a labelled split")
    feature = table.features[d.label_column]
    if isinstance(feature, ClassLabel):
        names = tuple(feature.names)
    else:
        names = tuple(str(c) for c in range(int(labels.max()) + 1))
    dataset = HFImages(table, d.image_column, d.label_column, pil_mode(recipe.model.in_chans), description)
    return RawSplit(dataset, names, description)


SOURCES = {"digits": digits_split, "synthetic": synthetic_split, "imagefolder": imagefolder_split,
           "hf": hf_split}


def load_split(recipe: Any, role: Role) -> RawSplit:
    """The raw `role` split of `recipe.data.source`, with its class names."""
    return SOURCES[recipe.data.source](recipe, role)
