"""Everything built from a recipe before the first step: accelerator, data, model, optimizer, EMA,
restored state, callbacks. Order matters and is spelled out here once:

variant applied at model creation -> trainable mask -> optimizer over de-duplicated trainable
parameters -> accelerate.prepare -> EMA copy of the prepared (rank-0-broadcast) weights ->
checkpoint restore -> trackers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from models import create_vit_from_recipe
from trainer.callbacks import Callback, CallbackList, TrainContext, build_callbacks
from trainer.checkpoint import remove_incomplete
from trainer.data import build_data
from trainer.distributed import build_accelerator
from trainer.ema import ParameterEma
from trainer.init_weights import load_initial_weights
from trainer.optim import BatchGeometry, apply_trainable_patterns, build_optimizer, build_scheduler, scaled_lr
from trainer.recipe import RecipeError, flatten_recipe
from trainer.recipe_schema import Recipe
from trainer.run_dir import RunDir, prepare_run_dir, resolve_resume, truncate_metrics
from trainer.state import Trainables, TrainState, load_checkpoint
from trainer.step import UpdateStep
from trainer.tracking import Tracker


def build_model(recipe: Recipe) -> nn.Module:
    model = create_vit_from_recipe(recipe)
    if recipe.model.checkpoint:  # finetuning: start from trained weights (a resume then overrides them)
        load_initial_weights(model, recipe.model.checkpoint)
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_criterion(recipe: Recipe, mixup: bool) -> nn.Module:
    if mixup:  # timm's Mixup already folds label smoothing into the soft targets
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=recipe.augment.label_smoothing)


@dataclass
class Training:
    """The built run, handed to the loop."""

    run: RunDir
    accelerator: Accelerator
    data: Any  # trainer.data.DataBundle
    parts: Trainables
    updater: UpdateStep
    state: TrainState
    callbacks: CallbackList
    ctx: TrainContext
    geometry: BatchGeometry
    updates_per_epoch: int
    total_steps: int
    stop_at: int
    eval_models: dict[str, nn.Module]


def _hparams(recipe: Recipe) -> dict:
    return {k: ("null" if v is None else v) for k, v in flatten_recipe(recipe).items()}


def build_training(recipe: Recipe, run_dir: Path, resume: str | None, callbacks: Iterable[Callback]) -> Training:
    run = RunDir(Path(run_dir))
    accelerator = build_accelerator(recipe, run.root)
    resume_from = resolve_resume(run, resume)
    prepare_run_dir(run, recipe, resume_from, accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
    accelerator.wait_for_everyone()
    cfg = recipe.train

    data = build_data(recipe, accelerator.num_processes, accelerator.process_index)
    updates_per_epoch = data.steps_per_epoch // cfg.grad_accum_steps
    if updates_per_epoch == 0:
        raise RecipeError(f"train.grad_accum_steps = {cfg.grad_accum_steps} exceeds the "
                          f"{data.steps_per_epoch} batches per epoch")
    geometry = BatchGeometry(cfg.batch_size, accelerator.num_processes, cfg.grad_accum_steps)

    set_seed(cfg.seed)  # identical initial weights on every process
    model = build_model(recipe)
    apply_trainable_patterns(model, recipe.optim.trainable)
    model.to(accelerator.device)
    lr = scaled_lr(recipe.optim.lr, geometry.global_batch, recipe.optim.lr_reference_batch)
    optimizer = build_optimizer(model, recipe.optim, lr)
    scheduler = build_scheduler(optimizer, recipe.schedule, updates_per_epoch)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = ParameterEma(unwrapped, cfg.ema_decay) if cfg.ema_decay is not None else None
    parts = Trainables(model, optimizer, scheduler, ema)

    state = TrainState(num_processes=accelerator.num_processes)
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, parts)  # RNG streams included
        scheduler.step_update(state.step)
        if accelerator.is_main_process:
            truncate_metrics(run.metrics, state.step)
    else:
        set_seed(cfg.seed + accelerator.process_index)  # the loop's own streams differ per process
    if accelerator.is_main_process:
        remove_incomplete(run.checkpoints)
    if recipe.logging.tensorboard:
        # purge_step: events of steps being redone after a resume are dropped from the old files
        accelerator.init_trackers("", config=_hparams(recipe),
                                  init_kwargs={"tensorboard": {"purge_step": state.step + 1} if state.step else {}})

    total_steps = recipe.schedule.epochs * updates_per_epoch
    all_callbacks = build_callbacks(recipe, callbacks)
    ctx = TrainContext(recipe=recipe, accelerator=accelerator, model=model, unwrapped_model=unwrapped,
                       ema_model=ema.module if ema else None, run_dir=run.root, state=state,
                       tracker=Tracker(accelerator, run.root), parts=parts, callbacks=all_callbacks, data=data,
                       total_steps=total_steps,
                       extras={"updates_per_epoch": updates_per_epoch, "global_batch": geometry.global_batch})
    updater = UpdateStep(accelerator, model, optimizer, scheduler, ema,
                         build_criterion(recipe, data.mixup_fn is not None), data.mixup_fn,
                         recipe.optim.clip_grad_norm)
    return Training(
        run=run, accelerator=accelerator, data=data, parts=parts, updater=updater, state=state,
        callbacks=all_callbacks, ctx=ctx, geometry=geometry, updates_per_epoch=updates_per_epoch,
        total_steps=total_steps, stop_at=min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps,
        eval_models={"": model, **({"_ema": ema.module} if ema and recipe.eval.ema else {})})
