"""Saving the run's objects into a checkpoint, and restoring them from one (collective: every process).

What goes where is the layout in trainer/checkpoint.py: the model and EMA as safetensors (a sharded
run also through accelerate's `save_state`), optimizer, scheduler, grad-scaler and each process's RNG
streams as weights-only torch files, the `TrainState` and the recipe; then the manifest seals it.
Running out of space is agreed on by every process, so all of them raise `DiskFullError` together
and the temporary directory is removed. Restoring wraps every file's reader, so a file that
verifies but does not load (another model's weights, a refused pickle) is one `CheckpointError`
naming the file.
"""

from __future__ import annotations

import errno
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_model

from models import save_model_file
from trainer.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RECIPE_FILE,
    SCALER_FILE,
    SCHEDULER_FILE,
    SHARDED_STATE,
    TMP_PREFIX,
    TRAINER_STATE,
    CheckpointError,
    DiskFullError,
    TrainState,
    checkpoint_name,
    commit,
    deepspeed_checkpoint_globals,
    directory_bytes,
    format_bytes,
    fsync_file,
    latest_checkpoint,
    load_tensor_file,
    out_of_space,
    point,
    read_manifest,
    refused_pickle,
    weights_only_torch_loads,
)
from trainer.recipe import save_recipe
from trainer.recipe_schema import Recipe
from trainer.rng import capture_rng_state, restore_rng_state


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


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


def _disk_full(where: Path, error: Exception | None, root: Path, written: int) -> DiskFullError:
    previous = latest_checkpoint(root)
    needed = directory_bytes(previous) if previous is not None else written
    free = shutil.disk_usage(root).free if root.exists() else 0
    path = getattr(error, "filename", None) or where
    return DiskFullError(errno.ENOSPC, f"no space left on the device writing {path}: a checkpoint needs about "
                                       f"{format_bytes(needed)}, {format_bytes(free)} free; the last good checkpoint "
                                       f"({previous or 'none'}) is intact, and --resume auto continues once space is freed")


def _agree_on_space(accelerator: Accelerator, error: Exception | None, tmp: Path, root: Path) -> None:
    """Collective: if any process ran out of space, every process raises DiskFullError (temporary files removed)."""
    failed = torch.tensor(float(error is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item() == 0:
        return
    written = directory_bytes(tmp)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    raise _disk_full(tmp, error, root, written)


def save_checkpoint(root: Path, accelerator: Accelerator, state: TrainState, recipe: Recipe, tags: list[str], *,
                    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    ema: Any = None) -> Path:
    """Write one complete checkpoint of `model` (as prepared), optimizer, scheduler, EMA, RNG streams
    and `state` atomically (collective: call on every process)."""
    name = checkpoint_name(state.step)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    full_state_dict, error = None, None
    if is_sharded(accelerator):  # collective writes: a failure here cannot be agreed on first
        accelerator.save_state(str(tmp / SHARDED_STATE), safe_serialization=True)
        full_state_dict = full_precision_state_dict(accelerator, model)
    try:
        rng_file = tmp / f"rng_rank{accelerator.process_index}.pt"
        torch.save(capture_rng_state(), rng_file)
        fsync_file(rng_file)
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            save_model_file(unwrapped, tmp / MODEL_FILE, state_dict=full_state_dict)
            if ema is not None:
                ema.save(tmp / EMA_FILE)
            if not is_sharded(accelerator):
                torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / SCALER_FILE)
            (tmp / TRAINER_STATE).write_text(state.to_json())
            save_recipe(recipe, tmp / RECIPE_FILE, header=f"recipe of checkpoint {name}")
    except Exception as e:
        if not out_of_space(e, root):
            raise
        error = e
    _agree_on_space(accelerator, error, tmp, root)  # also the barrier: every rank's files are written
    try:
        if accelerator.is_main_process:
            commit(tmp, final, {"step": state.step, "epoch": state.epoch, "tags": sorted(set(tags))})
            point(root, "last", final)
    except Exception as e:
        if not out_of_space(e, root):
            raise
        error = e
    _agree_on_space(accelerator, error, tmp, root)
    return final


def _device_name(device: torch.device) -> str:
    """What safetensors and torch.load accept: `cpu` (never `cpu:0`, as accelerate names CPU ranks), `cuda:<i>`."""
    return "cpu" if device.type == "cpu" else str(device)


def _read(path: Path, load: Callable[[], Any]) -> Any:
    """One checkpoint file's reader; whatever it raises becomes one CheckpointError naming the file."""
    try:
        return load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {refused_pickle(e)}") from None
    except Exception as e:  # safetensors, torch.load of garbage, strict key checks
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
        reason = lines[0]
        if isinstance(e, RuntimeError) and "state_dict" in reason:  # strict load: which keys or shapes differ
            detail = lines[1] if len(lines) > 1 else reason
            reason = f"weights of another model ({detail[:160]}{'...' if len(detail) > 160 else ''})"
        raise CheckpointError(f"{path}: cannot be loaded: {reason}") from None


def load_checkpoint(path: Path, accelerator: Accelerator, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, ema: Any = None) -> TrainState:
    """Restore model, optimizer, scheduler, EMA and this process's RNG streams; return the loop state."""
    read_manifest(path)  # raises if incomplete
    state = TrainState.from_json((path / TRAINER_STATE).read_text(), path / TRAINER_STATE)
    if state.num_processes != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was saved by {state.num_processes} processes, this run has {accelerator.num_processes}: "
            "the global batch, learning rate and data order depend on it; resume with the same number")
    device = _device_name(accelerator.device)
    if is_sharded(accelerator):
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        with weights_only_torch_loads(path, deepspeed_checkpoint_globals() if deepspeed else ()):
            _read(path / SHARDED_STATE, lambda: accelerator.load_state(str(path / SHARDED_STATE)))
    else:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        _read(path / MODEL_FILE, lambda: load_model(unwrapped, str(path / MODEL_FILE), strict=True, device=device))
        _read(path / OPTIMIZER_FILE,
              lambda: optimizer.load_state_dict(load_tensor_file(path / OPTIMIZER_FILE, device)))
    _read(path / SCHEDULER_FILE, lambda: scheduler.load_state_dict(load_tensor_file(path / SCHEDULER_FILE)))
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path} has no {EMA_FILE} but train.ema_decay is set")
        _read(path / EMA_FILE, lambda: ema.load(path / EMA_FILE))
    if accelerator.scaler is not None and (path / SCALER_FILE).is_file():
        _read(path / SCALER_FILE, lambda: accelerator.scaler.load_state_dict(load_tensor_file(path / SCALER_FILE)))
    rng_file = path / f"rng_rank{accelerator.process_index}.pt"
    _read(rng_file, lambda: restore_rng_state(load_tensor_file(rng_file)))
    return state
