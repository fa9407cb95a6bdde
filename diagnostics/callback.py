"""The depth-dynamics diagnostics callback (recipe `diagnostics:` section, `enabled: true`).

At every periodic, final and stopped checkpoint (`at_checkpoints`; not at saves made only because
the evaluation improved, which come at irregular steps, nor at preemption saves, which must finish
quickly) and every `every_steps` optimizer steps, on every process:

  1. the probe set (a fixed, seeded subset of the eval split, the same images every time) was
     loaded once at train start, each process its shard (diagnostics/suite.py);
  2. for each probed model (`model: raw | ema | both`) `suite.run_diagnostics` runs the enabled
     metrics on the unwrapped model in eval mode under no_grad, summing statistics over processes;
  3. the main process logs TensorBoard scalars (diagnostics/tensorboard_logging.py) and appends
     one record per model to <run>/diagnostics.jsonl (diagnostics/records.py); at checkpoint
     evaluations it also renders the images: stage x step heatmaps over all records so far (the
     `every_steps` ones included) and the current phase curve.

`grad_norms` is measured during training instead: every `grad_norm_every_steps` updates, on the
complete, unscaled gradients (`on_before_optimizer_step`), logged as scalars; the latest values
also go into each record.

Training is unchanged: the model's train/eval mode is restored, every RNG stream (python, numpy,
torch, CUDA) is saved before and restored after, and nothing touches the optimizer or the
weights — a run with diagnostics has the same losses as one without.

Distributed: DDP and DeepSpeed ZeRO-1/2 hold full weights on every process and are supported.
Under FSDP and ZeRO-3 every process holds a shard, so the callback refuses at start (run
tools/analyze.py on the checkpoints instead); `grad_norms` needs full gradients and is refused
under FSDP and DeepSpeed.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from diagnostics.capture import stage_names
from diagnostics.grad_norms import component_grad_norms
from diagnostics.records import DIAGNOSTICS_FILE, build_record, read_diagnostics
from diagnostics.suite import (
    PROBE_METRICS,
    DiagnosticsSetupError,
    ProbeData,
    check_config,
    load_probe,
    run_diagnostics,
)
from diagnostics.tensorboard_logging import (
    custom_scalars_layout,
    grad_norm_scalars,
    log_images,
    stage_scalars,
    summary_scalars,
)
from trainer.callbacks import Callback, StepRecord, TrainContext
from trainer.checkpoint import capture_rng_state, restore_rng_state
from trainer.data import build_probe_dataset
from trainer.recipe_schema import Recipe
from trainer.run_dir import truncate_metrics

MEASURED_CHECKPOINTS = frozenset({"periodic", "final", "stopped"})  # checkpoint tags that trigger a measurement


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Every RNG stream of this process (python, numpy, torch, CUDA) as it was on entry, on exit."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


def check_distributed_support(accelerator: Any, metrics: Sequence[str]) -> None:
    """Refuse backends whose processes do not hold full weights (probe) or full gradients (grad_norms)."""
    kind = accelerator.distributed_type
    zero3 = kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    if (kind == DistributedType.FSDP or zero3) and any(metric in PROBE_METRICS for metric in metrics):
        backend = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise DiagnosticsSetupError(
            f"diagnostics under {backend}: each process holds a shard of the weights and the probe runs the "
            "model stage by stage, which needs all of them; depthlab does not gather them. Use DDP or DeepSpeed "
            "ZeRO-1/2, or set diagnostics.enabled=false and run tools/analyze.py on the checkpoints")
    if "grad_norms" in metrics and kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise DiagnosticsSetupError(
            f"diagnostics.metrics includes grad_norms under {kind.value}: gradients are sharded (or kept by the "
            "DeepSpeed engine), so per-component norms would be per shard; remove grad_norms from "
            "diagnostics.metrics or use DDP")


def summary_line(record: dict[str, Any]) -> str:
    """One console line per evaluation: phases, the ISI peak, probe top-1 and the time taken."""
    details = []
    phases = record.get("phases")
    if phases:
        details.append(f"cliff {phases['cliff_end']}, plateau {phases['plateau_start']}..{phases['plateau_end']} "
                       f"({phases['plateau_length']} stages), climb {phases['climb_start'] or '-'}")
    isi = [(v, s) for s, v in zip(record["stages"], (record.get("isi") or {}).get("isi", [])) if v is not None]
    if isi:
        details.append("ISI max {:.4f} at {}".format(*max(isi)))
    if "probe_top1" in record:
        details.append(f"probe top1 {record['probe_top1']:.2f}")
    return (f"diagnostics step {record['step']} ({record['model']}): {', '.join(details)} "
            f"[{record['elapsed_s']:.1f} s]")


def timed(hook: Callable) -> Callable:
    """Adds the hook's wall time to the callback's `cost_s` (printed at the end of training)."""

    @functools.wraps(hook)
    def wrapper(self: DiagnosticsCallback, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.cost_s += time.perf_counter() - start

    return wrapper


class DiagnosticsCallback(Callback):
    def __init__(self, recipe: Recipe):
        self.cfg = recipe.diagnostics
        self.models = ("raw", "ema") if self.cfg.model == "both" else (self.cfg.model,)
        self.probe_metrics = [metric for metric in self.cfg.metrics if metric in PROBE_METRICS]
        self.probe: ProbeData | None = None
        self.last_step: int | None = None  # at most one evaluation per step (checkpoint and every_steps)
        self.images_step: int | None = None
        self.records: list[dict[str, Any]] = []  # main process: the run's records so far, for the heatmaps
        self.grad_norms: dict[str, Any] | None = None  # latest training-time values
        self.writer: Any = None  # the accelerate tensorboard tracker's SummaryWriter (main process)
        self.cost_s = 0.0  # this process's time in the hooks: probe loading, metrics, grad norms, images
        self.evaluations = 0

    # ----- set-up ---------------------------------------------------------------------------
    @timed
    def on_train_start(self, ctx: TrainContext) -> None:
        cfg = self.cfg
        check_distributed_support(ctx.accelerator, cfg.metrics)
        if "ema" in self.models and ctx.ema_model is None:
            raise DiagnosticsSetupError(f"diagnostics.model = {cfg.model!r} needs an EMA (set train.ema_decay)")
        check_config(cfg, ctx.unwrapped_model)
        if self.probe_metrics and not cfg.at_checkpoints and not cfg.every_steps:
            raise DiagnosticsSetupError("diagnostics: at_checkpoints is false and every_steps is null, so "
                                        f"{', '.join(self.probe_metrics)} would never run")
        if self.probe_metrics:
            start = time.perf_counter()
            with preserved_rng_state():
                dataset = build_probe_dataset(ctx.recipe, cfg.probe_size, cfg.probe_seed)
                self.probe = load_probe(dataset, cfg, ctx.accelerator.process_index, ctx.accelerator.num_processes,
                                        num_workers=ctx.recipe.data.num_workers)
            if ctx.is_main_process:
                tqdm.write(f"diagnostics: {', '.join(self.probe_metrics)} on {self.probe.size} probe images "
                           f"({len(self.probe.images)} on this process, loaded in {time.perf_counter() - start:.1f} s)")
        if ctx.is_main_process:
            path = ctx.run_dir / DIAGNOSTICS_FILE
            truncate_metrics(path, ctx.step)  # a resumed run redoes the steps after its checkpoint
            self.records = read_diagnostics(path)
            if ctx.recipe.logging.tensorboard:
                self.writer = ctx.accelerator.get_tracker("tensorboard", unwrap=True)
                self.writer.add_custom_scalars(custom_scalars_layout(cfg.metrics, self.models))

    # ----- training-time gradient norms --------------------------------------------------------
    @timed
    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        step = ctx.step + 1  # the update about to be applied
        if "grad_norms" not in self.cfg.metrics or step % self.cfg.grad_norm_every_steps:
            return
        self.grad_norms = component_grad_norms(ctx.unwrapped_model)
        if ctx.is_main_process:
            ctx.log_scalars(grad_norm_scalars(self.grad_norms, len(ctx.unwrapped_model.blocks)), step=step)

    # ----- probe evaluations -------------------------------------------------------------------
    @timed
    def on_checkpoint(self, ctx: TrainContext, path: Path, tags: Sequence[str]) -> None:
        if self.cfg.at_checkpoints and MEASURED_CHECKPOINTS.intersection(tags) and "preempt" not in tags:
            self.evaluate(ctx, "checkpoint")
            if self.cfg.tensorboard_images == "checkpoints":
                self.log_images(ctx)

    @timed
    def on_step_end(self, ctx: TrainContext, record: StepRecord) -> None:
        if self.cfg.every_steps and ctx.step % self.cfg.every_steps == 0:
            self.evaluate(ctx, "every_steps")

    def evaluate(self, ctx: TrainContext, trigger: str) -> None:
        """Run the probe metrics on every probed model and log them (collective: every process)."""
        if self.probe is None or self.last_step == ctx.step:
            return
        self.last_step = ctx.step
        self.evaluations += 1
        epoch = round(ctx.step / max(ctx.extras.get("updates_per_epoch", 1), 1), 4)
        with preserved_rng_state():
            for model_name in self.models:
                start = time.perf_counter()
                module = ctx.unwrapped_model if model_name == "raw" else ctx.ema_model
                results = run_diagnostics(module, self.probe, self.cfg, ctx.recipe.model.num_classes)
                if not ctx.is_main_process:
                    continue
                record = build_record(results, stage_names(module), step=ctx.step, epoch=epoch, model=model_name,
                                      trigger=trigger, probe_size=self.probe.size,
                                      num_processes=ctx.accelerator.num_processes,
                                      elapsed_s=round(time.perf_counter() - start, 3), grad_norms=self.grad_norms)
                self.records.append(record)
                ctx.log_scalars({**stage_scalars(record), **summary_scalars(record)})
                ctx.append_jsonl(DIAGNOSTICS_FILE, record)
                tqdm.write(summary_line(record))

    def on_train_end(self, ctx: TrainContext) -> None:
        # after the checkpoint callback's final save (and its evaluation): callbacks run in order
        if not self.evaluations:  # e.g. `--resume auto` of a finished run: nothing new to show
            return
        if self.cfg.tensorboard_images == "final" and ctx.extras.get("status") != "failed":
            timed(DiagnosticsCallback.log_images)(self, ctx)
        if ctx.is_main_process:
            tqdm.write(f"diagnostics cost: {self.cost_s:.2f} s (probe loading, {self.evaluations} evaluations, "
                       "gradient norms, images)")

    def log_images(self, ctx: TrainContext) -> None:
        """Heatmaps over every record so far and the latest phase curve, at checkpoint evaluations or once
        at the end (`tensorboard_images`): each heatmap holds every evaluation so far anyway, and fewer
        images keep TensorBoard's event files small."""
        if self.writer is None or self.images_step == ctx.step:
            return
        self.images_step = ctx.step
        for model_name in self.models:
            records = [r for r in self.records if r["model"] == model_name]
            if records:
                log_images(self.writer, records, ctx.step, model_name)
