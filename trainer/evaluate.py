"""Evaluation: top-1/top-5 of the raw and the EMA model in one pass, and `--eval-only`.

`evaluate` (the loop's evaluation): the eval loader gives every example to exactly one process
with `valid=True` (padding slots, which keep the batch counts equal across processes, have
`valid=False` and are not counted); torchmetrics sums the counts over processes in `compute()`.

`evaluate_checkpoint` (`trainer/train.py --eval-only`) scores a trained checkpoint, optionally with
a scaled position embedding:

    python trainer/train.py --recipe recipes/demo_digits.yaml --eval-only --output runs/pe_half \\
        --set model.checkpoint=runs/demo_digits/checkpoints/last/model.safetensors eval.pe_scale=0.5

The recipe's model is built, initialised from `model.checkpoint` and evaluated on the eval split
with e_i + eval.pe_scale * p_i (science.md §1, PE-scale experiment; 1.0 = the model as trained).
On the diagnostics probe set (diagnostics.probe_size images, diagnostics.probe_seed) the
diagnostics suite measures, at that scale, the token-similarity curve, PE dominance and the
Cliff–Plateau–Climb phases, plus the other `diagnostics.metrics` when `diagnostics.enabled`. The run
dir receives

    recipe.yaml        the resolved recipe (a different recipe already there is an error)
    summary.json       status "finished", mode "evaluate", pe_scale, top-1/top-5, cliff_size, phases
    metrics.jsonl      one eval record
    diagnostics.jsonl  one record (trigger "offline", plus "pe_scale"; diagnostics/records.py)

It runs on every process of an `accelerate launch`; the eval set and the probe set are sharded
over processes and the results summed, so N processes give the numbers of one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diagnostics import check_config, load_probe, run_diagnostics, scaled_position_embedding, stage_names
from diagnostics.capture import unwrap_model
from diagnostics.records import build_record
from diagnostics.suite import ProbeData
from models import parameter_dtype
from trainer.accelerator import build_accelerator
from trainer.checkpoint import MANIFEST
from trainer.data import build_eval_loader, build_probe_dataset
from trainer.recipe import RecipeError, save_recipe
from trainer.recipe_schema import Recipe
from trainer.run import build_model
from trainer.run_dir import (
    RunDir,
    build_summary,
    check_same_recipe,
    model_cost,
    resolve_weights_file,
    write_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    from torchmetrics.classification import MulticlassAccuracy


def _metrics(num_classes: int, device: torch.device) -> dict[str, MulticlassAccuracy]:
    # imported at the first evaluation: torchmetrics imports all its domains (text, and transformers with it
    # when installed) at import, ~2 s of a process's start that a run stopped before evaluating never needs
    from torchmetrics.classification import MulticlassAccuracy

    return {f"top{k}": MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro").to(device)
            for k in (1, min(5, num_classes))}


@torch.no_grad()
def evaluate(models: Mapping[str, nn.Module], loader: Iterable, accelerator, num_classes: int) -> dict[str, float]:
    """Accuracies in percent, keyed `top1`, `top5` for models[""] and `top1_ema`, ... for models["_ema"]."""
    device = accelerator.device
    metrics = {suffix: _metrics(num_classes, device) for suffix in models}
    input_dtypes = {suffix: parameter_dtype(m) for suffix, m in models.items()}
    training = {suffix: m.training for suffix, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for images, targets, valid in loader:
            images = images.to(device, non_blocking=True)
            targets, valid = targets.to(device, non_blocking=True), valid.to(device, non_blocking=True)
            for suffix, model in models.items():
                with accelerator.autocast():
                    logits = model(images.to(input_dtypes[suffix]))
                for metric in metrics[suffix].values():
                    metric.update(logits[valid].float(), targets[valid])
    finally:
        for suffix, m in models.items():
            m.train(training[suffix])
    out = {}
    for suffix, per_k in metrics.items():
        for name, metric in per_k.items():
            out[f"{name}{suffix}"] = round(100.0 * metric.compute().item(), 4)
    return out


@dataclass
class EvalOnlyResult:
    run_dir: Path
    checkpoint: Path
    pe_scale: float
    metrics: dict[str, float]  # top1, top5 (percent)
    phases: dict[str, Any]  # diagnostics.phases.Phases as a dict
    pe_dominance: float | None


def probe_diagnostics_config(recipe: Recipe) -> Any:
    """The recipe's diagnostics when enabled, else token similarity only (the Cliff needs no more)."""
    cfg = recipe.diagnostics
    metrics = list(cfg.metrics) if cfg.enabled else []
    return replace(cfg, metrics=list(dict.fromkeys(["token_similarity", *metrics])))


