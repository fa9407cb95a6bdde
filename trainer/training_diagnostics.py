"""The depth-dynamics diagnostics during training (recipe `diagnostics:` section, `enabled: true`).

The adapter between the loop and diagnostics/ (which knows nothing of recipes, run dirs or
accelerate). The loop calls it at three points:

  - `before_optimizer_step`: every `grad_norm_every_steps` updates, per-component gradient norms on
    the complete, unscaled gradients (`grad_norms`), logged for the Depth tab; the latest values also go
    into each record;
  - `measure_if_due` after an update's evaluation, before its logging and checkpoint: at every
    periodic, final and stopped checkpoint (`at_checkpoints`; not at saves made only because the
    evaluation improved, which come at irregular steps, nor at preemption saves, which must finish
    quickly) and every `every_steps` updates;
  - `finish` at the end: the images of `tensorboard_images: final` and the callback's cost.

A measurement, on every process: the probe set (a fixed, seeded subset of the eval split, each
process its shard, loaded once at start) runs through `diagnostics.run_diagnostics` for each probed
model (`model: raw | ema | both`) on the unwrapped model in eval mode under no_grad, summing the
statistics over processes; the main process logs TensorBoard scalars and appends one record per
model to <run>/diagnostics.jsonl (diagnostics/records.py); TensorBoard gets the per-stage values as
tensors for the Depth tab (diagnostics/tensorboard_plugin/) and a few summary scalars
(diagnostics/tensorboard_logging.py); at checkpoint measurements it also renders the images: stage x
step heatmaps over all records so far and the current phase curve.

Training is unchanged: the model's train/eval mode is restored, every RNG stream is saved before
and restored after (`trainer.rng.preserved_rng_state`), and nothing touches the optimizer or the
weights — a run with diagnostics has the same losses as one without.

Distributed: DDP and DeepSpeed ZeRO-1/2 hold full weights on every process, which the probe reads.
Under FSDP and ZeRO-3 every process holds a shard: at each measurement the weights are gathered into
an unsharded replica of the model (one more copy of the model per process, on its device), which
the probe reads. `grad_norms`: under FSDP each process sums the squares of its gradient shards and the
sums are reduced; under DeepSpeed they are read from the engine (`safe_get_full_grad`) between its
backward and its step (trainer/loop.py `UpdateStep.micro_batch`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from accelerate.utils import DistributedType
from torch import nn

from diagnostics import (
    DiagnosticsSetupError,
    ProbeData,
    check_config,
    load_probe,
    run_diagnostics,
    stage_names,
)
from diagnostics.capture import unwrap_model
from diagnostics.grad_norms import component_grad_norms
from diagnostics.records import build_record, read_diagnostics
from diagnostics.registry import PROBE_METRICS
from diagnostics.tensorboard_logging import (
    dashboard_scalars,
    depth_summary,
    grad_norm_summary,
    log_images,
    write_summary,
)
from models import rebuild_from_spec, spec_of
from trainer.data import ProbeSet, build_eval_loader, build_probe_dataset
from trainer.rng import preserved_rng_state
from trainer.run import Run
from trainer.run_dir import truncate_jsonl

MEASURED_CHECKPOINTS = frozenset({"periodic", "final", "stopped"})  # checkpoint tags that trigger a measurement


def sharded_weights(accelerator: Any) -> str | None:
    """"fsdp" or "zero3" when each process holds only a shard of the weights, else None."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return None


def gather_full_weights(model: nn.Module, replica: nn.Module, sharding: str) -> None:
    """Every process's `replica` gets the whole model's current weights (collective). The probe runs the model
    stage by stage, which a shard cannot do; the replica costs one unsharded copy of the model per process."""
    if sharding == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        replica.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
        return
    import deepspeed

    inner = unwrap_model(model)
    with deepspeed.zero.GatheredParameters(list(inner.parameters()), modifier_rank=None):
        replica.load_state_dict({name: tensor.detach() for name, tensor in inner.state_dict().items()})


