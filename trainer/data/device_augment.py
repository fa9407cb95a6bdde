"""RandAugment on the device, in two halves sharing one op encoding: in the loader worker,
`recording_rand_augment` turns timm's RandAugment into a copy that draws exactly the same ops and
magnitudes but records them as (op code, args) instead of touching pixels; on the device,
`apply_device_augment` applies the recorded ops to the whole uint8 batch, re-implementing Pillow's
operations with the same integer/float arithmetic (equal to timm's per-image ops up to rare
1-level rounding differences)."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data import auto_augment as timm_auto_augment

from trainer.data.transforms import posterize_zero_bits_ok

__all__ = ["apply_device_augment", "recording_rand_augment"]


# --- recording the ops in the worker: timm's random draws, no pixels touched ---------------------------

# op codes of the device RandAugment (0 = nothing)
(_NONE, _AUTOCONTRAST, _EQUALIZE, _INVERT, _POSTERIZE, _SOLARIZE, _SOLARIZE_ADD, _COLOR, _CONTRAST, _BRIGHTNESS,
 _SHARPNESS, _AFFINE_BILINEAR, _AFFINE_BICUBIC, _ROT90) = range(14)
_OP_ARGS = 9  # affine: 6 matrix entries + 3 fill values
_PIL_INTERP = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


class _Unsupported(Exception):
    pass


class _RecordedImage:
    """What the recording RandAugment passes from op to op instead of a PIL image: the size, and the
    ops it would have applied."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.ops: list[tuple[int, tuple[float, ...]]] = []


