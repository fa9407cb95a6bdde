"""Build ViTs through timm, apply a variant, and remember how to rebuild them.

Every model carries `model.depthlab_spec = {"name", "kwargs", "variant"}`: calling
`create_vit(**spec)` rebuilds the same structure (GroupedMLP ties included), which is what
model files and checkpoints store next to the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from models.variants import VARIANT_KINDS, VariantError, apply_variant

SPEC_METADATA_KEY = "depthlab_spec"
# timm kwargs that say where weights come from, not what to build: the spec leaves them out.
WEIGHT_SOURCE_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def create_vit(name: str, variant: dict[str, Any] | None = None, *, pretrained: bool = False,
               **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, **kwargs)` followed by the variant, e.g.

    create_vit("vit_base_patch16_224", {"kind": "grouped_mlp", "group_size": 2}, num_classes=100)
    """
    variant = {k: v for k, v in (variant or {}).items()}
    kind = variant.get("kind", "none")
    if kind not in VARIANT_KINDS:
        raise VariantError(f"variant.kind = {kind!r}: expected one of {', '.join(VARIANT_KINDS)}")
    if kind == "thin_mlp":
        kwargs["mlp_ratio"] = variant.get("thin_mlp_ratio", 2.0)
    if kind == "grouped_mlp" and pretrained:
        raise VariantError("grouped_mlp with model.pretrained: the pretrained blocks have separate MLPs, "
                           "so tying them would silently discard half of them; train GroupedMLP from scratch")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            raise VariantError(f"model.name = {name!r} is not a timm model (e.g. {', '.join(close)})") from None
        raise
    except EntryNotFoundError:
        raise VariantError(
            f"model.pretrained: the weights of {name!r} are not in the local Hugging Face cache and the hub "
            "cannot be reached; download them once where there is network (timm.create_model(name, "
            "pretrained=True)), or pass a weights file as model.checkpoint") from None
    apply_variant(model, **variant, rescale=not pretrained)
    spec_kwargs = {k: v for k, v in kwargs.items() if k not in WEIGHT_SOURCE_KWARGS}
    model.depthlab_spec = {"name": name, "kwargs": spec_kwargs, "variant": variant}
    return model


def model_kwargs_from_recipe(model_cfg: Any) -> dict[str, Any]:
    """The timm kwargs a recipe's `model:` section asks for (unset overrides fall back to timm's)."""
    kwargs = dict(num_classes=model_cfg.num_classes, img_size=model_cfg.img_size, in_chans=model_cfg.in_chans,
                  drop_path_rate=model_cfg.drop_path_rate, drop_rate=model_cfg.drop_rate)
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        value = getattr(model_cfg, key)
        if value is not None:
            kwargs[key] = value
    kwargs.update(model_cfg.kwargs)
    return kwargs


def create_vit_from_recipe(recipe: Any, device: torch.device | str | None = None,
                           pretrained: bool | None = None) -> nn.Module:
    """The model a recipe describes, its variant applied. `device="meta"` allocates no weights;
    `pretrained=False` skips loading timm weights (e.g. to count parameters)."""
    pretrained = recipe.model.pretrained if pretrained is None else pretrained
    kwargs = model_kwargs_from_recipe(recipe.model)
    variant = dict(vars(recipe.variant))
    if variant["kind"] == "thin_mlp" and recipe.model.mlp_ratio is not None:
        raise VariantError("variant.kind = 'thin_mlp' sets mlp_ratio from variant.thin_mlp_ratio; "
                           f"remove model.mlp_ratio = {recipe.model.mlp_ratio}")
    if device is None:
        return create_vit(recipe.model.name, variant, pretrained=pretrained, **kwargs)
    with torch.device(device):
        return create_vit(recipe.model.name, variant, pretrained=pretrained, **kwargs)


def spec_of(model: nn.Module) -> dict[str, Any]:
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    model = getattr(model, "_orig_mod", model)  # torch.compile
    spec = getattr(model, "depthlab_spec", None)
    if spec is None:
        raise VariantError(f"{type(model).__name__} was not built by depthlab.create_vit; its structure "
                           "cannot be recorded for rebuilding")
    return spec


def save_model_file(model: nn.Module, path: str | Path, state_dict: dict | None = None) -> None:
    """Weights as safetensors (shared tensors stored once) with the rebuild spec in the metadata."""
    metadata = {SPEC_METADATA_KEY: json.dumps(spec_of(model))}
    if state_dict is None:
        save_model(model, str(path), metadata=metadata)
        return
    shell = rebuild_from_spec(spec_of(model), device="meta")
    shell.load_state_dict(state_dict, assign=True)
    save_model(shell, str(path), metadata=metadata)


def read_spec(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if SPEC_METADATA_KEY not in metadata:
        raise VariantError(f"{path} has no depthlab model spec in its metadata; it was not saved by depthlab")
    return json.loads(metadata[SPEC_METADATA_KEY])


def rebuild_from_spec(spec: dict[str, Any], device: torch.device | str | None = None) -> nn.Module:
    # Weights are loaded next, so the variant's init-time rescaling must not touch them twice.
    with torch.device(device or "cpu"):
        return create_vit(spec["name"], spec.get("variant"), **spec.get("kwargs", {}))


def load_model_file(path: str | Path, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the model saved by `save_model_file` (ties restored) and load its weights strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    model = rebuild_from_spec(read_spec(path), device=device)
    load_model(model, str(path), strict=True, device=str(device or "cpu"))
    return model
