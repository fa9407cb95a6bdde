"""The training loop: epochs of optimizer updates, evaluation, callbacks, stopping.

Per update (grad_accum_steps micro-batches, see trainer/step.py): forward/backward -> one
all-reduce of [loss, stop flag] -> skip the update if the loss is not finite -> clip ->
callbacks' on_before_optimizer_step -> step -> schedule -> EMA. Then: evaluate if due ->
callbacks (logging, checkpointing, yours) -> stop on preemption or max_steps. Evaluation runs
before the step's callbacks, so a checkpoint written at that step already holds its result.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from trainer.callbacks import Callback, StepRecord
from trainer.checkpoint import latest_checkpoint
from trainer.checkpointing import CheckpointCallback
from trainer.evaluate import evaluate
from trainer.optim import current_lr
from trainer.recipe_schema import Recipe
from trainer.setup import Training, build_criterion, build_model, build_training
from trainer.signals import StopRequest
from trainer.state import TrainState

__all__ = ["NonFiniteLossError", "TrainResult", "build_criterion", "build_model", "train"]


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    status: str  # "finished", "preempted" or "max_steps"
    state: TrainState
    run_dir: Path
    last_checkpoint: Path | None
    stop_signal: str | None = None


def _due(step: int, end_of_epoch: bool, completed_epochs: int, every_steps: int | None,
         every_epochs: int | None, last: bool) -> bool:
    if every_steps and step % every_steps == 0:
        return True
    return bool(end_of_epoch and every_epochs and completed_epochs % every_epochs == 0) or last


def _skip_or_stop(t: Training, loss: float, where: str) -> None:
    """Count a non-finite loss; past train.nonfinite_max_skips, end the run with a NonFiniteLossError."""
    state, limit = t.state, t.ctx.recipe.train.nonfinite_max_skips
    state.nonfinite_skips += 1
    if state.nonfinite_skips > limit:
        t.ctx.extras["status"] = "failed"
        t.callbacks.on_train_end(t.ctx)
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at {where}; {state.nonfinite_skips} bad batches (train.nonfinite_max_skips "
            f"= {limit}). Last good checkpoint: {latest_checkpoint(t.run.checkpoints) or 'none'}")
    t.accelerator.print(f"warning: non-finite loss ({loss}) at {where}: update skipped ({state.nonfinite_skips}/{limit})")


def train(recipe: Recipe, run_dir: Path, resume: str | None = None, callbacks: Iterable[Callback] = ()) -> TrainResult:
    """Train `recipe` into `run_dir`; `resume` = "auto" or a checkpoint path; `callbacks` add to the built-ins."""
    t = build_training(recipe, run_dir, resume, callbacks)
    state, data, ctx = t.state, t.data, t.ctx
    epochs, accum = recipe.schedule.epochs, recipe.train.grad_accum_steps
    checkpointer = t.callbacks.find(CheckpointCallback)
    wall_base, session_start = state.wall_time_s, time.perf_counter()
    status, stop_signal = "max_steps", None
    t.callbacks.on_train_start(ctx)

    before_optimizer_step = partial(t.callbacks.on_before_optimizer_step, ctx)
    with StopRequest() as stop:
        t.parts.model.train()
        while state.epoch < epochs and state.step < t.stop_at and stop_signal is None:
            epoch, batches_used = state.epoch, t.updates_per_epoch * accum  # a partial last update is dropped
            data.train_sampler.set_epoch(epoch, skip_batches=state.batch_in_epoch)
            batches = iter(data.train_loader)
            step_start, data_wait = time.perf_counter(), 0.0
            for micro in range(state.batch_in_epoch, batches_used):
                wait_start = time.perf_counter()
                images, targets = next(batches)
                data_wait += time.perf_counter() - wait_start
                if not t.updater.micro_batch(images, targets):
                    continue
                log_step = (state.step + 1) % recipe.logging.every_steps == 0
                out = t.updater.finish(state.step, stop.requested, want_grad_norm=log_step,
                                       before_optimizer_step=before_optimizer_step)
                if out.skipped:
                    _skip_or_stop(t, out.loss, f"step {state.step + 1} (epoch {epoch + 1}, batch {micro + 1})")
                else:
                    state.step += 1

                state.batch_in_epoch = micro + 1
                end_of_epoch = state.batch_in_epoch == batches_used
                if end_of_epoch:
                    state.epoch, state.batch_in_epoch = epoch + 1, 0
                step_time = time.perf_counter() - step_start
                state.images_seen += t.geometry.global_batch
                state.train_time_s += step_time
                state.wall_time_s = wall_base + time.perf_counter() - session_start
                if out.stop_requested:
                    stop_signal = stop.signal_name or "SIGTERM"  # another process was signalled
                if out.skipped and not end_of_epoch and stop_signal is None:
                    step_start, data_wait = time.perf_counter(), 0.0
                    continue

                if _due(state.step, end_of_epoch, state.epoch, recipe.eval.every_steps, recipe.eval.every_epochs,
                        last=end_of_epoch and state.epoch == epochs):
                    metrics = evaluate(t.eval_models, data.eval_loader, t.accelerator, data.num_classes)
                    state.evals.append({"step": state.step, "epoch": round(state.step / t.updates_per_epoch, 4),
                                        **metrics})
                    t.callbacks.on_evaluate(ctx, metrics)
                t.callbacks.on_step_end(ctx, StepRecord(
                    step=state.step, epoch=epoch, loss=out.loss, lr=current_lr(t.parts.optimizer),
                    grad_norm=out.grad_norm, images=t.geometry.global_batch, step_time_s=step_time,
                    data_wait_s=data_wait, end_of_epoch=end_of_epoch))
                if stop_signal is not None:
                    status = "preempted"
                    if checkpointer is not None and checkpointer.saved_step != state.step:
                        checkpointer.save_now(ctx, ["preempt"])
                    break
                if state.step >= t.stop_at:
                    break
                step_start, data_wait = time.perf_counter(), 0.0

    state.finished = state.epoch >= epochs
    status = "finished" if state.finished else status
    state.wall_time_s = wall_base + time.perf_counter() - session_start
    ctx.extras["status"] = status
    t.callbacks.on_train_end(ctx)
    t.accelerator.end_training()
    result = TrainResult(status, state, t.run.root, checkpointer.last_path if checkpointer else None, stop_signal)
    # Free the run's objects (the prepared model's gloo work included) while the interpreter is fully
    # alive: callbacks and context form reference cycles, and gloo work released during interpreter
    # finalisation can abort a process at exit (pytorch/pytorch#179291).
    del t, ctx, checkpointer
    gc.collect()
    return result
