"""The training loop, top to bottom: one file holds the order of a run.

    build the run (trainer/run.py) -> for every optimizer update:
        micro-batches: forward, backward (grad_accum_steps of them, `UpdateStep.micro_batch`)
        one all-reduce of [loss, stop flag]; a non-finite loss skips the update on every process
        clip -> plug-ins' on_before_optimizer_step -> optimizer step -> schedule -> EMA
        evaluate if due
        diagnostics if due (before the save: a kill in between redoes both from the previous checkpoint)
        log (before the save, so a checkpoint's step is already in metrics.jsonl)
        save a checkpoint if due (periodic, or a new best top-1)
        plug-ins' on_step_end
        stop on preemption (save first) or at max_steps / the last epoch
    final save -> summary.json -> plug-ins' on_train_end

Exact resume: the data position (epoch, batch in epoch), every RNG stream, optimizer, schedule
and EMA are in each checkpoint, so a resumed run continues the interrupted one bit for bit.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_compiled_module
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from models import parameter_dtype
from models.errors import UserError
from trainer.callbacks import Callback, StepRecord
from trainer.checkpoint import (
    TrainState,
    checkpoint_name,
    newest_verified_checkpoint,
    point,
    prune,
)
from trainer.evaluate import evaluate
from trainer.optim import ParameterEma, current_lr
from trainer.recipe_schema import Recipe
from trainer.run import Run, build_run
from trainer.save_restore import save_checkpoint
from trainer.training_diagnostics import TrainingDiagnostics


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    status: str  # "finished", "preempted" or "max_steps"
    state: TrainState
    run_dir: Path
    last_checkpoint: Path | None
    stop_signal: str | None = None


def build_criterion(recipe: Recipe, mixup: bool) -> nn.Module:
    if mixup:  # timm's Mixup already folds label smoothing into the soft targets
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=recipe.augment.label_smoothing)


@dataclass
class UpdateOutcome:
    loss: float  # mean over micro-batches and processes
    stop_requested: bool  # some process received SIGTERM/SIGINT
    grad_norm: float | None  # when clipping or asked for
    skipped: str | None = None  # "loss" or "gradient norm" when non-finite: no optimizer step


class UpdateStep:
    """One optimizer update: micro-batches through `accelerator.accumulate`, then clip, step, schedule, EMA.

    tools/benchmark_train.py times this same object, so the benchmark measures exactly what trains.
    Per update there is one host sync: the all-reduced [loss, stop flag] pair, which decides whether
    the update is applied and whether any process was asked to stop.
    """

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
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        # DeepSpeed bf16/fp16: the EMA averages the float32 masters (one gather of them per update), not the
        # bf16 module copies, whose rounding it would otherwise average in
        self.master_weights = None
        if self.deepspeed and self.input_dtype != torch.float32:
            from deepspeed.utils import safe_get_full_fp32_param

            self.master_weights = safe_get_full_fp32_param

    def micro_batch(self, images: torch.Tensor, targets: torch.Tensor,
                    before_optimizer_step: Callable[[], None] | None = None) -> bool:
        """Forward and backward of one micro-batch; True when it completes an update (then call `finish`).

        Under DeepSpeed the engine applies the update inside backward, so `before_optimizer_step` runs here,
        on the engine's gradients between its backward and its step (elsewhere `finish` runs it)."""
        # a float tensor, or the data fast path's uint8 TrainBatch: its .to() runs RandAugment (augment.device_augment),
        # normalisation and random erasing on the device, giving the float tensor the CPU transform would have
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                # float32 loss also where the weights themselves are half precision (DeepSpeed bf16/fp16,
                # which takes inputs in the weights' dtype and does not autocast)
                loss = self.criterion(self.forward(images.to(self.input_dtype)).float(), targets)
            if self.deepspeed and before_optimizer_step is not None and self.accelerator.sync_gradients:
                engine = self.accelerator.deepspeed_engine_wrapped.engine  # accelerate's backward, opened up
                engine.set_gradient_accumulation_boundary(is_boundary=True)
                engine.backward(loss)
                before_optimizer_step()
                engine.step()
            else:
                self.accelerator.backward(loss)
        self.window_loss += loss.detach().float()
        self.micro_batches += 1
        return self.accelerator.sync_gradients

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The model's forward; a compiled model that fails to compile is trained eager (one line says why)."""
        if not is_compiled_module(self.model):
            return self.model(images)
        try:
            return self.model(images)
        except Exception as error:  # inductor/dynamo failures come as many exception types
            reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            self.accelerator.print(f"warning: torch.compile failed ({type(error).__name__}: {reason[:160]}); "
                                   "training eager")
            self.model = self.model._orig_mod
            return self.model(images)

    def finish(self, updates_done: int, stop_requested: bool = False, want_grad_norm: bool = False,
               before_optimizer_step: Callable[[], None] | None = None) -> UpdateOutcome:
        """Apply the update; `before_optimizer_step` runs on the complete, unscaled gradients."""
        flags = torch.stack([self.window_loss / self.micro_batches,
                             torch.tensor(float(stop_requested), device=self.device)])
        loss, stop_flag = self.accelerator.reduce(flags, reduction="mean").tolist()
        self.window_loss.zero_()
        self.micro_batches = 0
        grad_norm, skipped = None, None if math.isfinite(loss) else "loss"
        if skipped is None and (self.clip_grad_norm or want_grad_norm):
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm or math.inf)
            grad_norm = float(norm) if norm is not None else None
            # an fp16 grad scaler skips inf/NaN steps itself (and lowers its scale); elsewhere they are ours to skip
            if grad_norm is not None and not math.isfinite(grad_norm) and self.accelerator.scaler is None:
                skipped = "gradient norm"
        elif skipped is None and before_optimizer_step is not None:
            self.accelerator.unscale_gradients()  # fp16: what optimizer.step() would do first; else a no-op
        if skipped is None:
            if before_optimizer_step is not None and not self.deepspeed:  # (DeepSpeed: in micro_batch)
                before_optimizer_step()
            self.optimizer.step()
            self.scheduler.step_update(updates_done + 1)
            if self.ema is not None:
                self.ema.update(self.unwrapped, step=updates_done + 1, master=self.master_weights)
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateOutcome(loss, stop_flag > 0, grad_norm, skipped)


