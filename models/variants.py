"""P2's MLP parameter-reduction variants, applied in place to a timm VisionTransformer.

- GroupedMLP: blocks k*i ... k*i+k-1 share one MLP module object.
- ShallowMLP: keep the first floor(ratio * hidden) hidden units of every MLP.
- ThinMLP: a smaller `mlp_ratio` at creation (done by the factory, nothing to apply here).
- Truncated: keep the first d blocks, with the final norm and head.

Apply a variant before any optimizer, EMA or `accelerator.prepare` sees the model.

A GroupedMLP model's `load_state_dict(sd, strict=True)` accepts state dicts that store each shared
tensor once (`models.save_model_file`, safetensors' `save_model`), e.g. through
`timm.create_model(name, checkpoint_path=...)`; see `load_tied_state_dict`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import Mlp
from torch import nn

from models.errors import UserError

VARIANT_KINDS = ("none", "grouped_mlp", "shallow_mlp", "thin_mlp", "truncated")


class VariantError(UserError):
    """A variant that cannot be applied to this model as asked."""


def _blocks(model: nn.Module) -> nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise VariantError(f"{type(model).__name__} has no `blocks`; variants need a timm VisionTransformer")
    return blocks


def apply_grouped_mlp(model: nn.Module, group_size: int = 2, init_scale: float | None = None,
                      rescale: bool = True) -> nn.Module:
    """Blocks k*i ... k*i+k-1 use the MLP of block k*i; its fc1.weight, fc1.bias, fc2.weight are scaled.

    The scale (default 1/sqrt(k)) keeps the residual-stream variance of the shared MLP at that of one
    block's, since its output is added k times. fc2.bias is left unscaled, as in P2. Norms,
    attention and drop-path stay per block. `rescale=False` ties without touching the values
    (used when loading weights that were trained tied).
    """
    blocks = _blocks(model)
    depth = len(blocks)
    if group_size < 1:
        raise VariantError(f"variant.group_size = {group_size} must be >= 1")
    if depth % group_size:
        raise VariantError(f"variant.group_size = {group_size} does not divide the model depth {depth}")
    scale = 1.0 / math.sqrt(group_size) if init_scale is None else init_scale
    for start in range(0, depth, group_size):
        shared = blocks[start].mlp
        for offset in range(1, group_size):
            blocks[start + offset].mlp = shared
        if rescale and scale != 1.0:
            with torch.no_grad():
                shared.fc1.weight.mul_(scale)
                if shared.fc1.bias is not None:
                    shared.fc1.bias.mul_(scale)
                shared.fc2.weight.mul_(scale)
    model.load_state_dict = partial(load_tied_state_dict, model)
    return model


def load_tied_state_dict(model: nn.Module, state_dict, strict: bool = True, assign: bool = False):
    """`model.load_state_dict` that, when strict, fills each name of a shared tensor the state dict
    lacks from a name of the same tensor it has. A tensor none of whose names is stored, and a key the
    model does not have, are still errors.

    strict=False is torch's plain load: it reports the unstored tied names as missing, which is what
    `safetensors.torch.load_model` (strict or not) relies on to recognise them as ties.
    """
    if strict:
        by_tensor: dict[int, list[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            by_tensor.setdefault(id(tensor), []).append(name)
        aliases = {}
        for names in by_tensor.values():
            stored = next((n for n in names if n in state_dict), None)
            if stored is not None:
                aliases.update({n: state_dict[stored] for n in names if n not in state_dict})
        if aliases:
            state_dict = {**state_dict, **aliases}
    return nn.Module.load_state_dict(model, state_dict, strict=strict, assign=assign)


def _check_sliceable(mlp: nn.Module, where: str) -> None:
    if type(mlp) is not Mlp:
        raise VariantError(
            f"shallow_mlp cannot slice {where} of type {type(mlp).__name__}: only timm's plain Mlp "
            "(fc1 -> act -> fc2) has hidden units that can be dropped independently (GLU/SwiGLU pair them)")
    if not isinstance(mlp.norm, nn.Identity):
        raise VariantError(f"shallow_mlp cannot slice {where}: its hidden-size norm mixes all hidden units")
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise VariantError(f"shallow_mlp cannot slice {where}: fc1/fc2 are not nn.Linear")


def _sliced_linear(linear: nn.Linear, rows: slice | None = None, cols: slice | None = None) -> nn.Linear:
    weight = linear.weight[rows or slice(None), cols or slice(None)]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows] if rows is not None else linear.bias)
    return out


def apply_shallow_mlp(model: nn.Module, ratio: float = 0.5, init: str = "slice") -> nn.Module:
    """Keep the first floor(ratio * hidden) units: fc1 rows and bias, fc2 columns.

    `init="slice"` keeps the values of the full-width init (with timm's fan-in-independent
    trunc_normal(0.02) init this equals a fresh narrow MLP in distribution); `init="reinit"`
    re-initialises the narrow layers with timm's ViT init.
    """
    if init not in ("slice", "reinit"):
        raise VariantError(f"variant.shallow_init = {init!r}: expected 'slice' or 'reinit'")
    if not 0.0 < ratio <= 1.0:
        raise VariantError(f"variant.shallow_ratio = {ratio} must be in (0, 1]")
    seen: dict[int, Mlp] = {}
    for index, block in enumerate(_blocks(model)):
        mlp = block.mlp
        if id(mlp) in seen:  # already sliced through a tie
            continue
        _check_sliceable(mlp, f"blocks[{index}].mlp")
        keep = math.floor(ratio * mlp.fc1.out_features)
        if keep < 1:
            raise VariantError(f"variant.shallow_ratio = {ratio} keeps no hidden unit of {mlp.fc1.out_features}")
        mlp.fc1 = _sliced_linear(mlp.fc1, rows=slice(0, keep))
        mlp.fc2 = _sliced_linear(mlp.fc2, cols=slice(0, keep))
        if init == "reinit":
            for linear in (mlp.fc1, mlp.fc2):
                nn.init.trunc_normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        seen[id(mlp)] = mlp
    return model


def truncate_depth(model: nn.Module, keep_depth: int) -> nn.Module:
    """Keep the first `keep_depth` blocks of a depth-D model; final norm and head stay."""
    blocks = _blocks(model)
    if not 1 <= keep_depth <= len(blocks):
        raise VariantError(f"variant.keep_depth = {keep_depth} must be between 1 and the model depth {len(blocks)}")
    model.blocks = nn.Sequential(*list(blocks)[:keep_depth])
    if hasattr(model, "feature_info"):
        model.feature_info = model.feature_info[:keep_depth]
    return model


def apply_variant(model: nn.Module, kind: str = "none", *, group_size: int = 2,
                  group_init_scale: float | None = None, shallow_ratio: float = 0.5,
                  shallow_init: str = "slice", thin_mlp_ratio: float = 2.0,
                  keep_depth: int | None = None, rescale: bool = True) -> nn.Module:
    """Apply one variant in place. `thin_mlp` must be requested at creation (see `create_vit`)."""
    del thin_mlp_ratio  # consumed at creation time
    if kind in ("none", "thin_mlp"):
        return model
    if kind == "grouped_mlp":
        return apply_grouped_mlp(model, group_size, group_init_scale, rescale=rescale)
    if kind == "shallow_mlp":
        return apply_shallow_mlp(model, shallow_ratio, shallow_init)
    if kind == "truncated":
        if keep_depth is None:
            raise VariantError("variant.kind = 'truncated' needs variant.keep_depth")
        return truncate_depth(model, keep_depth)
    raise VariantError(f"variant.kind = {kind!r}: expected one of {', '.join(VARIANT_KINDS)}")