def _pil_rotation_matrix(degrees: float, size: tuple[int, int]) -> list[float] | int:
    """Image.rotate(degrees) without expand/center/translate: its affine matrix, computed as Pillow
    does, or the number of quarter turns it applies as a transpose (0: a copy)."""
    angle = degrees % 360.0
    w, h = size
    if angle == 0:
        return 0
    if angle == 180 or (angle in (90, 270) and w == h):
        return int(angle // 90)
    center = (w / 2, h / 2)
    angle = -math.radians(angle)
    matrix = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
              round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    a, b, c, d, e, f = matrix
    x, y = -center[0], -center[1]
    matrix[2], matrix[5] = a * x + b * y + c, d * x + e * y + f
    matrix[2] += center[0]
    matrix[5] += center[1]
    return matrix


def _record_affine(img: _RecordedImage, matrix: Any, kwargs: dict) -> _RecordedImage:
    kwargs = dict(kwargs)
    resample = timm_auto_augment._interpolation(kwargs)  # the same random.choice as timm's _check_args_tf
    if isinstance(matrix, int):  # a transpose (rotate by a multiple of 90 degrees)
        if matrix:
            img.ops.append((_ROT90, (float(matrix),)))
        return img
    if resample not in _PIL_INTERP:
        raise _Unsupported(f"resample {resample}")
    fill = kwargs.get("fillcolor", timm_auto_augment._FILL)
    fill = (fill,) * 3 if isinstance(fill, int) else tuple(fill)
    code = _AFFINE_BILINEAR if resample == Image.Resampling.BILINEAR else _AFFINE_BICUBIC
    img.ops.append((code, (*map(float, matrix), *map(float, fill))))
    return img


def _record_simple(code: int, img: _RecordedImage, *args: Any, **_: Any) -> _RecordedImage:
    img.ops.append((code, tuple(float(a) for a in args)))
    return img


def _record_posterize(img: _RecordedImage, bits: int, **_: Any) -> _RecordedImage:
    if bits < 8:  # timm: >= 8 bits is the image itself; depthlab: <= 0 bits is black
        img.ops.append((_POSTERIZE, (float(max(bits, 0)),)))
    return img


def _record_solarize_add(img: _RecordedImage, add: int, thresh: int = 128, **_: Any) -> _RecordedImage:
    img.ops.append((_SOLARIZE_ADD, (float(add), float(thresh))))
    return img


def _record_geometric(kind: str, img: _RecordedImage, value: float, **kwargs: Any) -> _RecordedImage:
    w, h = img.size
    matrix = {"shear_x": lambda: (1, value, 0, 0, 1, 0), "shear_y": lambda: (1, 0, 0, value, 1, 0),
              "translate_x_rel": lambda: (1, 0, value * w, 0, 1, 0), "translate_y_rel": lambda: (1, 0, 0, 0, 1, value * h),
              "translate_x_abs": lambda: (1, 0, value, 0, 1, 0), "translate_y_abs": lambda: (1, 0, 0, 0, 1, value),
              "rotate": lambda: _pil_rotation_matrix(value, img.size)}[kind]()
    return _record_affine(img, matrix, kwargs)


_GEOMETRIC = ("shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs", "translate_y_abs", "rotate")


def _recorders() -> dict[Any, Callable[..., _RecordedImage]]:
    """timm aug_fn -> a function with its signature and random draws that records instead of applying
    (module-level partials: the transform pickles for spawned workers)."""
    aa = timm_auto_augment
    simple = {aa.auto_contrast: _AUTOCONTRAST, aa.equalize: _EQUALIZE, aa.invert: _INVERT, aa.solarize: _SOLARIZE,
              aa.color: _COLOR, aa.contrast: _CONTRAST, aa.brightness: _BRIGHTNESS, aa.sharpness: _SHARPNESS}
    out: dict[Any, Callable[..., _RecordedImage]] = {fn: functools.partial(_record_simple, code)
                                                     for fn, code in simple.items()}
    out.update({aa.posterize: _record_posterize, posterize_zero_bits_ok: _record_posterize,
                aa.solarize_add: _record_solarize_add})
    out.update({getattr(aa, kind): functools.partial(_record_geometric, kind) for kind in _GEOMETRIC})
    return out


def recording_rand_augment(rand_augment: Any) -> Any | None:
    """A copy of timm's RandAugment whose ops record (code, args) on a `_RecordedImage` with exactly the
    original's random draws; None when an op has no device implementation."""
    recorders = _recorders()
    ops = []
    for op in rand_augment.ops:
        recorder = recorders.get(op.aug_fn)
        if recorder is None:
            return None
        resample = op.kwargs.get("resample", timm_auto_augment._DEFAULT_INTERPOLATION)
        resamples = resample if isinstance(resample, (list, tuple)) else [resample]
        geometric = op.aug_fn in {getattr(timm_auto_augment, kind) for kind in _GEOMETRIC}
        if geometric and any(r not in _PIL_INTERP for r in resamples):
            return None  # nearest: Pillow uses fixed-point code there, not re-implemented
        op = copy.copy(op)
        op.aug_fn = recorder
        ops.append(op)
    recording = copy.copy(rand_augment)
    recording.ops = ops
    return recording


# --- applying the ops: Pillow's operations on uint8 batches -------------------------------------------

def _lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel lookup tables: x uint8 [n, C, H, W], lut int64 [n, C, 256]."""
    n, c = x.shape[:2]
    return lut.clamp(0, 255).gather(2, x.reshape(n, c, -1).long()).reshape(x.shape).to(torch.uint8)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    flat = x.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device)
    return hist.scatter_add_(1, flat, torch.ones_like(flat)).view(n, c, 256)


def _autocontrast(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    present = _histogram(x) > 0
    lo = present.to(torch.int64).argmax(-1, keepdim=True)
    hi = 255 - present.flip(-1).to(torch.int64).argmax(-1, keepdim=True)
    ix = torch.arange(256, device=x.device, dtype=torch.float64)
    scale = torch.full_like(lo, 255, dtype=torch.float64) / (hi - lo).clamp(min=1).to(torch.float64)  # true division
    offset = -lo.to(torch.float64) * scale
    lut = (ix * scale + offset).trunc().to(torch.int64)
    lut = torch.where(hi <= lo, ix.to(torch.int64), lut)
    return _lut(x, lut)


def _equalize(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    hist = _histogram(x)
    nonzero = hist > 0
    last = 255 - nonzero.flip(-1).to(torch.int64).argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    keep = (nonzero.sum(-1, keepdim=True) <= 1) | (step == 0)
    before = hist.cumsum(-1) - hist  # pixels below each level
    lut = (step // 2 + before) // step.clamp(min=1)
    identity = torch.arange(256, device=x.device, dtype=torch.int64).expand_as(lut)
    return _lut(x, torch.where(keep, identity, lut))


def _invert(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    return 255 - x


def _posterize(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    bits = args[:, 0].to(torch.int64)
    mask = torch.where(bits > 0, ~(2 ** (8 - bits.clamp(1, 8)) - 1), torch.zeros_like(bits)) & 0xFF
    return x & mask.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    thresh = args[:, 0].view(-1, 1, 1, 1)
    return torch.where(x.to(torch.float64) < thresh, x, 255 - x)


def _solarize_add(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    add = args[:, 0].to(torch.int64).view(-1, 1, 1, 1)
    thresh = args[:, 1].view(-1, 1, 1, 1)
    added = (x.to(torch.int64) + add).clamp(max=255).to(torch.uint8)
    return torch.where(x.to(torch.float64) < thresh, added, x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601-2 in 16.16 fixed point), int64 [n, 1, H, W]."""
    x = x.to(torch.int64)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, image, factor): float32 in1 + alpha * (in2 - in1), truncated, clipped."""
    alpha = factor.to(torch.float32).view(-1, 1, 1, 1)
    in1 = degenerate.to(torch.int64)
    diff = (image.to(torch.int64) - in1).to(torch.float32)
    out = in1.to(torch.float32) + alpha * diff
    out = out.clamp(0, 255).trunc().to(torch.uint8)
    out = torch.where(alpha == 0, degenerate.to(torch.uint8).expand_as(image), out)
    return torch.where(alpha == 1, image, out)


def _color(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    return _blend(_gray(x).expand_as(x), x, args[:, 0])


def _contrast(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    gray = _gray(x)
    mean = gray.flatten(1).sum(1).to(torch.float64) / gray[0].numel()
    mean = (mean + 0.5).floor().to(torch.int64).view(-1, 1, 1, 1)
    return _blend(mean.expand_as(x), x, args[:, 0])


def _brightness(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, args[:, 0])


_SMOOTH_SIDE = torch.tensor(1, dtype=torch.float32) / torch.tensor(13, dtype=torch.float32)
_SMOOTH_CENTRE = torch.tensor(5, dtype=torch.float32) / torch.tensor(13, dtype=torch.float32)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH as Pillow's 3x3 filter computes it (float32, its summation order; border kept)."""
    f = x.to(torch.float32)
    side, centre = _SMOOTH_SIDE.to(x.device), _SMOOTH_CENTRE.to(x.device)

    def row(r: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
        return r[..., :-2] * side + r[..., 1:-1] * middle + r[..., 2:] * side

    ss = 0.5 + row(f[..., 2:, :], side)
    ss = ss + row(f[..., 1:-1, :], centre)
    ss = ss + row(f[..., :-2, :], side)
    out = x.clone()
    out[..., 1:-1, 1:-1] = ss.clamp(0, 255).trunc().to(torch.uint8)
    return out


def _sharpness(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    return _blend(_smooth(x), x, args[:, 0])


def _affine(x: torch.Tensor, args: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """Image.transform(AFFINE) with Pillow's bilinear/bicubic transform filters (float64, its order of
    operations; neighbours clamped at the border, source points outside the image get the fill)."""
    n, c, height, width = x.shape
    dev = x.device
    ys = torch.arange(height, device=dev, dtype=torch.float64).view(1, -1, 1) + 0.5
    xs = torch.arange(width, device=dev, dtype=torch.float64).view(1, 1, -1) + 0.5
    a = [args[:, k].view(-1, 1, 1) for k in range(6)]
    xin = a[0] * xs + a[1] * ys + a[2]
    yin = a[3] * xs + a[4] * ys + a[5]
    inside = (xin >= 0) & (xin < width) & (yin >= 0) & (yin < height)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)
    x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
    taps = 4 if bicubic else 2
    if bicubic:
        x0, y0 = x0 - 1, y0 - 1
    k = torch.arange(taps, device=dev).view(1, taps, 1, 1)
    cols = (x0.unsqueeze(1) + k).clamp(0, width - 1)  # [n, taps, H, W]
    rows = (y0.unsqueeze(1) + k).clamp(0, height - 1)
    # every tap in one gather: index [n, rows, cols, H*W] -> pixels [n, C, rows, cols, H, W]
    index = (rows.unsqueeze(2) * width + cols.unsqueeze(1)).view(n, 1, -1).expand(n, c, -1)
    v = x.reshape(n, c, -1).to(torch.float64).gather(2, index).view(n, c, taps, taps, height, width)

    def cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        p1 = v2
        p2 = -v1 + v3
        p3 = 2 * (v1 - v2) + v3 - v4
        p4 = -v1 + v2 - v3 + v4
        return p1 + d * (p2 + d * (p3 + d * p4))

    if bicubic:  # along x for the 4 rows at once, then along y
        along_x = cubic(v[:, :, :, 0], v[:, :, :, 1], v[:, :, :, 2], v[:, :, :, 3], dx.unsqueeze(2))
        out = cubic(along_x[:, :, 0], along_x[:, :, 1], along_x[:, :, 2], along_x[:, :, 3], dy)
    else:
        along_x = v[:, :, :, 0] + (v[:, :, :, 1] - v[:, :, :, 0]) * dx.unsqueeze(2)
        out = along_x[:, :, 0] + (along_x[:, :, 1] - along_x[:, :, 0]) * dy
    out = out.clamp(0, 255).trunc().to(torch.uint8)
    fill = args[:, 6:6 + c].round().to(torch.uint8).view(n, c, 1, 1).expand_as(out)
    return torch.where(inside.unsqueeze(1), out, fill)


def _rot90(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    for quarter in (1, 2, 3):
        chosen = (args[:, 0] == quarter).nonzero().flatten()
        if len(chosen):
            out[chosen] = torch.rot90(x[chosen], quarter, dims=(-2, -1))
    return out


_DEVICE_OPS: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    _AUTOCONTRAST: _autocontrast, _EQUALIZE: _equalize, _INVERT: _invert, _POSTERIZE: _posterize,
    _SOLARIZE: _solarize, _SOLARIZE_ADD: _solarize_add, _COLOR: _color, _CONTRAST: _contrast,
    _BRIGHTNESS: _brightness, _SHARPNESS: _sharpness,
    _AFFINE_BILINEAR: functools.partial(_affine, bicubic=False), _AFFINE_BICUBIC: functools.partial(_affine, bicubic=True),
    _ROT90: _rot90,
}


def apply_device_augment(x: torch.Tensor, codes: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """Apply recorded RandAugment ops to the uint8 batch x [B, 3, H, W] where it lives: layer by layer,
    each op to the samples that drew it. `codes` [B, layers] stays on the CPU (grouping without a
    device sync); `args` [B, layers, _OP_ARGS] is on x's device."""
    x = x.clone()
    for layer in range(codes.shape[1]):
        column = codes[:, layer]
        for code in torch.unique(column).tolist():
            if code == _NONE:
                continue
            chosen_cpu = (column == code).nonzero().flatten()
            chosen = chosen_cpu.to(x.device, non_blocking=True)
            x[chosen] = _DEVICE_OPS[code](x[chosen], args[chosen, layer])
    return x