class StopRequest:
    """Preemption: SIGTERM/SIGINT ask the loop to stop after the current update and save.

    The handler only sets a flag; the loop reads it once per update and agrees on it across
    processes (one rank may receive the signal a moment before the others), so every rank stops at
    the same step and the checkpoint is written collectively. A second SIGINT (Ctrl-C twice) raises
    KeyboardInterrupt at once.

    On Linux the process also asks the kernel for a SIGTERM when its parent exits (`PR_SET_PDEATHSIG`):
    `accelerate launch` dies of a SIGTERM sent to it alone without passing it on, and the trainer it
    leaves behind must still stop and save.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        parent = os.getppid()
        if _signal_on_parent_death(signal.SIGTERM) and os.getppid() != parent:
            self.signal_name = "SIGTERM"  # the parent died before the kernel could be asked
        return self

    def __exit__(self, *exc: object) -> None:
        _signal_on_parent_death(0)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _signal_on_parent_death(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, sig) on Linux (0 clears it); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _due(step: int, end_of_epoch: bool, completed_epochs: int, every_steps: int | None,
         every_epochs: int | None, last_epoch: bool) -> bool:
    """Every N steps, every N epochs at an epoch end, and at the end of the last epoch."""
    if every_steps and step % every_steps == 0:
        return True
    return bool(end_of_epoch and every_epochs and completed_epochs % every_epochs == 0) or last_epoch


def nonfinite_parts(run: Run) -> list[str]:
    """"weights" and/or "EMA" when any of their values is NaN or infinite (collective: shards are checked
    on every process)."""
    modules = {"weights": run.unwrapped_model, "EMA": run.ema_model}
    flags = []
    for module in modules.values():
        params = [p for p in module.parameters() if p.is_floating_point() and p.numel()] if module is not None else []
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
        flags.append((~finite).float().to(run.accelerator.device))
    bad = torch.stack(flags)
    if run.accelerator.num_processes > 1:
        bad = run.accelerator.reduce(bad, reduction="sum")
    return [name for name, flag in zip(modules, bad.tolist()) if flag > 0]


def save(run: Run, tags: list[str], diagnostics: TrainingDiagnostics | None, best: bool = False) -> Path:
    """Save this step's checkpoint (collective), point `best` at it if it is the new best, prune old ones.

    Never with non-finite weights or EMA: that ends the run as a non-finite step would.
    """
    state, root = run.state, run.run_dir.checkpoints
    bad = nonfinite_parts(run)
    if bad:
        _end_failed(run, diagnostics, f"non-finite {' and '.join(bad)} after step {state.step}: not saved")
    if run.recipe.data.skip_corrupt:  # collective; the count continues from here after a resume
        state.corrupt_images_skipped = run.log.corrupt_images_total()
    if best:
        tags = [*tags, "best"]
        state.best_checkpoint = checkpoint_name(state.step)
    path = save_checkpoint(root, run.accelerator, state, run.recipe, tags, model=run.model, optimizer=run.optimizer,
                           scheduler=run.scheduler, ema=run.ema)
    if run.is_main_process:
        if best:
            point(root, "best", path)
        prune(root, run.recipe.checkpoint.keep_last, {state.best_checkpoint} if state.best_checkpoint else set())
    run.accelerator.wait_for_everyone()
    run.saved_step, run.last_checkpoint = state.step, path
    run.callbacks.on_checkpoint(run, path, tags)
    return path


def _improves_best(run: Run, metrics: dict[str, float]) -> bool:
    """Whether this evaluation is the best so far (by `checkpoint.best_on`, on the validation set when
    data.val_fraction holds one out); records it in the state."""
    cfg = run.recipe.checkpoint
    if not cfg.save_best:
        return False
    prefix = "val_" if "val_top1" in metrics else ""
    value = metrics[f"{prefix}top1_ema" if cfg.best_on == "ema" and f"{prefix}top1_ema" in metrics else f"{prefix}top1"]
    if run.state.best_top1 is not None and value <= run.state.best_top1:
        return False
    run.state.best_top1 = value
    return True


def _end_failed(run: Run, diagnostics: TrainingDiagnostics | None, problem: str) -> NoReturn:
    """End a diverged run (no checkpoint of it is worth keeping), naming the newest checkpoint that verifies."""
    run.status = "failed"
    run.log.close()
    run.log.summary(run.state, run.status)
    if diagnostics is not None:
        diagnostics.finish(run)
    run.callbacks.on_train_end(run)
    good = newest_verified_checkpoint(run.run_dir.checkpoints)
    raise NonFiniteLossError(f"{problem}. Last good checkpoint: {good or 'none'}")


def _skip_or_stop(run: Run, out: UpdateOutcome, where: str, diagnostics: TrainingDiagnostics | None) -> None:
    """Count a non-finite loss or gradient norm; past train.nonfinite_max_skips, end the run."""
    state, limit = run.state, run.recipe.train.nonfinite_max_skips
    value = out.loss if out.skipped == "loss" else out.grad_norm
    state.nonfinite_skips += 1
    if state.nonfinite_skips <= limit:
        run.accelerator.print(f"warning: non-finite {out.skipped} ({value}) at {where}: update skipped "
                              f"({state.nonfinite_skips}/{limit})")
        return
    _end_failed(run, diagnostics, f"non-finite {out.skipped} ({value}) at {where}; {state.nonfinite_skips} bad "
                                  f"batches (train.nonfinite_max_skips = {limit})")


def _before_optimizer_step(run: Run, diagnostics: TrainingDiagnostics | None) -> None:
    """On the complete, unscaled gradients: the diagnostics' gradient norms, then the plug-ins."""
    if diagnostics is not None:
        diagnostics.before_optimizer_step(run)
    run.callbacks.on_before_optimizer_step(run)


