"""Parameter and MAC counts of a ViT, in P2's conventions.

- params: unique parameters (a GroupedMLP's shared MLP counted once).
- mlp_params / unique_mlps: parameters inside `blocks[i].mlp`, and how many distinct MLP modules.
- macs_linear: multiply-accumulates of the linear layers and the patch-embedding convolution
  (P2's table: ViT-B/16 16.9 G).
- macs_total: plus the attention matmuls QK^T and AV (ViT-B/16 17.6 G).
MACs are counted by torch's FlopCounterMode on one image; run it on a meta-device model to
count ViT-L without allocating its weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# aten ops of nn.Linear and the patch-embed Conv2d; everything else with FLOPs is attention.
_LINEAR_OPS = {"aten.addmm", "aten.mm", "aten.convolution", "aten._convolution", "aten.linear"}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() de-duplicates shared tensors


def _mlp_modules(model: nn.Module) -> list[nn.Module]:
    unique: dict[int, nn.Module] = {}
    for block in getattr(model, "blocks", []):
        mlp = getattr(block, "mlp", None)
        if mlp is not None:
            unique.setdefault(id(mlp), mlp)
    return list(unique.values())


@dataclass
class ModelProfile:
    name: str
    params: int
    mlp_params: int
    unique_mlps: int
    depth: int
    embed_dim: int
    img_size: int
    macs_linear: int
    macs_total: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> tuple[int, int]:
    """(linear + patch-embed MACs, total MACs) of one forward pass on one image."""
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    per_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    linear = sum(f for op, f in per_op.items() if op in _LINEAR_OPS)
    total = sum(per_op.values())
    return linear // 2, total // 2


def profile_model(model: nn.Module, name: str = "", img_size: int | None = None) -> ModelProfile:
    if img_size is None:
        img_size = model.patch_embed.img_size[0]
    in_chans = model.patch_embed.proj.in_channels
    macs_linear, macs_total = count_macs(model, img_size, in_chans)
    mlps = _mlp_modules(model)
    mlp_param_count = sum(count_parameters(m) for m in mlps)
    return ModelProfile(
        name=name or type(model).__name__,
        params=count_parameters(model),
        mlp_params=mlp_param_count,
        unique_mlps=len(mlps),
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        img_size=img_size,
        macs_linear=macs_linear,
        macs_total=macs_total,
    )


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's floating-point weights are held in: what its inputs must be cast to when no
    autocast does it (DeepSpeed keeps bf16/fp16 weights and does not autocast)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
