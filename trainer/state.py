"""What a checkpoint holds for the loop, and how it is written and restored across processes."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_model

from models import save_model_file
from trainer.checkpoint import (
    TMP_PREFIX,
    TRAINER_STATE,
    CheckpointError,
    capture_rng_state,
    checkpoint_name,
    commit,
    deepspeed_checkpoint_globals,
    fsync_file,
    load_tensor_file,
    point,
    read_manifest,
    restore_rng_state,
    weights_only_torch_loads,
)
from trainer.ema import ParameterEma
from trainer.recipe import save_recipe
from trainer.recipe_schema import Recipe


@dataclass
class TrainState:
    """The loop's position and history; everything else in a checkpoint is tensors."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # epoch in progress (0-based); after an epoch's last update it is the next one
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (resume skips them)
    images_seen: int = 0  # global, all processes
    train_time_s: float = 0.0  # time spent in training steps (not evaluation or checkpoints)
    wall_time_s: float = 0.0  # accumulated over all sessions of the run
    nonfinite_skips: int = 0
    num_processes: int = 1
    evals: list[dict] = field(default_factory=list)  # {"step", "epoch", "top1", "top5", "top1_ema", ...}
    best_checkpoint: str | None = None
    best_top1: float | None = None
    finished: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@dataclass
class Trainables:
    """The objects whose state a checkpoint carries."""

    model: torch.nn.Module  # prepared (DDP/FSDP/DeepSpeed) model
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm Scheduler
    ema: ParameterEma | None


def full_precision_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights from a sharded run (collective; complete on the main process).

    DeepSpeed with bf16/fp16 trains float32 master weights behind half-precision module weights; those
    masters are what model.safetensors holds (a bf16 copy would lose the low bits of every weight).
    """
    state = accelerator.get_state_dict(model)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return state
    from deepspeed.utils import safe_get_full_fp32_param

    unwrapped = accelerator.unwrap_model(model)
    masters = {id(p): safe_get_full_fp32_param(p)  # collective: the same parameter order on every rank
               for p in unwrapped.parameters() if p.dtype != torch.float32}
    for name, param in unwrapped.named_parameters(remove_duplicate=False):  # every alias of a shared tensor
        master = masters.get(id(param))
        if master is not None and name in state:
            state[name] = master.to("cpu")
    return state


def save_checkpoint(root: Path, accelerator: Accelerator, parts: Trainables, state: TrainState, recipe: Recipe,
                    tags: list[str]) -> Path:
    """Write one complete checkpoint atomically (collective: call on every process)."""
    name = checkpoint_name(state.step)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    full_state_dict = None
    if is_sharded(accelerator):
        accelerator.save_state(str(tmp / "accelerate_state"), safe_serialization=True)
        full_state_dict = full_precision_state_dict(accelerator, parts.model)
    rng_file = tmp / f"rng_rank{accelerator.process_index}.pt"
    torch.save(capture_rng_state(), rng_file)
    fsync_file(rng_file)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(parts.model, keep_torch_compile=False)
        save_model_file(unwrapped, tmp / "model.safetensors", state_dict=full_state_dict)
        if parts.ema is not None:
            parts.ema.save(tmp / "ema.safetensors")
        if not is_sharded(accelerator):
            torch.save(parts.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(parts.scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / TRAINER_STATE).write_text(state.to_json())
        save_recipe(recipe, tmp / "recipe.yaml", header=f"recipe of checkpoint {name}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(tmp, final, {"step": state.step, "epoch": state.epoch, "tags": sorted(set(tags))})
        point(root, "last", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator: Accelerator, parts: Trainables) -> TrainState:
    """Restore every part of `parts` and this process's RNG streams; return the loop state."""
    read_manifest(path)  # raises if incomplete
    state = TrainState.from_json((path / TRAINER_STATE).read_text())
    if state.num_processes != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was saved by {state.num_processes} processes, this run has {accelerator.num_processes}: "
            "the global batch, learning rate and data order depend on it; resume with the same number")
    device = accelerator.device
    if is_sharded(accelerator):
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        with weights_only_torch_loads(path, deepspeed_checkpoint_globals() if deepspeed else ()):
            accelerator.load_state(str(path / "accelerate_state"))
    else:
        unwrapped = accelerator.unwrap_model(parts.model, keep_torch_compile=False)
        load_model(unwrapped, str(path / "model.safetensors"), strict=True, device=str(device))
        parts.optimizer.load_state_dict(load_tensor_file(path / "optimizer.pt", device))
    parts.scheduler.load_state_dict(load_tensor_file(path / "scheduler.pt"))
    if parts.ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"{path} has no ema.safetensors but train.ema_decay is set")
        parts.ema.load(path / "ema.safetensors")
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load_tensor_file(path / "scaler.pt"))
    restore_rng_state(load_tensor_file(path / f"rng_rank{accelerator.process_index}.pt"))
    return state


def mark_best(root: Path, checkpoint: Path) -> None:
    point(root, "best", checkpoint)
