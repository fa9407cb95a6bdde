"""The reference transforms, built from `recipe.augment`: timm's training transform (RandomResizedCrop,
flip, RandAugment or colour jitter, normalise, random erasing; with Pillow 13's 0-bit posterize
restored), its evaluation transform (resize, centre crop, normalise), and Mixup/CutMix. The fast
training path (`trainer.data.fast_transform`) is defined as, and tested against, these."""

from __future__ import annotations

from typing import Any

from PIL import Image
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment

from trainer.data.sources import DataError

__all__ = ["build_eval_transform", "build_mixup", "build_train_transform", "posterize_zero_bits_ok"]


def _input_size(recipe: Any) -> tuple[int, int, int]:
    m, a = recipe.model, recipe.augment
    if len(a.mean) != m.in_chans:
        raise DataError(f"augment.mean = {a.mean} and augment.std = {a.std} need one value per channel "
                        f"(model.in_chans = {m.in_chans})")
    return m.in_chans, m.img_size, m.img_size


def build_train_transform(recipe: Any) -> Any:
    """timm's ImageNet training transform from `recipe.augment`: RandomResizedCrop(scale, ratio),
    flip, RandAugment (`auto_augment`) or colour jitter, normalise, random erasing."""
    a = recipe.augment
    transform = create_transform(
        _input_size(recipe), is_training=True, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
        color_jitter=a.color_jitter or None, auto_augment=a.auto_augment, interpolation=a.train_interpolation,
        mean=tuple(a.mean), std=tuple(a.std), re_prob=a.reprob, re_mode=a.remode, re_count=a.recount)
    _allow_zero_bit_posterize(transform)
    return transform


def posterize_zero_bits_ok(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives the all-black image that Pillow < 13 produced.

    timm maps RandAugment magnitude 10 (reached whenever `mstd` noise clips at the top) to 0 bits
    for PosterizeIncreasing, and AutoAugment's Posterize level 0 to 0 bits; Pillow 13 rejects
    bits < 1 with a ValueError: with rand-m9-mstd0.5-inc1 about one image in 2,000 (measured), so
    an unpatched ImageNet run would not finish its first epoch.
    """
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return timm_auto_augment.posterize(image, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(transform: Any) -> None:
    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))  # RandAugment, AugMix
        for sub_policy in getattr(step, "policy", []):  # AutoAugment
            ops += list(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
                op.aug_fn = posterize_zero_bits_ok


def build_eval_transform(recipe: Any) -> Any:
    """Resize to img_size / crop_pct, centre-crop img_size, normalise (timm's eval transform)."""
    a = recipe.augment
    return create_transform(_input_size(recipe), is_training=False, interpolation=a.eval_interpolation,
                            mean=tuple(a.mean), std=tuple(a.std), crop_pct=a.crop_pct)


def build_mixup(recipe: Any) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing, or None when both alphas are 0."""
    a = recipe.augment
    if a.mixup <= 0 and a.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode=a.mixup_mode, label_smoothing=a.label_smoothing, num_classes=recipe.model.num_classes)
