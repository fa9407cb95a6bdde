"""What changes the weights each update: parameter groups, the optimizer, the learning-rate
schedule and the EMA of the weights.

- Groups come from `named_parameters()`, which yields a shared tensor (a GroupedMLP's MLP) once,
  via timm's `param_groups_weight_decay`: no weight decay on biases, 1-d parameters (norms) and
  the names in `model.no_weight_decay()` (pos_embed, cls_token, ...).
- `optim.trainable` glob patterns freeze every other parameter (P3's component finetuning); the
  optimizer only ever sees trainable parameters.
- `lr` is the value at `optim.lr_reference_batch`; it is scaled linearly with the global batch.
- The schedule is timm's, stepped once per optimizer update or once per epoch (`schedule.step_on`).
- The EMA averages de-duplicated parameters. timm's ModelEmaV2/V3 walk `state_dict()`, where a
  tensor shared by two modules (a GroupedMLP's MLP) appears under both names, so it is averaged
  twice per step and its effective decay becomes decay**2. Here the pairs come from
  `named_parameters()` / `named_buffers()`, which yield a shared tensor once, and the copy is a
  `deepcopy`, which keeps the tie: one update per tensor per step.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from models import save_model_file
from trainer.recipe import RecipeError


@dataclass(frozen=True)
class BatchGeometry:
    """How many images one optimizer update sees, and how the LR follows from it."""

    per_process: int
    num_processes: int
    grad_accum_steps: int

    @property
    def global_batch(self) -> int:
        return self.per_process * self.num_processes * self.grad_accum_steps


def scaled_lr(lr: float, global_batch: int, reference_batch: int | None) -> float:
    """Linear scaling rule: `lr` is the learning rate at `reference_batch` images per update."""
    return lr if reference_batch is None else lr * global_batch / reference_batch


def apply_trainable_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter whose name matches none of `patterns`; return the trainable names.

    An empty pattern list trains everything. A pattern matching no parameter is a user error
    (a typo would otherwise silently freeze the whole model).
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise RecipeError(f"optim.trainable: pattern {pattern!r} matches no parameter "
                              f"(names look like {names[0]!r}, {names[-1]!r})")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def no_weight_decay_names(model: nn.Module) -> set[str]:
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return set(names)


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups (decay / no decay) over the de-duplicated trainable parameters."""
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    return [g for g in groups if g["params"]]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices.pop() in ("cuda", "cpu", "mps", "xpu") and all(
        p.is_floating_point() for p in params)


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """AdamW (fused kernel where the parameters' device has one) or SGD with momentum."""
    groups = build_param_groups(model, optim_cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise RecipeError("optim.trainable leaves no trainable parameter")
    if optim_cfg.name == "adamw":
        kwargs = dict(lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
        if optim_cfg.fused and "fused" in inspect.signature(torch.optim.AdamW).parameters and \
                _fused_supported(params):
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, **kwargs)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=False)
    raise RecipeError(f"optim.name = {optim_cfg.name!r}: expected 'adamw' or 'sgd'")


def warmup_updates(schedule_cfg, updates_per_epoch: int) -> int:
    if schedule_cfg.warmup_steps is not None:
        return schedule_cfg.warmup_steps
    return round(schedule_cfg.warmup_epochs * updates_per_epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg, updates_per_epoch: int) -> Scheduler:
    """Linear warm-up from `warmup_lr`, then cosine to `min_lr` (or constant): timm's schedulers.

    `step_on: update` steps it once per optimizer update (`scheduler.step_update(n)`); `epoch` once per
    epoch (`scheduler.step(epoch)`), as timm's train.py does without --sched-on-updates (P2's runs), so
    the LR is constant within an epoch. The loop calls both; each is a no-op in the other mode.
    `warmup_prefix: false` (DeiT, P2: timm's default): the cosine spans the whole run and the warm-up
    replaces its start. `true` (P3's released code): the warm-up comes first and the cosine spans the
    updates after it.
    """
    per_epoch = schedule_cfg.step_on == "epoch"
    if per_epoch and schedule_cfg.warmup_steps is not None:
        raise RecipeError(f"schedule.warmup_steps = {schedule_cfg.warmup_steps} counts updates, but schedule.step_on "
                          "= 'epoch' steps the schedule once per epoch: give schedule.warmup_epochs instead")
    total = schedule_cfg.epochs if per_epoch else schedule_cfg.epochs * updates_per_epoch
    warmup = schedule_cfg.warmup_epochs if per_epoch else warmup_updates(schedule_cfg, updates_per_epoch)
    unit = "epochs" if per_epoch else "updates"
    if warmup >= total:
        raise RecipeError(f"schedule: warm-up of {warmup} {unit} is not shorter than the run's {total} {unit}")
    common = dict(warmup_t=warmup, warmup_lr_init=schedule_cfg.warmup_lr, warmup_prefix=schedule_cfg.warmup_prefix,
                  t_in_epochs=per_epoch)
    if schedule_cfg.kind == "cosine":
        span = total - warmup if schedule_cfg.warmup_prefix else total
        return CosineLRScheduler(optimizer, t_initial=span, lr_min=schedule_cfg.min_lr, cycle_limit=1, **common)
    return StepLRScheduler(optimizer, decay_t=total + 1, decay_rate=1.0, **common)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)


class ParameterEma:
    """`ema = decay * ema + (1 - decay) * weights`, once per optimizer update.

    The averaged copy lives on the model's device in float32 (the master weights' dtype), in eval
    mode and without gradients; evaluate it with `ema.module`.

    `walk="state_dict"` reproduces timm's `ModelEmaV3(decay)` as timm's train.py drives it (P2's
    reported EMA): it walks `state_dict()`, so a tensor shared by two modules is averaged twice per
    update (decay**2), and its first update (`step=1`) uses decay 0, copying the weights.
    """

    def __init__(self, model: nn.Module, decay: float, walk: str = "parameters"):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if walk not in ("parameters", "state_dict"):
            raise ValueError(f"EMA walk = {walk!r}: expected 'parameters' or 'state_dict'")
        self.decay, self.walk = decay, walk
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
    def update(self, model: nn.Module, step: int | None = None,
               master: Callable[[nn.Parameter], torch.Tensor] | None = None) -> None:
        """Average `model`'s current weights in (pass the unwrapped model, not DDP); `step` counts updates from 1.

        `master(param)` gives the float32 master of a half-precision parameter (DeepSpeed bf16/fp16 trains
        float32 masters behind bf16 module weights: `deepspeed.utils.safe_get_full_fp32_param`, a collective);
        the EMA then averages the masters, not their rounded copies."""
        if self.walk == "state_dict":
            self._update_like_timm_v3(model, step)
            return
        ema_params, params = self._pairs(self.module, model, "named_parameters")
        if master is not None:
            params = [master(p) if p.dtype != torch.float32 else p for p in params]
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

    def _update_like_timm_v3(self, model: nn.Module, step: int | None) -> None:
        weight = 1.0 if step == 1 else 1.0 - self.decay  # timm: get_decay(step=1) is 0
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_v.lerp_(model_v.to(device=ema_v.device, dtype=ema_v.dtype), weight)
            else:
                ema_v.copy_(model_v)
        self.num_updates += 1

    def save(self, path: str | Path) -> None:
        save_model_file(self.module, path)

    def load(self, path: str | Path) -> None:
        load_model(self.module, str(path), strict=True, device=str(next(self.module.parameters()).device))
