"""The run: everything built from a recipe before the first step, in one object the loop and plug-ins share.

`build_run` spells out the order once:

    accelerator -> the checkpoint to resume from (verified) -> run dir checked -> data -> model
    (variant applied at creation, trained weights loaded for finetuning) -> trainable mask ->
    optimizer over the de-duplicated trainable parameters -> schedule -> accelerate.prepare -> EMA
    copy of the prepared (rank-0-broadcast) weights -> checkpoint restore (RNG streams included) ->
    recipe.yaml written, logs of the steps to redo dropped -> trackers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn

from models import create_vit_from_recipe
from models.errors import UserError
from models.weights import load_initial_weights
from trainer.accelerator import DistributedSetupError, build_accelerator
from trainer.callbacks import Callback, CallbackList
from trainer.checkpoint import TRAINER_STATE, CheckpointError, TrainState, remove_incomplete
from trainer.data import DataBundle, build_data
from trainer.optim import (
    BatchGeometry,
    ParameterEma,
    apply_trainable_patterns,
    build_optimizer,
    build_scheduler,
    scaled_lr,
)
from trainer.recipe import RecipeError
from trainer.recipe_schema import Recipe
from trainer.run_dir import (
    RunDir,
    check_run_dir,
    resolve_resume,
    resolve_weights_file,
    truncate_jsonl,
    write_recipe,
)
from trainer.save_restore import load_checkpoint
from trainer.tracking import RunLogger


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's model: timm + variant, trained weights for finetuning, activation checkpointing."""
    model = create_vit_from_recipe(recipe)
    if recipe.model.checkpoint:  # finetuning: start from trained weights (a resume then overrides them)
        load_initial_weights(model, resolve_weights_file(recipe.model.checkpoint))
    if recipe.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


