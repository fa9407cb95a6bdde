"""Plug-ins: the callback protocol for your own code in the loop (the built-in features are not callbacks).

A callback implements any of six hooks; each receives the `trainer.run.Run` (model, optimizer,
EMA, data, state, run dir, logging channels):

    on_train_start(run)                    after everything is built and a resume restored
    on_before_optimizer_step(run)          gradients complete and unscaled, before the optimizer step
                                           (run.step is still the previous update's number)
    on_step_end(run, record)               after every optimizer update, once its evaluation,
                                           diagnostics, logging and checkpoint are done
    on_evaluate(run, metrics)              after an evaluation: {"top1", "top5", "top1_ema", "top5_ema"}
    on_checkpoint(run, path, tags)         after a checkpoint is complete on disk
    on_train_end(run)                      once, also after a preemption stop (run.status says how)

Hooks run on every process (a metric may need collectives); use `run.is_main_process` for
anything written. Pass yours as `trainer.loop.train(recipe, run_dir, callbacks=[...])`:

    class LogWeightNorm(Callback):
        def on_evaluate(self, run, metrics):
            norm = sum(p.norm() ** 2 for p in run.unwrapped_model.parameters()) ** 0.5
            run.log_scalars({"custom/weight_norm": norm})
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: trainer.run imports this module
    from trainer.run import Run


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


class Callback:
    """Base class: override the hooks you need."""

    def on_train_start(self, run: Run) -> None: ...

    def on_before_optimizer_step(self, run: Run) -> None: ...

    def on_step_end(self, run: Run, record: StepRecord) -> None: ...

    def on_evaluate(self, run: Run, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, run: Run, path: Path, tags: Sequence[str]) -> None: ...

    def on_train_end(self, run: Run) -> None: ...


class CallbackList(Callback):
    """Calls each callback's hook in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def on_train_start(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_train_start(run)

    def on_before_optimizer_step(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_before_optimizer_step(run)

    def on_step_end(self, run: Run, record: StepRecord) -> None:
        for cb in self.callbacks:
            cb.on_step_end(run, record)

    def on_evaluate(self, run: Run, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(run, metrics)

    def on_checkpoint(self, run: Run, path: Path, tags: Sequence[str]) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(run, path, tags)

    def on_train_end(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_train_end(run)
