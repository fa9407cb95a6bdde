"""Checkpoints: what one holds, how it is written atomically, found, pruned and restored.

Layout of one checkpoint, `<run>/checkpoints/step_00001234/`:

    model.safetensors      raw weights, `models.save_model_file` (shared tensors once, rebuild spec)
    ema.safetensors        EMA weights, same format (when the run has an EMA)
    optimizer.pt           optimizer state dict            (torch.load(weights_only=True))
    scheduler.pt           timm scheduler state dict       (weights_only)
    scaler.pt              fp16 grad-scaler state          (weights_only; fp16 runs only)
    rng_rank<r>.pt         python / numpy / torch / cuda RNG states of process r (weights_only)
    trainer_state.json     `TrainState`: step, epoch, data position, evaluation history, ...
    recipe.yaml            the resolved recipe
    accelerate_state/      FSDP / DeepSpeed only: accelerate's sharded save_state (DeepSpeed's
                           files are read with weights_only too, see `weights_only_torch_loads`)
    MANIFEST.json          written last: file names and sizes; a checkpoint is complete iff it
                           exists and matches the files

Atomicity: everything is written into `.tmp-step_00001234/`, each file fsync'd, the manifest
written and fsync'd, the directory fsync'd, then renamed to its final name and the parent
directory fsync'd. A kill at any point leaves earlier checkpoints untouched and at most a
`.tmp-*` directory, which is ignored (and removed at the next start).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_model

from models import save_model_file
from models.errors import UserError
from trainer.recipe import save_recipe
from trainer.recipe_schema import Recipe
from trainer.rng import capture_rng_state, restore_rng_state

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
MODEL_FILE, EMA_FILE = "model.safetensors", "ema.safetensors"
OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE = "optimizer.pt", "scheduler.pt", "scaler.pt"
RECIPE_FILE, SHARDED_STATE = "recipe.yaml", "accelerate_state"
TMP_PREFIX = ".tmp-"
POINTERS = ("last", "best")


class CheckpointError(UserError):
    """A checkpoint that cannot be used (incomplete, or not a depthlab checkpoint)."""


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


# ---- on disk: names, completeness, atomic commit, retention ----------------------------------

def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def is_complete(path: Path) -> bool:
    manifest = path / MANIFEST
    if path.name.startswith(TMP_PREFIX) or not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def read_manifest(path: Path) -> dict:
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete depthlab checkpoint (no valid {MANIFEST})")
    return json.loads((path / MANIFEST).read_text())


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and is_complete(p)]
    return sorted(found, key=lambda p: read_manifest(p)["step"])


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_incomplete(root: Path) -> list[Path]:
    """Delete leftovers of interrupted saves (main process, before training starts)."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def point(root: Path, pointer: str, target: Path) -> None:
    """Atomically (re)point the symlink `root/pointer` at `target` (a sibling directory)."""
    tmp = root / f"{TMP_PREFIX}{pointer}"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, root / pointer)


def commit(tmp: Path, final: Path, manifest: dict) -> None:
    """Seal a fully written temporary checkpoint directory and rename it into place."""
    for p in tmp.rglob("*"):
        if p.is_file():
            fsync_file(p)
    manifest = {**manifest, "files": _files_under(tmp), "created": time.time()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. resumed and stopped again at once)
        trash = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def prune(root: Path, keep_last: int, protected: set[str]) -> list[Path]:
    """Keep the newest `keep_last` periodic checkpoints, the newest overall and the protected names."""
    found = complete_checkpoints(root)
    if not found:
        return []
    periodic = [p for p in found if "periodic" in read_manifest(p).get("tags", [])]
    keep = {p.name for p in periodic[-keep_last:]} | {found[-1].name} | protected
    removed = []
    for p in found:
        if p.name not in keep:
            shutil.rmtree(p)
            removed.append(p)
    if removed:
        fsync_dir(root)
    return removed


# ---- loading: tensors and plain data only -----------------------------------------------------

def load_tensor_file(path: Path, device: torch.device | str = "cpu") -> Any:
    """torch.load restricted to tensors and plain containers: never arbitrary pickle."""
    return torch.load(path, map_location=device, weights_only=True)


@contextmanager
def weights_only_torch_loads(where: Path, allowed_globals: Sequence[type] = ()) -> Iterator[None]:
    """Every torch.load inside, including third-party ones that pass weights_only=False (DeepSpeed's
    checkpoint engine), is restricted to tensors, plain containers and `allowed_globals`;
    a refusal is a CheckpointError naming `where` and the refused class."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            yield
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = found.group(1) if found else str(error).splitlines()[0]
        raise CheckpointError(f"{where}: refused to unpickle {what} (checkpoints load tensors and plain "
                              "data only, never arbitrary objects)") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def deepspeed_checkpoint_globals() -> list[type]:
    """The plain-data classes DeepSpeed pickles into its ZeRO checkpoints (enums, records)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


# ---- saving and restoring the run's objects (collective) --------------------------------------

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
    full_state_dict = None
    if is_sharded(accelerator):
        accelerator.save_state(str(tmp / SHARDED_STATE), safe_serialization=True)
        full_state_dict = full_precision_state_dict(accelerator, model)
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(tmp, final, {"step": state.step, "epoch": state.epoch, "tags": sorted(set(tags))})
        point(root, "last", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator: Accelerator, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, ema: Any = None) -> TrainState:
    """Restore model, optimizer, scheduler, EMA and this process's RNG streams; return the loop state."""
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
            accelerator.load_state(str(path / SHARDED_STATE))
    else:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        load_model(unwrapped, str(path / MODEL_FILE), strict=True, device=str(device))
        optimizer.load_state_dict(load_tensor_file(path / OPTIMIZER_FILE, device))
    scheduler.load_state_dict(load_tensor_file(path / SCHEDULER_FILE))
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path} has no {EMA_FILE} but train.ema_decay is set")
        ema.load(path / EMA_FILE)
    if accelerator.scaler is not None and (path / SCALER_FILE).is_file():
        accelerator.scaler.load_state_dict(load_tensor_file(path / SCALER_FILE))
    restore_rng_state(load_tensor_file(path / f"rng_rank{accelerator.process_index}.pt"))
    return state
