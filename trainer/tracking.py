"""What a run reports: TensorBoard (through accelerate's tracker), metrics.jsonl, summary.json, the console.

One writer: accelerate creates trackers on the main process only, and every file here is
written by the main process only. Console: one DeiT-style line per epoch,

    epoch 12/300  loss 3.412  top1 61.23  top1_ema 62.01  lr 9.8e-04  1234 img/s  ETA 5:21:10

and in between a tqdm bar with ETA when stderr is a terminal, or, when it is not (a Slurm log), a
progress line every logging.every_steps steps:

    step 1234/375000  epoch 3.29  loss 3.412  lr 9.8e-04  1234 img/s  ETA 5:21:10

The logging window (the loss summed since the last logged step) lives in the TrainState, so a
resumed run logs the same means as an uninterrupted one; so does the count of skipped corrupt
images. Records are strict JSON (NaN is null).
"""

from __future__ import annotations

import datetime
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.callbacks import StepRecord
from trainer.checkpoint import TrainState
from trainer.recipe import flatten_recipe
from trainer.recipe_schema import Recipe
from trainer.run_dir import RunDir, append_jsonl, model_cost, training_summary, write_json_atomic

# The HPARAMS tab: these recipe keys (those sweeps vary), and per run its accuracies and the diagnostics'
# phase summaries (logged at every evaluation, so a running sweep shows them too)
HPARAM_KEYS = ("model.name", "model.depth", "model.embed_dim", "model.img_size", "model.patch_size", "variant.kind",
               "variant.group_size", "variant.shallow_ratio", "variant.thin_mlp_ratio", "variant.keep_depth",
               "optim.name", "optim.lr", "optim.weight_decay", "optim.trainable", "schedule.epochs",
               "schedule.warmup_epochs", "train.batch_size", "train.seed", "train.precision", "train.ema_decay",
               "augment.auto_augment", "augment.mixup", "augment.cutmix", "data.source", "data.val_fraction")
ACCURACY_SCALARS = ("top1_final", "top1_best", "peak_to_final", "top1_at_best_val")
HPARAM_METRICS = (*(f"summary/{k}" for k in ACCURACY_SCALARS), *(f"summary/ema_{k}" for k in ACCURACY_SCALARS),
                  "depth/phase/cliff_size", "depth/phase/plateau_length", "depth/isi/mean",
                  "depth/attn/cls_centrality_ratio_last")