def plasticity_pair_sources(recipe: Any) -> tuple[Any, Any] | None:
    """P3's pairing (diagnostics.plasticity_pairing = indexed): image k of plasticity_pair_data's eval split
    (the pretraining distribution's validation set) with image k of the recipe's eval split, in file order."""
    cfg = recipe.diagnostics
    if cfg.plasticity_pairing != "indexed" or "plasticity" not in cfg.metrics:
        return None
    if not cfg.plasticity_pair_data:
        raise DiagnosticsSetupError("diagnostics.plasticity_pairing = 'indexed' needs diagnostics.plasticity_pair_data "
                                    "(an image folder root holding the pretraining distribution's validation images)")
    pretraining = replace(recipe, data=replace(recipe.data, source="imagefolder", root=cfg.plasticity_pair_data))

    def first_images(source_recipe: Any) -> ProbeSet:
        images = build_eval_loader(source_recipe).dataset
        return ProbeSet(images, list(range(min(cfg.plasticity_pairs, len(images)))))

    return first_images(pretraining), first_images(recipe)


def gradient_access(accelerator: Any) -> dict[str, Any]:
    """How `component_grad_norms` reads this backend's gradients: FSDP holds a shard of each per process,
    DeepSpeed keeps them in its engine between its backward and its step."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return {"sharded": True}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_grad

        return {"grad_of": safe_get_full_grad}
    return {}


def measures_checkpoint(cfg: Any, tags: Sequence[str]) -> bool:
    """Whether a checkpoint with these tags is measured: periodic, final and stopped ones when
    `at_checkpoints`; never a preemption save, nor one made only because the evaluation improved."""
    return cfg.at_checkpoints and bool(MEASURED_CHECKPOINTS.intersection(tags)) and "preempt" not in tags


def summary_line(record: dict[str, Any]) -> str:
    """One console line per measurement: phases, the ISI peak, probe top-1 and the time taken."""
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


def timed(method: Callable) -> Callable:
    """Adds the method's wall time to `cost_s` (printed at the end of training)."""

    @functools.wraps(method)
    def wrapper(self: TrainingDiagnostics, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.cost_s += time.perf_counter() - start

    return wrapper


class TrainingDiagnostics:
    """Built once the run is (collective: every process loads its probe shard)."""

    def __init__(self, run: Run):
        self.cfg = cfg = run.recipe.diagnostics
        self.models = ("raw", "ema") if cfg.model == "both" else (cfg.model,)
        self.probe_metrics = [metric for metric in cfg.metrics if metric in PROBE_METRICS]
        self.probe: ProbeData | None = None
        self.last_step: int | None = None  # at most one measurement per step (checkpoint and every_steps)
        self.images_step: int | None = None
        self.records: list[dict[str, Any]] = []  # main process: the run's records so far, for the heatmaps
        self.grad_norms: dict[str, Any] | None = None  # latest training-time values
        self.writer: Any = None  # the TensorBoard SummaryWriter (main process)
        self.cost_s = 0.0  # this process's time here: probe loading, metrics, grad norms, images
        self.measurements = 0
        self.sharding = sharded_weights(run.accelerator)
        self.grad_access = gradient_access(run.accelerator)
        self.replica: nn.Module | None = None  # under FSDP / ZeRO-3: the probed unsharded copy
        self._start(run)

    @timed
    def _start(self, run: Run) -> None:
        cfg = self.cfg
        if "ema" in self.models and run.ema is None:
            raise DiagnosticsSetupError(f"diagnostics.model = {cfg.model!r} needs an EMA (set train.ema_decay)")
        check_config(cfg, run.unwrapped_model)
        if self.probe_metrics and not cfg.at_checkpoints and not cfg.every_steps:
            raise DiagnosticsSetupError("diagnostics: at_checkpoints is false and every_steps is null, so "
                                        f"{', '.join(self.probe_metrics)} would never run")
        if self.probe_metrics and self.sharding is not None:
            self.replica = rebuild_from_spec(spec_of(run.unwrapped_model), device=run.accelerator.device).eval()
        if self.probe_metrics:
            start = time.perf_counter()
            with preserved_rng_state():
                dataset = build_probe_dataset(run.recipe, cfg.probe_size, cfg.probe_seed)
                self.probe = load_probe(dataset, cfg, run.accelerator.process_index, run.accelerator.num_processes,
                                        num_workers=run.recipe.data.num_workers,
                                        pair_sources=plasticity_pair_sources(run.recipe))
            run.log.print(f"diagnostics: {', '.join(self.probe_metrics)} on {self.probe.size} probe images "
                          f"({len(self.probe.images)} on this process, loaded in {time.perf_counter() - start:.1f} s)")
        if run.is_main_process:
            truncate_jsonl(run.run_dir.diagnostics, run.step)  # a resumed run redoes the steps after its checkpoint
            self.records = read_diagnostics(run.run_dir.diagnostics)
            self.writer = run.log.tensorboard()

    @timed
    def before_optimizer_step(self, run: Run) -> None:
        step = run.step + 1  # the update about to be applied
        if "grad_norms" not in self.cfg.metrics or step % self.cfg.grad_norm_every_steps:
            return
        self.grad_norms = component_grad_norms(run.unwrapped_model, **self.grad_access)
        if self.writer is not None:  # the Depth tab's per-block tensors (main process)
            write_summary(self.writer, grad_norm_summary(self.grad_norms, stage_names(run.unwrapped_model)), step)

    @timed
    def measure_if_due(self, run: Run, checkpoint_tags: Sequence[str] = ()) -> None:
        """Measure this step if a checkpoint with `checkpoint_tags` is about to be saved or every_steps says so."""
        if measures_checkpoint(self.cfg, checkpoint_tags):
            self.measure(run, "checkpoint")
            if self.cfg.tensorboard_images == "checkpoints":
                self.log_images(run)
        elif self.cfg.every_steps and run.step % self.cfg.every_steps == 0:
            self.measure(run, "every_steps")

    def measure(self, run: Run, trigger: str) -> None:
        """Run the probe metrics on every probed model and log them (collective: every process)."""
        if self.probe is None or self.last_step == run.step:
            return
        self.last_step = run.step
        self.measurements += 1
        epoch = round(run.step / max(run.updates_per_epoch, 1), 4)
        with preserved_rng_state():
            for model_name in self.models:
                start = time.perf_counter()
                module = run.unwrapped_model if model_name == "raw" else run.ema_model
                if self.replica is not None:  # sharded weights (FSDP, ZeRO-3; no EMA there): gather them first
                    gather_full_weights(run.model, self.replica, self.sharding)
                    module = self.replica
                results = run_diagnostics(module, self.probe, self.cfg, run.recipe.model.num_classes)
                if not run.is_main_process:
                    continue
                record = build_record(results, stage_names(module), step=run.step, epoch=epoch, model=model_name,
                                      trigger=trigger, probe_size=self.probe.size,
                                      num_processes=run.accelerator.num_processes,
                                      elapsed_s=round(time.perf_counter() - start, 3), grad_norms=self.grad_norms)
                self.records.append(record)
                if self.writer is not None:  # per-stage values: tensors for the Depth tab
                    write_summary(self.writer, depth_summary(record), run.step)
                run.log_scalars(dashboard_scalars(record))  # a few summaries for Scalars
                run.log.append_jsonl(run.run_dir.diagnostics.name, record)
                run.log.print(summary_line(record))

    def finish(self, run: Run) -> None:
        """At the end (after the final save): the `final` images and the cost line."""
        if not self.measurements:  # e.g. `--resume auto` of a finished run: nothing new to show
            return
        if self.cfg.tensorboard_images == "final" and run.status != "failed":
            timed(TrainingDiagnostics.log_images)(self, run)
        run.log.print(f"diagnostics cost: {self.cost_s:.2f} s (probe loading, {self.measurements} evaluations, "
                      "gradient norms, images)")

    def log_images(self, run: Run) -> None:
        """Heatmaps over every record so far and the latest phase curve: each heatmap holds every evaluation
        so far anyway, and fewer images keep TensorBoard's event files small."""
        if self.writer is None or self.images_step == run.step:
            return
        self.images_step = run.step
        for model_name in self.models:
            records = [r for r in self.records if r["model"] == model_name]
            if records:
                log_images(self.writer, records, run.step, model_name)
