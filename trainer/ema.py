"""Exponential moving average of the weights, over de-duplicated parameters.

timm's ModelEmaV2/V3 walk `state_dict()`, where a tensor shared by two modules (a GroupedMLP's
MLP) appears under both names, so it is averaged twice per step and its effective decay becomes
decay**2. Here the pairs come from `named_parameters()` / `named_buffers()`, which yield a shared
tensor once, and the copy is a `deepcopy`, which keeps the tie: one update per tensor per step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_model
from torch import nn

from models import save_model_file


class ParameterEma:
    """`ema = decay * ema + (1 - decay) * weights`, once per optimizer update.

    The averaged copy lives on the model's device in float32 (the master weights' dtype), in eval
    mode and without gradients; evaluate it with `ema.module`.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        # float32 whatever the model holds: a bf16 average would round away every update smaller
        # than 2^-8 of a weight, i.e. all of them at decay 0.9998 (DeepSpeed keeps bf16 module weights)
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.num_updates = 0

    @staticmethod
    def _pairs(ema: nn.Module, model: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_named = dict(getattr(ema, kind)())
        model_named = dict(getattr(model, kind)())
        if ema_named.keys() != model_named.keys():
            missing = sorted(ema_named.keys() ^ model_named.keys())[:3]
            raise ValueError(f"EMA and model {kind} differ (e.g. {missing}); build the EMA after the variant")
        return [ema_named[n] for n in ema_named], [model_named[n] for n in ema_named]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average `model`'s current weights in (pass the unwrapped model, not DDP)."""
        ema_params, params = self._pairs(self.module, model, "named_parameters")
        weight = 1.0 - self.decay
        same = [(e, p) for e, p in zip(ema_params, params) if e.dtype == p.dtype and e.device == p.device]
        if same:
            torch._foreach_lerp_([e for e, _ in same], [p for _, p in same], weight)
        for e, p in zip(ema_params, params):
            if e.dtype != p.dtype or e.device != p.device:  # e.g. DeepSpeed keeps bf16 module weights
                e.lerp_(p.to(device=e.device, dtype=e.dtype), weight)
        for e, b in zip(*self._pairs(self.module, model, "named_buffers")):
            e.copy_(b)
        self.num_updates += 1

    def save(self, path: str | Path) -> None:
        save_model_file(self.module, path)

    def load(self, path: str | Path) -> None:
        load_model(self.module, str(path), strict=True, device=str(next(self.module.parameters()).device))