def train(recipe: Recipe, run_dir: Path | str, resume: str | None = None,
          callbacks: Iterable[Callback] = ()) -> TrainResult:
    """Train `recipe` into `run_dir`; `resume` = "auto" or a checkpoint path; `callbacks` are your plug-ins."""
    run = build_run(recipe, run_dir, resume, callbacks)
    state, data, accelerator = run.state, run.data, run.accelerator
    epochs, accum, every = recipe.schedule.epochs, recipe.train.grad_accum_steps, recipe.checkpoint
    diagnostics = TrainingDiagnostics(run) if recipe.diagnostics.enabled else None
    updater = UpdateStep(accelerator, run.model, run.optimizer, run.scheduler, run.ema,
                         build_criterion(recipe, data.mixup_fn is not None), data.mixup_fn,
                         recipe.optim.clip_grad_norm)
    before_optimizer_step = partial(_before_optimizer_step, run, diagnostics)

    wall_base, session_start = state.wall_time_s, time.perf_counter()
    status, stop_signal = "max_steps", None
    run.log.start(state)
    run.callbacks.on_train_start(run)
    try:
        with StopRequest() as stop:
            run.model.train()
            while state.epoch < epochs and state.step < run.stop_at and stop_signal is None:
                epoch, batches_used = state.epoch, run.updates_per_epoch * accum  # a partial last update is dropped
                data.train_sampler.set_epoch(epoch, skip_batches=state.batch_in_epoch)
                batches = iter(data.train_loader)
                step_start, data_wait = time.perf_counter(), 0.0
                for micro in range(state.batch_in_epoch, batches_used):
                    wait_start = time.perf_counter()
                    images, targets = next(batches)
                    data_wait += time.perf_counter() - wait_start
                    if not updater.micro_batch(images, targets, before_optimizer_step):
                        continue
                    run.model = updater.model  # (the eager model, if compiling failed)

                    # --- the update: clip, step, schedule, EMA ---
                    log_step = (state.step + 1) % recipe.logging.every_steps == 0
                    out = updater.finish(state.step, stop.requested, want_grad_norm=log_step,
                                         before_optimizer_step=before_optimizer_step)
                    if out.skipped:
                        _skip_or_stop(run, out, f"step {state.step + 1} (epoch {epoch + 1}, batch {micro + 1})",
                                      diagnostics)
                    else:
                        state.step += 1
                    state.batch_in_epoch = micro + 1
                    end_of_epoch = state.batch_in_epoch == batches_used
                    if end_of_epoch:
                        state.epoch, state.batch_in_epoch = epoch + 1, 0
                        run.scheduler.step(state.epoch)  # a per-epoch schedule (schedule.step_on) moves here
                    step_time = time.perf_counter() - step_start
                    state.images_seen += run.geometry.global_batch
                    state.train_time_s += step_time
                    state.wall_time_s = wall_base + time.perf_counter() - session_start
                    if out.stop_requested:
                        stop_signal = stop.signal_name or "SIGTERM"  # another process was signalled
                    if out.skipped and not end_of_epoch and stop_signal is None:
                        step_start, data_wait = time.perf_counter(), 0.0
                        continue
                    last_epoch = end_of_epoch and state.epoch == epochs

                    # --- evaluate if due ---
                    improved = False
                    if _due(state.step, end_of_epoch, state.epoch, recipe.eval.every_steps, recipe.eval.every_epochs,
                            last_epoch):
                        metrics = evaluate(run.eval_models(), data.eval_loader, accelerator, data.num_classes)
                        if data.val_loader is not None:  # data.val_fraction: the held-out part picks the best
                            validation = evaluate(run.eval_models(), data.val_loader, accelerator, data.num_classes)
                            metrics = {**{f"val_{key}": value for key, value in validation.items()}, **metrics}
                        state.evals.append({"step": state.step, "epoch": round(state.step / run.updates_per_epoch, 4),
                                            **metrics})
                        improved = _improves_best(run, metrics)
                        run.log.evaluation(metrics, state)
                        run.callbacks.on_evaluate(run, metrics)

                    # --- diagnostics if due, log, save if due ---
                    periodic = _due(state.step, end_of_epoch, state.epoch, every.every_steps, every.every_epochs,
                                    last_epoch and bool(every.every_epochs))
                    tags = ["periodic"] if periodic else []
                    if diagnostics is not None:
                        diagnostics.measure_if_due(run, tags)
                    record = StepRecord(step=state.step, epoch=epoch, loss=out.loss, lr=current_lr(run.optimizer),
                                        grad_norm=out.grad_norm, images=run.geometry.global_batch, step_time_s=step_time,
                                        data_wait_s=data_wait, end_of_epoch=end_of_epoch)
                    run.log.step(record, state)
                    if periodic or improved:
                        save(run, tags, diagnostics, best=improved)
                    run.callbacks.on_step_end(run, record)

                    # --- stop ---
                    if stop_signal is not None:
                        status = "preempted"
                        if run.saved_step != state.step:
                            save(run, ["preempt"], diagnostics)
                        break
                    if state.step >= run.stop_at:
                        break
                    step_start, data_wait = time.perf_counter(), 0.0
    except UserError as error:  # e.g. a corrupt image in this process's shard: every process says what it hit
        error.raised_in_training = True
        raise
    state.finished = state.epoch >= epochs
    run.status = "finished" if state.finished else status
    state.wall_time_s = wall_base + time.perf_counter() - session_start
    if run.saved_step != state.step and state.step > 0:  # the final (or max_steps) save
        tags = ["final"] if state.finished else ["stopped"]
        if diagnostics is not None:
            diagnostics.measure_if_due(run, tags)
        save(run, tags, diagnostics)
    run.log.close()
    run.log.summary(state, run.status)
    if diagnostics is not None:
        diagnostics.finish(run)
    run.callbacks.on_train_end(run)
    accelerator.end_training()
    result = TrainResult(run.status, state, run.run_dir.root, run.last_checkpoint, stop_signal)
    # Free the run's objects (the prepared model's gloo work included) while the interpreter is fully
    # alive: the run and its plug-ins form reference cycles, and gloo work released during interpreter
    # finalisation can abort a process at exit (pytorch/pytorch#179291).
    del run, updater, diagnostics, before_optimizer_step
    gc.collect()
    return result
