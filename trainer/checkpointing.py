"""When to save: periodic (every N epochs/steps), best (by evaluation top-1), final, and on request."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainer.callbacks import Callback, StepRecord, TrainContext
from trainer.checkpoint import point, prune
from trainer.recipe_schema import Recipe
from trainer.state import save_checkpoint


def best_metric_key(metrics: dict[str, float], best_on: str) -> str:
    return "top1_ema" if best_on == "ema" and "top1_ema" in metrics else "top1"


class CheckpointCallback(Callback):
    """Saves through `save_now`, which the loop also calls on preemption."""

    def __init__(self, recipe: Recipe):
        self.cfg = recipe.checkpoint
        self.epochs = recipe.schedule.epochs
        self.best_pending = False
        self.saved_step: int | None = None
        self.last_path: Path | None = None

    def save_now(self, ctx: TrainContext, tags: Sequence[str]) -> Path:
        """Write a checkpoint of the current step (once per step), prune, and tell the callbacks."""
        root = ctx.run_dir / "checkpoints"
        tags = list(tags)
        if self.best_pending:
            tags.append("best")
            self.best_pending = False
            ctx.state.best_checkpoint = f"step_{ctx.step:08d}"
        path = save_checkpoint(root, ctx.accelerator, ctx.parts, ctx.state, ctx.recipe, tags)
        if ctx.is_main_process:
            if "best" in tags:
                point(root, "best", path)
            protected = {ctx.state.best_checkpoint} if ctx.state.best_checkpoint else set()
            prune(root, self.cfg.keep_last, protected)
        ctx.accelerator.wait_for_everyone()
        self.saved_step, self.last_path = ctx.step, path
        ctx.callbacks.on_checkpoint(ctx, path, tags)
        return path

    def on_train_start(self, ctx: TrainContext) -> None:
        if ctx.step > 0:  # resumed: the checkpoint of this step already exists
            self.saved_step = ctx.step

    def on_evaluate(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        if not self.cfg.save_best:
            return
        key = best_metric_key(metrics, self.cfg.best_on)
        if ctx.state.best_top1 is None or metrics[key] > ctx.state.best_top1:
            ctx.state.best_top1 = metrics[key]
            self.best_pending = True

    def _periodic_due(self, record: StepRecord) -> bool:
        if self.cfg.every_steps and record.step % self.cfg.every_steps == 0:
            return True
        completed = record.epoch + 1
        return bool(record.end_of_epoch and self.cfg.every_epochs and
                     (completed % self.cfg.every_epochs == 0 or completed == self.epochs))

    def on_step_end(self, ctx: TrainContext, record: StepRecord) -> None:
        periodic = self._periodic_due(record)
        if periodic or self.best_pending:
            self.save_now(ctx, ["periodic"] if periodic else [])

    def on_train_end(self, ctx: TrainContext) -> None:
        if ctx.extras.get("status") == "failed":  # a diverged state is not worth keeping
            return
        if self.saved_step != ctx.step and ctx.step > 0:
            self.save_now(ctx, ["final"] if ctx.state.finished else ["stopped"])
