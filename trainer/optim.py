"""Parameter groups, the optimizer and the per-update learning-rate schedule.

- Groups come from `named_parameters()`, which yields a shared tensor (a GroupedMLP's MLP) once,
  via timm's `param_groups_weight_decay`: no weight decay on biases, 1-d parameters (norms) and
  the names in `model.no_weight_decay()` (pos_embed, cls_token, ...).
- `optim.trainable` glob patterns freeze every other parameter (P3's component finetuning); the
  optimizer only ever sees trainable parameters.
- `lr` is the value at `optim.lr_reference_batch`; it is scaled linearly with the global batch.
- The schedule is timm's, stepped once per optimizer update (`t_in_epochs=False`).
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

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
    """Linear warm-up from `warmup_lr`, then cosine to `min_lr` (or constant), per optimizer update.

    As in DeiT (timm's default `warmup_prefix=False`), the cosine spans all updates and the
    warm-up replaces its first part.
    """
    total = schedule_cfg.epochs * updates_per_epoch
    warmup = warmup_updates(schedule_cfg, updates_per_epoch)
    if warmup >= total:
        raise RecipeError(f"schedule: warm-up of {warmup} updates is not shorter than the run's {total} updates")
    common = dict(warmup_t=warmup, warmup_lr_init=schedule_cfg.warmup_lr, t_in_epochs=False)
    if schedule_cfg.kind == "cosine":
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=schedule_cfg.min_lr, cycle_limit=1, **common)
    return StepLRScheduler(optimizer, decay_t=total + 1, decay_rate=1.0, **common)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return max(group["lr"] for group in optimizer.param_groups)