def probe_record(model: torch.nn.Module, cfg: Any, num_classes: int, probe: ProbeData, *, step: int,
                 epoch: float, weights: str, num_processes: int) -> dict[str, Any]:
    """The diagnostics suite on `model` as it is now (call inside the PE scaling), as a diagnostics record."""
    start = time.perf_counter()
    results = run_diagnostics(model, probe, cfg, num_classes)
    return build_record(results, stage_names(model), step=step, epoch=epoch, model=weights, trigger="offline",
                        probe_size=probe.size, num_processes=num_processes, elapsed_s=time.perf_counter() - start)


def _checkpoint_position(weights: Path) -> tuple[int, float]:
    """(step, epoch) of the checkpoint holding `weights`, (0, 0.0) for a file outside a checkpoint."""
    manifest = weights.parent / MANIFEST
    if not manifest.is_file():
        return 0, 0.0
    data = json.loads(manifest.read_text())
    return int(data.get("step", 0)), float(data.get("epoch", 0))


def _prepare_run_dir(run: RunDir, recipe: Recipe, is_main: bool) -> None:
    if run.recipe.is_file():
        check_same_recipe(run.recipe, recipe, f"run dir {run.root}")
    if is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run.recipe, header="resolved recipe of this evaluation (depthlab --eval-only)")


def evaluate_checkpoint(recipe: Recipe, run_dir: str | Path) -> EvalOnlyResult:
    """Evaluate `recipe.model.checkpoint` at `recipe.eval.pe_scale`; write the run dir (see module docstring)."""
    if not recipe.model.checkpoint:
        raise RecipeError("--eval-only needs model.checkpoint (a model.safetensors / ema.safetensors file, "
                          "a checkpoint directory or a run directory)")
    start = time.perf_counter()
    weights = resolve_weights_file(recipe.model.checkpoint)
    run = RunDir(Path(run_dir))
    accelerator = build_accelerator(recipe, run.root)
    _prepare_run_dir(run, recipe, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    model = build_model(recipe).to(accelerator.device).eval()
    alpha = recipe.eval.pe_scale
    if alpha != 1.0 and getattr(unwrap_model(model), "pos_embed", None) is None:
        raise RecipeError(f"eval.pe_scale = {alpha}: {recipe.model.name} has no learned pos_embed to scale")
    n, rank = accelerator.num_processes, accelerator.process_index
    cfg = probe_diagnostics_config(recipe)
    check_config(cfg, model)
    eval_loader = build_eval_loader(recipe, n, rank)
    probe = load_probe(build_probe_dataset(recipe, cfg.probe_size, cfg.probe_seed), cfg, rank, n,
                       recipe.data.num_workers)
    step, epoch = _checkpoint_position(weights)
    scaling = contextlib.nullcontext() if alpha == 1.0 else \
        scaled_position_embedding(model, alpha, recipe.eval.pe_scale_rows)
    with scaling:
        metrics = evaluate({"": model}, eval_loader, accelerator, recipe.model.num_classes)
        record = probe_record(model, cfg, recipe.model.num_classes, probe, step=step, epoch=epoch, num_processes=n,
                              weights="ema" if weights.name == "ema.safetensors" else "raw")
    record["pe_scale"] = alpha

    phases = record["phases"]
    if accelerator.is_main_process:
        elapsed = time.perf_counter() - start
        evaluation = {"step": step, "epoch": epoch, "kind": "eval", "pe_scale": alpha, **metrics}
        write_atomic(run.metrics, json.dumps(evaluation) + "\n")
        write_atomic(run.diagnostics, json.dumps(record) + "\n")
        write_json_atomic(run.summary, build_summary(
            recipe, model_cost(recipe), status="finished", evals=[evaluation], num_processes=n, wall_time_s=elapsed,
            mode="evaluate", checkpoint=str(weights.resolve()), checkpoint_step=step, checkpoint_epoch=epoch,
            pe_scale=alpha, cliff_size=phases["cliff_size"], cliff_end=phases["cliff_end"],
            pe_dominance=record["pe_dominance"]))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return EvalOnlyResult(run.root, weights, alpha, metrics, phases, record["pe_dominance"])