def peak_memory_gib() -> dict[str, float]:
    """Peak host RSS (of the whole process) and peak GPU memory since the last call: the GPU peak is reset
    each time, so a logged value is the training steps' own, not an earlier diagnostics probe's."""
    out = {"train/peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["train/peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
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


def progress_line(step: int, total: int, epoch: float, loss: float, lr: float, img_s: float, eta_s: float) -> str:
    return (f"step {step}/{total}  epoch {epoch:.2f}  loss {loss:.3f}  lr {lr:.1e}  {img_s:.0f} img/s  "
            f"ETA {format_duration(eta_s)}")


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


class RunLogger:
    """The loop's reporting (`start`, `step`, `evaluation`, `summary`, `close`) and the channels plug-ins
    and the diagnostics share (`log_scalars`, `log_images`, `log_text`, `append_jsonl`). Every method runs
    on every process; only the main process writes."""

    def __init__(self, recipe: Recipe, accelerator: Any, run_dir: RunDir, *, total_steps: int,
                 updates_per_epoch: int, global_batch: int, corrupt_images: Callable[[], int] | None = None):
        self.recipe, self.cfg, self.accelerator, self.run_dir = recipe, recipe.logging, accelerator, run_dir
        self.total_steps, self.updates_per_epoch, self.global_batch = total_steps, updates_per_epoch, global_batch
        self.corrupt_images = corrupt_images  # this process's count of replaced unreadable images
        self.corrupt_images_before = 0  # all processes' count of the sessions before this one
        self.window, self.epoch_window = _Window(), _Window()
        self.last_eval: dict[str, float] | None = None
        self.bar: tqdm | None = None
        self.cost: dict[str, int] = {}

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    # ---- channels ------------------------------------------------------------------------------
    def tensorboard(self) -> Any:
        """The TensorBoard SummaryWriter (main process, when logging.tensorboard), else None."""
        if not self.is_main_process or not self.accelerator.trackers:
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log({k: float(v) for k, v in values.items() if v is not None}, step=step)

    def log_images(self, values: dict[str, Any], step: int, **kwargs: Any) -> None:
        if self.is_main_process and self.accelerator.trackers:
            self.accelerator.get_tracker("tensorboard").log_images(values, step=step, **kwargs)

    def log_text(self, values: dict[str, str], step: int) -> None:
        self.accelerator.log({k: str(v) for k, v in values.items()}, step=step)

    def append_jsonl(self, filename: str, record: dict) -> None:
        if self.is_main_process:
            append_jsonl(self.run_dir.root / filename, record)

    # ---- the loop's events ---------------------------------------------------------------------
    def start(self, state: TrainState) -> None:
        self.session_start, self.session_start_step = time.perf_counter(), state.step
        self.window.loss, self.window.steps = state.log_window_loss, state.log_window_steps
        self.corrupt_images_before = state.corrupt_images_skipped
        if self.is_main_process:
            self.cost = model_cost(self.recipe)
            if self.cfg.progress_bar and sys.stderr.isatty():
                self.bar = tqdm(total=self.total_steps, initial=state.step, unit="step", dynamic_ncols=True)

    def _eta(self, step: int) -> float:
        done = step - self.session_start_step
        elapsed = time.perf_counter() - self.session_start
        return elapsed / done * (self.total_steps - step) if done else 0.0

    def print(self, text: str) -> None:
        """A console line on the main process that does not break the progress bar."""
        if self.is_main_process:
            (self.bar.write if self.bar is not None else print)(text)
            sys.stdout.flush()

    def step(self, record: StepRecord, state: TrainState) -> None:
        """Window scalars every logging.every_steps (and at epoch ends), the epoch's console line."""
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
                "train/epoch": state.step / max(self.updates_per_epoch, 1),
                **peak_memory_gib(),
            }
            if state.nonfinite_skips:
                values["train/nonfinite_skips"] = state.nonfinite_skips
            if self.recipe.data.skip_corrupt:  # (without it the first unreadable image stops the run)
                skipped = self.corrupt_images_total()  # collective: every process is here
                if skipped:
                    values["train/corrupt_images_skipped"] = skipped
            self.log_scalars(values, step=record.step)
            jsonl = {k.removeprefix("train/"): (float(f"{v:.7g}") if isinstance(v, float) else v)
                     for k, v in values.items()}  # 7 significant digits: a warm-up LR of 1e-5 keeps its own
            self.append_jsonl(self.run_dir.metrics.name, {"step": state.step, "epoch": state.epoch,
                                                          "kind": "train", **jsonl})
            if self.bar is None and not record.end_of_epoch and not sys.stderr.isatty():
                self.print(progress_line(record.step, self.total_steps, values["train/epoch"], values["train/loss"],
                                         record.lr, values["train/throughput_img_s"] or 0.0, self._eta(record.step)))
            self.window = _Window()
        state.log_window_loss, state.log_window_steps = self.window.loss, int(self.window.steps)
        if record.end_of_epoch:
            w = self.epoch_window
            metrics = self.last_eval if self.last_eval and self.last_eval.get("step") == record.step else None
            self.print(epoch_line(record.epoch + 1, self.recipe.schedule.epochs, w.loss / w.steps, record.lr,
                                  w.images / w.time if w.time else 0.0, self._eta(record.step), metrics))
            self.epoch_window = _Window()

    def corrupt_images_total(self) -> int:
        """Unreadable images replaced so far, all processes and sessions (collective). With loader workers,
        images of batches prefetched at a checkpoint are read, and counted, again after a resume."""
        if self.corrupt_images is None:
            return self.corrupt_images_before
        local = torch.tensor(float(self.corrupt_images()), device=self.accelerator.device)
        return self.corrupt_images_before + int(self.accelerator.reduce(local, reduction="sum").item())

    def evaluation(self, metrics: dict[str, float], state: TrainState) -> None:
        """Eval scalars, a metrics.jsonl record (fractional epoch) and a `running` summary.json."""
        self.last_eval = {**metrics, "step": state.step}
        self.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        epoch = state.evals[-1]["epoch"] if state.evals else state.epoch  # fractional: step / updates_per_epoch
        self.append_jsonl(self.run_dir.metrics.name, {"step": state.step, "epoch": epoch, "kind": "eval",
                                                      **metrics})
        self.summary(state, "running")

    def summary(self, state: TrainState, status: str) -> None:
        """summary.json, and its accuracies as `summary/*` scalars (the HPARAMS tab's metrics)."""
        summary = training_summary(state, self.recipe, self.cost, status=status, global_batch=self.global_batch)
        if self.is_main_process:
            write_json_atomic(self.run_dir.summary, summary)
        scalars = {f"summary/{prefix}{key}": (summary[section] or {}).get(key)
                   for section, prefix in (("raw", ""), ("ema", "ema_")) for key in ACCURACY_SCALARS}
        self.log_scalars(scalars, step=state.step)

    def write_hparams(self) -> None:
        """The run's HPARAMS entry, in the run's own event files (main process)."""
        writer = self.tensorboard()
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        flat = flatten_recipe(self.recipe)
        values = {key: "null" if flat[key] is None else flat[key] for key in HPARAM_KEYS}
        for summary in hparams(values, {metric: 0.0 for metric in HPARAM_METRICS}):
            writer.file_writer.add_summary(summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
