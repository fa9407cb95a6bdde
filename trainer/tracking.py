"""TensorBoard (through accelerate's tracker), metrics.jsonl, summary.json and the console.

One writer: accelerate creates trackers on the main process only, and every file here is
written by the main process only. Console: a tqdm bar with ETA (when stderr is a terminal) and
one DeiT-style line per epoch:

    epoch 12/300  loss 3.412  top1 61.23  top1_ema 62.01  lr 9.8e-04  1234 img/s  ETA 5:21:10
"""

from __future__ import annotations

import datetime
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.callbacks import Callback, StepRecord, TrainContext
from trainer.checkpoint import write_json_atomic
from trainer.recipe_schema import Recipe
from trainer.summary import build_summary, model_cost


class Tracker:
    """Scalars/images/text to the accelerate trackers; JSON lines to files in the run dir."""

    def __init__(self, accelerator: Any, run_dir: Path):
        self.accelerator = accelerator
        self.run_dir = run_dir

    def _tensorboard(self) -> Any:
        if not self.accelerator.is_main_process or not self.accelerator.trackers:
            return None
        return self.accelerator.get_tracker("tensorboard")

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log({k: float(v) for k, v in values.items() if v is not None}, step=step)

    def log_images(self, values: dict[str, Any], step: int, **kwargs: Any) -> None:
        tracker = self._tensorboard()
        if tracker is not None:
            tracker.log_images(values, step=step, **kwargs)

    def log_text(self, values: dict[str, str], step: int) -> None:
        self.accelerator.log({k: str(v) for k, v in values.items()}, step=step)

    def append_jsonl(self, filename: str, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / filename, "a") as f:
                f.write(json.dumps(record) + "\n")


def peak_memory_gib() -> dict[str, float]:
    out = {"train/peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["train/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def epoch_line(epoch: int, epochs: int, loss: float, lr: float, img_s: float, eta_s: float,
               metrics: dict[str, float] | None) -> str:
    parts = [f"epoch {epoch}/{epochs}", f"loss {loss:.3f}"]
    for key in ("top1", "top1_ema"):
        if metrics and key in metrics:
            parts.append(f"{key} {metrics[key]:.2f}")
    parts += [f"lr {lr:.1e}", f"{img_s:.0f} img/s", f"ETA {format_duration(eta_s)}"]
    return "  ".join(parts)


class _Window:
    """Running sums over a span of steps."""

    def __init__(self) -> None:
        self.loss = self.steps = self.images = self.time = self.wait = 0.0

    def add(self, r: StepRecord) -> None:
        self.loss += r.loss
        self.steps += 1
        self.images += r.images
        self.time += r.step_time_s
        self.wait += r.data_wait_s


class LoggingCallback(Callback):
    def __init__(self, recipe: Recipe):
        self.cfg = recipe.logging
        self.epochs = recipe.schedule.epochs
        self.window = _Window()
        self.epoch_window = _Window()
        self.last_eval: dict[str, float] | None = None
        self.bar: tqdm | None = None
        self.cost: dict[str, int] = {}

    def on_train_start(self, ctx: TrainContext) -> None:
        self.session_start, self.session_start_step = time.perf_counter(), ctx.step
        if ctx.is_main_process:
            self.cost = model_cost(ctx.recipe)
            if self.cfg.progress_bar and sys.stderr.isatty():
                self.bar = tqdm(total=ctx.total_steps, initial=ctx.step, unit="step", dynamic_ncols=True)

    def _eta(self, ctx: TrainContext) -> float:
        done = ctx.step - self.session_start_step
        elapsed = time.perf_counter() - self.session_start
        return elapsed / done * (ctx.total_steps - ctx.step) if done else 0.0

    def _print(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)
        sys.stdout.flush()

    def on_step_end(self, ctx: TrainContext, record: StepRecord) -> None:
        self.window.add(record)
        self.epoch_window.add(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record.loss:.3f}", lr=f"{record.lr:.1e}", refresh=False)
        if record.step % self.cfg.every_steps == 0 or record.end_of_epoch:
            w = self.window
            values = {
                "train/loss": w.loss / w.steps,
                "train/lr": record.lr,
                "train/grad_norm": record.grad_norm,
                "train/throughput_img_s": w.images / w.time if w.time else None,
                "train/data_wait_fraction": w.wait / w.time if w.time else None,
                "train/epoch": ctx.state.step / max(ctx.extras.get("updates_per_epoch", 1), 1),
                **peak_memory_gib(),
            }
            if ctx.state.nonfinite_skips:
                values["train/nonfinite_skips"] = ctx.state.nonfinite_skips
            skipped = self._corrupt_images_skipped(ctx)  # collective: every process is here
            if skipped:
                values["train/corrupt_images_skipped"] = skipped
            ctx.log_scalars(values, step=record.step)
            jsonl = {k.removeprefix("train/"): (round(v, 6) if isinstance(v, float) else v)
                     for k, v in values.items()}
            ctx.append_jsonl("metrics.jsonl", {"kind": "train", **jsonl})
            self.window = _Window()
        if record.end_of_epoch:
            w = self.epoch_window
            metrics = self.last_eval if self.last_eval and self.last_eval.get("step") == record.step else None
            if ctx.is_main_process:
                self._print(epoch_line(record.epoch + 1, self.epochs, w.loss / w.steps, record.lr,
                                       w.images / w.time if w.time else 0.0, self._eta(ctx), metrics))
            self.epoch_window = _Window()

    @staticmethod
    def _corrupt_images_skipped(ctx: TrainContext) -> int:
        counter = getattr(ctx.data, "skipped_corrupt", None)
        if counter is None:
            return 0
        local = torch.tensor(float(counter()), device=ctx.accelerator.device)
        return int(ctx.accelerator.reduce(local, reduction="sum").item())

    def on_evaluate(self, ctx: TrainContext, metrics: dict[str, float]) -> None:
        self.last_eval = {**metrics, "step": ctx.step}
        ctx.log_scalars({f"eval/{k}": v for k, v in metrics.items()})
        epoch = ctx.state.evals[-1]["epoch"] if ctx.state.evals else ctx.epoch  # fractional: step / updates_per_epoch
        ctx.append_jsonl("metrics.jsonl", {"kind": "eval", **metrics, "epoch": epoch})
        self.write_summary(ctx, "running")

    def write_summary(self, ctx: TrainContext, status: str) -> None:
        if ctx.is_main_process:
            summary = build_summary(ctx.state, ctx.recipe, self.cost, status=status,
                                    num_processes=ctx.accelerator.num_processes,
                                    global_batch=ctx.extras.get("global_batch", 0))
            write_json_atomic(ctx.run_dir / "summary.json", summary)

    def on_train_end(self, ctx: TrainContext) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.write_summary(ctx, ctx.extras.get("status", "completed" if ctx.state.finished else "stopped"))