@dataclass
class Run:
    """One training run: what it trains, with what, where it writes, and how far it is."""

    recipe: Recipe
    accelerator: Accelerator
    run_dir: RunDir  # also usable as a path: Path(run.run_dir, "x")
    data: DataBundle
    model: nn.Module  # as prepared by accelerate (DDP / FSDP / DeepSpeed wrapper)
    unwrapped_model: nn.Module  # the timm model inside
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm Scheduler, stepped per update
    ema: ParameterEma | None
    state: TrainState  # step, epoch, data position, evaluations: what trainer_state.json holds
    log: RunLogger
    callbacks: CallbackList  # the user's plug-ins
    geometry: BatchGeometry
    updates_per_epoch: int
    total_steps: int
    stop_at: int  # min(total_steps, train.max_steps)
    status: str = "running"  # then finished | max_steps | preempted | failed
    last_checkpoint: Path | None = None
    saved_step: int | None = None  # step of the newest checkpoint (at most one per step)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ema_model(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    def eval_models(self) -> dict[str, nn.Module]:
        """{"": model} plus {"_ema": EMA} when eval.ema: the suffixes of the evaluation's metric keys."""
        with_ema = self.ema is not None and self.recipe.eval.ema
        return {"": self.model, **({"_ema": self.ema.module} if with_ema else {})}

    # ---- logging channels for plug-ins (main process writes; `step` defaults to the current one) ----
    def log_scalars(self, values: dict[str, float], step: int | None = None) -> None:
        self.log.log_scalars(values, self.step if step is None else step)

    def log_images(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Images to TensorBoard (`SummaryWriter.add_images`: NCHW tensors, or pass dataformats=...)."""
        self.log.log_images(values, self.step if step is None else step, **kwargs)

    def log_text(self, values: dict[str, str], step: int | None = None) -> None:
        self.log.log_text(values, self.step if step is None else step)

    def append_jsonl(self, filename: str, record: dict) -> None:
        """Append `{"step", "epoch", **record}` to `<run>/<filename>` (main process only)."""
        self.log.append_jsonl(filename, {"step": self.step, "epoch": self.epoch, **record})


def on_main_for_all(accelerator: Accelerator, compute: Callable[[], Any]) -> Any:
    """`compute()` on the main process; every process returns its result or raises its user error."""
    outcome: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [compute(), None]
        except (UserError, FileNotFoundError) as e:
            outcome = [None, e]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def check_shared_run_dir(accelerator: Accelerator, run: RunDir) -> None:
    """Every process must see the run dir process 0 writes: a token written there by process 0 is read back by
    all of them. Otherwise (a node-local disk) the other nodes' checkpoint shards, or their resume, would
    silently differ from process 0's."""
    if accelerator.num_processes == 1:
        return
    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    broadcast_object_list(token)
    probe = run.root / f".depthlab-shared-{token[0]}"
    if accelerator.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    accelerator.wait_for_everyone()
    seen = probe.is_file() and probe.read_text() == token[0]
    blind = [rank for rank, ok in enumerate(gather_object([seen])) if not ok]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    if blind:
        raise DistributedSetupError(
            f"run dir {run.root}: process{'es' if len(blind) > 1 else ''} {', '.join(map(str, blind))} cannot see "
            "what process 0 writes there (a disk local to its node?); put --output on a filesystem every node mounts")


def check_position(state: TrainState, checkpoint: Path, batches_per_epoch: int, total_steps: int) -> None:
    """The loop position a checkpoint holds must exist in this recipe's data (a damaged or foreign state)."""
    where = checkpoint / TRAINER_STATE
    if not 0 <= state.batch_in_epoch < batches_per_epoch:
        raise CheckpointError(f"{where}: batch_in_epoch = {state.batch_in_epoch} is outside [0, {batches_per_epoch}), "
                              "the batches of one epoch here")
    if state.step > total_steps:
        raise CheckpointError(f"{where}: step = {state.step} is past this recipe's {total_steps} updates")


def build_run(recipe: Recipe, run_dir: Path | str, resume: str | None = None,
              callbacks: Iterable[Callback] = ()) -> Run:
    """Build (or restore, with `resume` = "auto" or a checkpoint path) the run `recipe` describes."""
    paths = RunDir(Path(run_dir))
    accelerator = build_accelerator(recipe, paths.root)
    check_shared_run_dir(accelerator, paths)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = recipe.train.tf32

    def skipped(path: Path, why: str) -> None:
        accelerator.print(f"warning: skipping checkpoint {path}: {why}")

    # verified once (hashing every file), on the main process; every process gets its answer or its error
    resume_from = on_main_for_all(accelerator, lambda: resolve_resume(paths, resume, skipped))
    check_run_dir(paths, recipe, resume_from)
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
    # train.compile: accelerate compiles inside prepare, after the DDP wrapper (so DDP can overlap its
    # all-reduce with backward, and unwrapping strips the compiled wrapper) or via DeepSpeed's engine.compile
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = ParameterEma(unwrapped, cfg.ema_decay, cfg.ema_walk) if cfg.ema_decay is not None else None

    total_steps = recipe.schedule.epochs * updates_per_epoch
    state = TrainState(num_processes=accelerator.num_processes)
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
                                ema=ema)
        check_position(state, resume_from, updates_per_epoch * cfg.grad_accum_steps, total_steps)
        scheduler.step_update(state.step)  # whichever the schedule counts (updates or epochs)
        scheduler.step(state.epoch)
    else:
        set_seed(cfg.seed + accelerator.process_index)  # the loop's own streams differ per process
    if accelerator.is_main_process:
        write_recipe(paths, recipe)  # only now: a start that failed above leaves the run dir as it was
        truncate_jsonl(paths.metrics, state.step)  # records of the steps being redone (all, on a fresh start)
        remove_incomplete(paths.checkpoints)
    accelerator.wait_for_everyone()
    if recipe.logging.tensorboard:
        # purge_step: events of the steps being redone (after a resume, or a restart from step 0) are
        # dropped from the earlier event files. Written from the first session on: TensorBoard's Python data
        # provider takes a run's first SessionLog.START as its start and would not purge the first resume.
        # No `config`: accelerate would write it with SummaryWriter.add_hparams, which opens a new
        # timestamp-named run in tb/ at every launch; RunLogger.write_hparams writes it into the run itself.
        accelerator.init_trackers("", init_kwargs={"tensorboard": {"purge_step": state.step + 1}})

    log = RunLogger(recipe, accelerator, paths, total_steps=total_steps, updates_per_epoch=updates_per_epoch,
                    global_batch=geometry.global_batch, corrupt_images=data.skipped_corrupt)
    log.write_hparams()
    return Run(recipe=recipe, accelerator=accelerator, run_dir=paths, data=data, model=model, unwrapped_model=unwrapped,
               optimizer=optimizer, scheduler=scheduler, ema=ema, state=state, log=log,
               callbacks=CallbackList(callbacks), geometry=geometry, updates_per_epoch=updates_per_epoch,
               total_steps=total_steps, stop_at=min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps,
               saved_step=state.step if resume_from is not None else None,
               last_checkpoint=resume_from)
