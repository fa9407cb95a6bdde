"""The fast training path, worker side: `build_train_transform`'s augmentation producing uint8
samples instead of float tensors. `FastTrainTransform` samples the crop box first, decodes the image
(at reduced DCT scale where the box allows, see `draft_scale`), resizes the crop as a uint8 tensor,
flips it, and draws RandAugment (recorded for the device) and random erasing without applying them;
`collate_train_samples` stacks the samples into a `TrainBatch`, whose `.to(device)` finishes the
batch there into the float32 tensor the reference transform would have produced."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as F_vision

from trainer.data.device_augment import (
    _OP_ARGS,
    _PIL_INTERP,
    _RecordedImage,
    apply_device_augment,
    recording_rand_augment,
)
from trainer.data.sources import EncodedImage, decode_to_tensor
from trainer.data.transforms import build_train_transform

__all__ = ["FastPathOptions", "FastTrainTransform", "TrainBatch", "TrainSample", "build_fast_train_transform",
           "collate_train_samples", "crop_box", "draft_scale"]

# The same augmentation as `build_train_transform`, drawn with the same random calls in the same
# order from the same per-sample seeds, but cheaper per core:
#   * JPEGs are decoded by torchvision's libjpeg-turbo decoder straight into a uint8 tensor (what
#     Pillow decodes, pixel for pixel, without its RGBX unpacking and copies), and - when the sampled
#     crop box is at least 2x (4x, 8x) the output size in both directions - at 1/2 (1/4, 1/8) scale in
#     the DCT domain (Pillow's draft), resized from the exact sub-pixel box: never upsampled from a
#     smaller decode than the full one would give the resize;
#   * the RandomResizedCrop resize runs on the uint8 tensor with torch's vectorised antialiased kernel
#     (Pillow's algorithm; outputs differ from Pillow's by at most 1 grey level, on ~0.3 % of pixels);
#   * images stay uint8 to the device; normalisation and random erasing (its boxes and noise drawn in
#     the worker, per sample, exactly as timm's RandomErasing draws them) happen in `TrainBatch.to`;
#   * with `device_augment`, RandAugment's ops and magnitudes are drawn in the worker exactly as timm
#     draws them and applied on the device to the uint8 batch by `apply_device_augment`, which
#     re-implements Pillow's operations (the same integer/float arithmetic: equal to timm's per-image
#     ops up to rare 1-level rounding differences).

@dataclass(frozen=True)
class FastPathOptions:
    """Which levers the fast training path uses (tools/benchmark_data.py measures each)."""

    tensor_decode: bool = True  # torchvision decode_jpeg instead of Pillow for RGB JPEGs
    draft: bool = True  # DCT-domain reduced decoding when the crop box allows it
    tensor_resize: bool = True  # torch's uint8 antialiased resize instead of Pillow's
    device_augment: bool = True  # RandAugment on the device (else in the worker, with Pillow)


@dataclass
class TrainSample:
    """One training image out of a worker: uint8 [C, H, W] plus the augmentation left to the device."""

    image: torch.Tensor
    ops: list[tuple[int, tuple[float, ...]]] | None  # device RandAugment, in order
    erase: list[tuple[int, int, int, int, torch.Tensor]]  # (top, left, h, w, fill) in order


@dataclass
class TrainBatch:
    """A training batch as the workers give it: `batch.to(device)` finishes it there into exactly the
    float32 [B, C, H, W] tensor that `build_train_transform` + default collation would have produced
    (device RandAugment: Pillow's arithmetic, up to rare 1-level rounding differences)."""

    images: torch.Tensor  # uint8 [B, C, H, W]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    op_codes: torch.Tensor | None  # int64 [B, layers] (CPU: grouping needs no device sync)
    op_args: torch.Tensor | None  # float64 [B, layers, _OP_ARGS]
    erase_boxes: torch.Tensor  # int64 [N, 5]: sample, top, left, h, w
    erase_fill: torch.Tensor  # float32: the fills, flattened in box order
    erase_fill_shapes: list[tuple[int, int, int]]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def pin_memory(self, device: Any = None) -> TrainBatch:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()
        return TrainBatch(pin(self.images), self.mean, self.std, self.op_codes, pin(self.op_args),
                          self.erase_boxes, pin(self.erase_fill), self.erase_fill_shapes)

    def to(self, device: Any, non_blocking: bool = False) -> torch.Tensor:
        x = self.images.to(device, non_blocking=non_blocking)
        if self.op_codes is not None:
            x = apply_device_augment(x, self.op_codes, self.op_args.to(device, non_blocking=non_blocking))
        # torchvision's ToTensor then Normalize, op for op
        x = x.to(torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        x.sub_(mean).div_(std)
        if len(self.erase_boxes):
            fill = self.erase_fill.to(device, non_blocking=non_blocking)
            offset = 0
            for (b, top, left, h, w), shape in zip(self.erase_boxes.tolist(), self.erase_fill_shapes, strict=True):
                size = math.prod(shape)
                x[b, :, top:top + h, left:left + w] = fill[offset:offset + size].view(shape)
                offset += size
        return x


def collate_train_samples(samples: list[tuple[TrainSample, int]], mean: tuple[float, ...] = (),
                          std: tuple[float, ...] = (), layers: int = 0) -> tuple[TrainBatch, torch.Tensor]:
    images = torch.stack([s.image for s, _ in samples])
    targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
    codes = args = None
    if any(s.ops is not None for s, _ in samples):
        codes = torch.zeros(len(samples), layers, dtype=torch.int64)
        args = torch.zeros(len(samples), layers, _OP_ARGS, dtype=torch.float64)
        for i, (s, _) in enumerate(samples):
            for layer, (code, values) in enumerate(s.ops or []):
                codes[i, layer] = code
                args[i, layer, :len(values)] = torch.tensor(values, dtype=torch.float64)
    boxes, fills, shapes = [], [], []
    for i, (s, _) in enumerate(samples):
        for top, left, h, w, fill in s.erase:
            boxes.append((i, top, left, h, w))
            fills.append(fill.reshape(-1))
            shapes.append(tuple(fill.shape))
    return TrainBatch(images, tuple(mean), tuple(std), codes, args,
                      torch.tensor(boxes, dtype=torch.int64).reshape(-1, 5),
                      torch.cat(fills) if fills else torch.zeros(0), shapes), targets


def _draw_erasing(erasing: RandomErasing, chan: int, img_h: int, img_w: int) -> list:
    """timm's RandomErasing._erase with its exact random draws, returning the boxes and fills instead of
    writing them (the fill is what it would write: float32 noise from torch's CPU generator)."""
    boxes = []
    if random.random() > erasing.probability:
        return boxes
    area = img_h * img_w
    count = erasing.min_count if erasing.min_count == erasing.max_count else \
        random.randint(erasing.min_count, erasing.max_count)
    for _ in range(count):
        for _attempt in range(10):
            target_area = random.uniform(erasing.min_area, erasing.max_area) * area / count
            aspect_ratio = math.exp(random.uniform(*erasing.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < img_w and h < img_h:
                top = random.randint(0, img_h - h)
                left = random.randint(0, img_w - w)
                if erasing.per_pixel:
                    fill = torch.empty((chan, h, w), dtype=torch.float32).normal_()
                elif erasing.rand_color:
                    fill = torch.empty((chan, 1, 1), dtype=torch.float32).normal_()
                else:
                    fill = torch.zeros((chan, 1, 1), dtype=torch.float32)
                boxes.append((top, left, h, w, fill))
                break
    return boxes


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, ...]:
    """(i, j, h, w): torchvision's RandomResizedCrop box algorithm with Python's `random`, draw for draw
    timm's `RandomResizedCropAndInterpolation.get_params` (what `build_train_transform` samples)."""
    area = width * height
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect_ratio = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            i = random.randint(0, height - h)
            j = random.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_scale(h: int, w: int, out_h: int, out_w: int) -> int:
    """The largest DCT scale (1, 2, 4, 8) at which the (h, w) crop still covers out_h x out_w pixels."""
    scale = 1
    while scale < 8 and h >= 2 * scale * out_h and w >= 2 * scale * out_w:
        scale *= 2
    return scale


class FastTrainTransform:
    """`build_train_transform(recipe)`'s augmentation as `TrainSample`s (see the comment at the top of this module).

    Built from the reference transform itself, so every parameter is the reference's; `of()` returns
    None for transforms it does not cover (other crop modes), which then run unchanged.
    """

    def __init__(self, reference: Any, options: FastPathOptions, in_chans: int):
        steps = list(reference.transforms)
        crop = steps.pop(0)
        self.size = crop.size  # (h, w)
        self.scale, self.ratio, self.interpolation = crop.scale, crop.ratio, crop.interpolation
        self.flip = steps.pop(0).p if steps and isinstance(steps[0], transforms.RandomHorizontalFlip) else 0.0
        cut = next(i for i, s in enumerate(steps) if isinstance(s, MaybeToTensor))
        secondary, final = steps[:cut], steps[cut + 1:]
        normalize = final.pop(0)
        self.mean = tuple(float(v) for v in normalize.mean)
        self.std = tuple(float(v) for v in normalize.std)
        self.erasing = final.pop(0) if final else None
        self.options = options
        self.recording = None
        if options.device_augment and in_chans == 3 and len(secondary) == 1 \
                and isinstance(secondary[0], timm_auto_augment.RandAugment):
            self.recording = recording_rand_augment(secondary[0])
        self.layers = self.recording.num_layers if self.recording is not None else 0
        self.secondary = transforms.Compose(secondary) if secondary and self.recording is None else None

    @classmethod
    def of(cls, reference: Any, options: FastPathOptions, in_chans: int) -> FastTrainTransform | None:
        steps = list(getattr(reference, "transforms", []))
        if not steps or type(steps[0]) is not RandomResizedCropAndInterpolation:
            return None
        kinds = [type(s) for s in steps]
        if kinds.count(MaybeToTensor) != 1:
            return None
        after = kinds[kinds.index(MaybeToTensor) + 1:]
        if after not in ([transforms.Normalize], [transforms.Normalize, RandomErasing]):
            return None
        if after[-1] is RandomErasing and steps[-1].num_splits > 1:
            return None
        return cls(reference, options, in_chans)

    def collate(self, samples: list[tuple[TrainSample, int]]) -> tuple[TrainBatch, torch.Tensor]:
        return collate_train_samples(samples, self.mean, self.std, self.layers)

    def _crop_plan(self, width: int, height: int) -> tuple[int, tuple]:
        i, j, h, w = crop_box(width, height, self.scale, self.ratio)
        interpolation = random.choice(self.interpolation) \
            if isinstance(self.interpolation, (tuple, list)) else self.interpolation
        scale = draft_scale(h, w, *self.size) if self.options.draft else 1
        return scale, ((i, j, h, w), scale, interpolation)

    def __call__(self, item: Any) -> TrainSample:
        if isinstance(item, EncodedImage):
            decoded, scale, (box, _, interpolation) = decode_to_tensor(
                item, self._crop_plan, tensor_decode=self.options.tensor_decode)
        else:  # a decoded PIL image (digits)
            _, (box, _, interpolation) = self._crop_plan(*item.size)
            decoded, scale = item, 1
        x = self._resized_crop(decoded, box, scale, interpolation)  # a PIL image or a uint8 tensor
        if self.flip > 0 and torch.rand(1) < self.flip:  # torchvision's RandomHorizontalFlip draw
            x = F_vision.hflip(x)
        ops = None
        if self.recording is not None:
            size = x.size if isinstance(x, Image.Image) else (x.shape[-1], x.shape[-2])
            ops = self.recording(_RecordedImage(size)).ops
        elif self.secondary is not None:
            x = self.secondary(x if isinstance(x, Image.Image) else F_vision.to_pil_image(x))
        x = F_vision.pil_to_tensor(x) if isinstance(x, Image.Image) else x.contiguous()
        erase = [] if self.erasing is None else _draw_erasing(self.erasing, *x.shape)
        return TrainSample(x, ops, erase)

    def _resized_crop(self, decoded: Any, box: tuple[int, int, int, int], scale: int,
                      interpolation: Any) -> Image.Image | torch.Tensor:
        i, j, h, w = box
        pil_interpolation = _pil_interpolation(interpolation)
        tensor_mode = _PIL_INTERP.get(pil_interpolation) if self.options.tensor_resize else None
        if isinstance(decoded, Image.Image):
            if scale > 1:  # a draft decode: the exact box, in the reduced image's coordinates
                return decoded.resize(self.size[::-1], pil_interpolation,
                                      box=(j / scale, i / scale, (j + w) / scale, (i + h) / scale))
            if tensor_mode is None:
                return F_vision.resized_crop(decoded, i, j, h, w, list(self.size), interpolation)
            decoded = _to_chw(decoded)
        if tensor_mode is None:
            return F_vision.resized_crop(F_vision.to_pil_image(decoded[:, i:i + h, j:j + w]), 0, 0, h, w,
                                         list(self.size), interpolation)
        return torch.nn.functional.interpolate(decoded[None, :, i:i + h, j:j + w], size=self.size, mode=tensor_mode,
                                               antialias=True)[0]


def _pil_interpolation(interpolation: Any) -> Image.Resampling:
    if isinstance(interpolation, transforms.InterpolationMode):
        return F_vision.pil_modes_mapping[interpolation]
    return interpolation


def _to_chw(image: Image.Image) -> torch.Tensor:
    """uint8 [C, H, W] viewing an HWC copy (channels-last memory: no CHW transpose)."""
    array = np.array(image)
    return torch.from_numpy(array[:, :, None] if array.ndim == 2 else array).permute(2, 0, 1)


def build_fast_train_transform(recipe: Any, options: FastPathOptions | None = None) -> FastTrainTransform | None:
    """The fast path for `build_train_transform(recipe)`, or None where it does not apply."""
    if options is None:  # augment.device_augment (recipe knob): null = on the device when CUDA is available
        device_augment = recipe.augment.device_augment
        options = FastPathOptions(device_augment=torch.cuda.is_available() if device_augment is None else device_augment)
    return FastTrainTransform.of(build_train_transform(recipe), options, recipe.model.in_chans)
