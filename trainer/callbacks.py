"""Callbacks: how logging, checkpointing and diagnostics plug into the loop.

A callback implements any of six hooks, each receiving the `TrainContext`:

    on_train_start(ctx)                    after model/optimizer/EMA are built and a resume restored
    on_before_optimizer_step(ctx)          gradients complete and unscaled, before the optimizer step
                                           (ctx.step is still the previous update's number)
    on_step_end(ctx, record)               after every optimizer update (and its evaluation, if one ran)
    on_evaluate(ctx, metrics)              after an evaluation: {"top1", "top5", "top1_ema", "top5_ema"}
    on_checkpoint(ctx, path, tags)         after a checkpoint is complete on disk
    on_train_end(ctx)                      once, also after a preemption stop

Hooks run on every process (a metric may need collectives); use `ctx.is_main_process` for
anything written. `build_callbacks(recipe)` is the one place the built-ins are assembled from
the recipe; `train(..., callbacks=[...])` adds your own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.recipe_schema import Recipe
    from trainer.state import Trainables, TrainState
    from trainer.tracking import Tracker


@dataclass
class StepRecord:
    """What one optimizer update produced (loss all-reduced over processes)."""

    step: int
    epoch: int  # epoch of the update (0-based)
    loss: float
    lr: float
    grad_norm: float | None  # computed on logging steps (every step when clipping)
    images: int  # global images in this update
    step_time_s: float  # wall time of the update, data loading included
    data_wait_s: float  # of which waiting for the data loader
    end_of_epoch: bool


@dataclass
class TrainContext:
    recipe: Recipe
    accelerator: Accelerator
    model: nn.Module  # as prepared by accelerate (DDP/FSDP/DeepSpeed wrapper)
    unwrapped_model: nn.Module
    ema_model: nn.Module | None
    run_dir: Path
    state: TrainState
    tracker: Tracker
    parts: Trainables
    callbacks: CallbackList | None = None  # all callbacks of the run (to dispatch on_checkpoint, ...)
    data: Any = None  # the DataBundle
    total_steps: int = 0
    extras: dict = field(default_factory=dict)  # free room for callbacks to share things

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        self.tracker.log_scalars(values, self.step if step is None else step)

    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Images to TensorBoard (`SummaryWriter.add_images`: NCHW tensors, or pass dataformats=...)."""
        self.tracker.log_images(values, self.step if step is None else step, **kwargs)

    def log_text(self, values: dict[str, str], step: int | None = None) -> None:
        self.tracker.log_text(values, self.step if step is None else step)

    def append_jsonl(self, filename: str, record: dict) -> None:
        """Append `{"step", "epoch", **record}` to `<run>/<filename>` (main process only)."""
        self.tracker.append_jsonl(filename, {"step": self.step, "epoch": self.epoch, **record})


class Callback:
    """Base class: override the hooks you need."""

    def on_train_start(self, ctx: TrainContext) -> None: ...

    def on_before_optimizer_step(self, ctx: TrainContext) -> None: ...

    def on_step_end(self, ctx: TrainContext, record: StepRecord) -> None: ...

    def on_evaluate(self, ctx: TrainContext, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, ctx: TrainContext, path: Path, tags: Sequence[str]) -> None: ...

    def on_train_end(self, ctx: TrainContext) -> None: ...


class CallbackList(Callback):
    """Calls each callback's hook in order."""

    def __init__(self, callbacks: Iterable[Callback]):
        self.callbacks = list(callbacks)

    def on_train_start(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_train_start(ctx)

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_before_optimizer_step(ctx)

    def on_step_end(self, ctx: TrainContext, record: StepRecord) -> None:
        for cb in self.callbacks:
            cb.on_step_end(ctx, record)

    def on_evaluate(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(ctx, metrics)

    def on_checkpoint(self, ctx: TrainContext, path: Path, tags: Sequence[str]) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(ctx, path, tags)

    def on_train_end(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_train_end(ctx)

    def find(self, kind: type) -> Any:
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)


def build_callbacks(recipe: Recipe, extra: Iterable[Callback] = ()) -> CallbackList:
    """The callbacks a recipe asks for, built-ins first, then `extra` (given programmatically).

    Order matters: logging sees a step before checkpointing saves it, so a checkpoint's
    trainer_state already contains the step's evaluation.
    """
    from trainer.checkpointing import CheckpointCallback
    from trainer.tracking import LoggingCallback

    callbacks: list[Callback] = [LoggingCallback(recipe), CheckpointCallback(recipe)]
    if recipe.diagnostics.enabled:  # after checkpointing: it measures the weights a checkpoint just saved
        from diagnostics.callback import DiagnosticsCallback

        callbacks.append(DiagnosticsCallback(recipe))
    callbacks.extend(extra)
    return CallbackList(callbacks)
