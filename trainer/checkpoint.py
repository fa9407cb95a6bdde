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
    MANIFEST.json          written last: step, epoch, tags, and every file's size and xxh3-128 content
                           hash; a checkpoint is complete iff it exists and its files have those sizes

Atomicity: everything is written into `.tmp-step_00001234/`, each file fsync'd, the manifest
written and fsync'd, the directory fsync'd, then renamed to its final name and the parent
directory fsync'd. A kill at any point leaves earlier checkpoints untouched and at most a
`.tmp-*` directory, which is ignored (and removed at the next start). A write that runs out of
space (ENOSPC, EDQUOT) fails on every process alike with `DiskFullError`, its temporary directory
removed.

Verification (`verify_checkpoint`, before a resume): the manifest's structure, every file's size
and content hash (about 4 GB/s from the page cache here: a ViT-L checkpoint, ~5 GB with its EMA
and AdamW state, in ~1.3 s), and `trainer_state.json`'s keys and types. `--resume auto` takes the
newest checkpoint that verifies and says which ones it skipped and why. Loading wraps every file's
reader, so a file that verifies but does not load (another model's weights, a refused pickle) is
one `CheckpointError` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
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
CONTENT_HASH = "xxh3_128"
CHECKPOINT_DIR = re.compile(r"step_(\d+)")
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(UserError):
    """A checkpoint that cannot be used (incomplete, damaged, or not a depthlab checkpoint)."""


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the path and the space needed.

    Entry points exit with their own code for it (trainer/train.py: 3): the run is intact and
    `--resume auto` continues it once space is freed.
    """


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
    # the logging window since the last logged step, so a resumed run logs the same means
    log_window_loss: float = 0.0
    log_window_steps: int = 0
    corrupt_images_skipped: int = 0  # over all processes and earlier sessions, up to this checkpoint

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str | Path = TRAINER_STATE) -> TrainState:
        """Parse and check a trainer_state.json (keys and types); CheckpointError names `where`."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CheckpointError(f"{where}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise CheckpointError(f"{where}: unknown keys {unknown} (not a depthlab trainer state, or a newer one)")
        for name, value in data.items():
            if not _has_type(value, hints[name]):
                raise CheckpointError(f"{where}: {name} = {value!r} is not {hints[name]}")
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise CheckpointError(f"{where}: {name} = {value!r} is negative")
        return cls(**data)


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(isinstance(item, dict) for item in value)
    return isinstance(value, hint)


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


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes (fast enough to hash every checkpoint: see the module docstring)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(directory: Path) -> dict[str, dict]:
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, CONTENT_HASH: file_digest(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def parse_manifest(path: Path) -> dict:
    """The manifest of checkpoint `path`, its structure checked; CheckpointError says what is wrong.

    `files` maps each name to {"bytes", "xxh3_128"} (or, written by depthlab before content hashes,
    to its size alone)."""
    where = path / MANIFEST
    if not where.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (not a complete depthlab checkpoint)")
    try:
        manifest = json.loads(where.read_text())
    except ValueError as e:
        raise CheckpointError(f"{where}: not JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    step, files = manifest.get("step"), manifest.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{where}: step = {step!r} is not a step number")
    if not isinstance(files, dict) or not all(
            isinstance(entry, int) or isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
            for entry in files.values()):
        raise CheckpointError(f"{where}: files = {str(files)[:80]} is not a mapping of file names to sizes")
    return manifest


def _listed_size(entry: int | dict) -> int:
    return entry if isinstance(entry, int) else entry["bytes"]


def _size_problem(path: Path, manifest: dict) -> str | None:
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != _listed_size(entry):
            return f"{file}: {file.stat().st_size} bytes, the manifest says {_listed_size(entry)} (truncated or replaced)"
    return None


def is_complete(path: Path) -> bool:
    """A sealed checkpoint whose files have the sizes its manifest lists (cheap: no hashing)."""
    if path.name.startswith(TMP_PREFIX):
        return False
    try:
        return _size_problem(path, parse_manifest(path)) is None
    except CheckpointError:
        return False


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest, every file's size and content hash, and trainer_state.json; return the manifest.

    Raises CheckpointError naming the first file that is missing, truncated or changed.
    """
    manifest = parse_manifest(path)
    problem = _size_problem(path, manifest)
    if problem:
        raise CheckpointError(problem)
    for name, entry in manifest["files"].items():
        if isinstance(entry, dict) and CONTENT_HASH in entry and file_digest(path / name) != entry[CONTENT_HASH]:
            raise CheckpointError(f"{path / name}: content differs from the manifest's {CONTENT_HASH} (damaged)")
    if TRAINER_STATE not in manifest["files"]:
        raise CheckpointError(f"{path}: the manifest lists no {TRAINER_STATE}")
    TrainState.from_json((path / TRAINER_STATE).read_text(), path / TRAINER_STATE)
    return manifest


def read_manifest(path: Path) -> dict:
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete depthlab checkpoint (no valid {MANIFEST})")
    return parse_manifest(path)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every `step_*` directory under `root` (complete or not, never `.tmp-*` or a link), oldest first by the
    step in its name."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.fullmatch(p.name).group(1)))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (by step)."""
    found = [p for p in checkpoint_dirs(root) if is_complete(p)]
    return sorted(found, key=lambda p: parse_manifest(p)["step"])


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def newest_verified_checkpoint(root: Path, on_skip: Callable[[Path, str], None] = lambda path, why: None
                               ) -> Path | None:
    """The newest checkpoint under `root` that verifies; `on_skip(path, why)` hears of each newer one that did not."""
    for path in reversed(checkpoint_dirs(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            on_skip(path, str(e))
            continue
        return path
    return None


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
        raise CheckpointError(f"{where}: {_refused_pickle(error)}") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _refused_pickle(error: pickle.UnpicklingError) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    what = found.group(1) if found else str(error).splitlines()[0]
    return f"refused to unpickle {what} (checkpoints load tensors and plain data only, never arbitrary objects)"


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


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _disk_full(where: Path, error: Exception | None, root: Path, written: int) -> DiskFullError:
    previous = latest_checkpoint(root)
    needed = _directory_bytes(previous) if previous is not None else written
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
    written = _directory_bytes(tmp)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    raise _disk_full(tmp, error, root, written)


def out_of_space(error: Exception, where: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, safetensors' "StorageFull", or any failure of a
    writer that does not say why (torch.save: "iostream error", "unexpected pos") on a device with (almost)
    nothing left."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in NO_SPACE
    text = str(error)
    if "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return True
    return where.exists() and shutil.disk_usage(where).free < 64 * 2**20


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
        raise CheckpointError(f"{path}: {_refused_pickle(e)}") from None
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
