"""One optimizer update: micro-batches through `accelerator.accumulate`, then clip, step, schedule, EMA.

Used by the loop and by tools/benchmark_train.py, so the benchmark times exactly what trains.
Per update there is one host sync: the all-reduced [loss, stop flag] pair, which decides whether
the update is applied (a non-finite loss skips it on every process alike) and whether any
process was asked to stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from models import parameter_dtype
from trainer.ema import ParameterEma


@dataclass
class UpdateOutcome:
    loss: float  # mean over micro-batches and processes
    stop_requested: bool  # some process received SIGTERM/SIGINT
    grad_norm: float | None  # when clipping or asked for
    skipped: bool  # non-finite loss: gradients dropped, no optimizer step


class UpdateStep:
    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, ema: ParameterEma | None, criterion: nn.Module, mixup_fn=None,
                 clip_grad_norm: float | None = None):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.scheduler, self.ema, self.criterion, self.mixup_fn = scheduler, ema, criterion, mixup_fn
        self.clip_grad_norm = clip_grad_norm
        self.unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        self.device = accelerator.device
        self.input_dtype = parameter_dtype(self.unwrapped)
        self.window_loss = torch.zeros((), device=self.device)
        self.micro_batches = 0

    def micro_batch(self, images: torch.Tensor, targets: torch.Tensor) -> bool:
        """Forward and backward of one micro-batch; True when it completes an update (then call `finish`)."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                # float32 loss also where the weights themselves are half precision (DeepSpeed bf16/fp16,
                # which takes inputs in the weights' dtype and does not autocast)
                loss = self.criterion(self.model(images.to(self.input_dtype)).float(), targets)
            self.accelerator.backward(loss)
        self.window_loss += loss.detach().float()
        self.micro_batches += 1
        return self.accelerator.sync_gradients

    def finish(self, updates_done: int, stop_requested: bool = False, want_grad_norm: bool = False,
               before_optimizer_step: Callable[[], None] | None = None) -> UpdateOutcome:
        """Apply the update; `before_optimizer_step` runs on the complete, unscaled gradients."""
        flags = torch.stack([self.window_loss / self.micro_batches,
                             torch.tensor(float(stop_requested), device=self.device)])
        loss, stop_flag = self.accelerator.reduce(flags, reduction="mean").tolist()
        self.window_loss.zero_()
        self.micro_batches = 0
        grad_norm, skipped = None, not math.isfinite(loss)
        if not skipped:
            if self.clip_grad_norm or want_grad_norm:
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm or math.inf)
                grad_norm = float(norm) if norm is not None else None
            elif before_optimizer_step is not None:
                self.accelerator.unscale_gradients()  # fp16: what optimizer.step() would do first; else a no-op
            if before_optimizer_step is not None:
                before_optimizer_step()
            self.optimizer.step()
            self.scheduler.step_update(updates_done + 1)
            if self.ema is not None:
                self.ema.update(self.unwrapped)
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateOutcome(loss, stop_flag > 0, grad_norm, skipped)
