"""Initialise a model from a weights file: finetuning, evaluating a trained model, analysis.

The file is a `.safetensors` state dict: `models.save_model_file` output (a run's `model.safetensors`
or `ema.safetensors`) or any timm-format state dict saved as safetensors. Keys are checked
strictly: a key of the file the model does not have, or a model key the file does not cover, is an
error naming the file and the keys — except the classifier head, which a backbone file may lack
(Google's original in-21k ViT-B/16, timm's `orig_in21k` tag, has none): the head then keeps its
fresh initialisation, and `WeightInit.reinitialised` and a warning say so. A GroupedMLP's shared MLP
is stored once; its tied names count as covered. Two shape mismatches are adapted, as timm does
when it loads pretrained weights: the classifier head when `num_classes` differs (it keeps its fresh
initialisation: finetuning on a new label set) and `pos_embed` when the patch grid differs
(resampled with `timm.layers.resample_abs_pos_embed`). Any other shape mismatch is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from models.errors import UserError

_logger = logging.getLogger(__name__)


class WeightInitError(UserError):
    """A weights file that cannot initialise the model (unreadable, other keys, other shapes)."""


@dataclass
class WeightInit:
    """What `load_initial_weights` did."""

    path: Path
    reinitialised: list[str] = field(default_factory=list)  # head keys left at their fresh init
    resampled: list[str] = field(default_factory=list)  # pos_embed resampled to the model's grid


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """Each state-dict name -> all names sharing its storage (itself included)."""
    by_storage: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) \
            if tensor.device.type != "meta" else (name,)
        by_storage.setdefault(key, []).append(name)
    return {name: names for names in by_storage.values() for name in names}


def _classifier_names(model: nn.Module) -> set[str]:
    classifier = (getattr(model, "default_cfg", None) or {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return {f"{n}.{suffix}" for n in names for suffix in ("weight", "bias")}


def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor], path: Path, info: WeightInit) -> None:
    expected = model.state_dict()
    classifier = _classifier_names(model)
    wrong = []
    for name in list(state):
        have, want = tuple(state[name].shape), tuple(expected[name].shape)
        if have == want:
            continue
        if name in classifier:
            state[name] = expected[name].detach().clone()  # new label set: keep the fresh head
            info.reinitialised.append(name)
        elif name == "pos_embed" and hasattr(model, "patch_embed"):
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            state[name] = resample_abs_pos_embed(state[name], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=prefix)
            if tuple(state[name].shape) != want:
                wrong.append(f"{name} {have} -> {want}")
            info.resampled.append(name)
        else:
            wrong.append(f"{name} {have} != {want}")
    if wrong:
        raise WeightInitError(f"model.checkpoint = {path}: shapes do not fit the recipe's model: "
                              f"{'; '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}")


def load_initial_weights(model: nn.Module, path: str | Path) -> WeightInit:
    """Load the safetensors file `path` into `model` in place (see the module docstring)."""
    path = Path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightInitError(f"model.checkpoint = {path}: not a readable safetensors file ({e})") from None
    tied = _tied_names(model)
    expected = set(tied)
    unexpected = sorted(set(state) - expected)
    missing = sorted(n for n in expected - set(state) if not any(t in state for t in tied[n]))
    fresh_head = [name for name in missing if name in _classifier_names(model)]  # a backbone without a head
    missing = [name for name in missing if name not in fresh_head]
    if unexpected or missing:
        parts = [f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                 for what, keys in (("unexpected keys", unexpected), ("missing keys", missing)) if keys]
        raise WeightInitError(f"model.checkpoint = {path} does not match the recipe's model "
                              f"{type(model).__name__}: {'; '.join(parts)}. Check model.name, model.depth, "
                              "variant.kind and the other model settings against the checkpoint's recipe")
    current = model.state_dict()
    for name in fresh_head:
        state[name] = current[name].detach().clone()
    for name in expected - set(state):  # tied duplicates stored once
        state[name] = state[next(t for t in tied[name] if t in state)]
    info = WeightInit(path, reinitialised=list(fresh_head))
    _fit_shapes(model, state, path, info)
    model.load_state_dict(state, strict=True)
    if fresh_head:
        _logger.warning("model.checkpoint %s has no classifier: %s initialised fresh (a backbone)", path,
                        ", ".join(fresh_head))
    elif info.reinitialised:
        _logger.warning("model.checkpoint %s: classifier %s re-initialised (different num_classes)",
                        path, ", ".join(info.reinitialised))
    if info.resampled:
        _logger.warning("model.checkpoint %s: pos_embed resampled to the %s patch grid",
                        path, tuple(model.patch_embed.grid_size))
    return info
