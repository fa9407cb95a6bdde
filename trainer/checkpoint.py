"""Checkpoint directories on disk: what one holds, how it is sealed atomically, verified, found and pruned.

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
newest checkpoint that verifies and says which ones it skipped and why. Writing the run's objects
into a checkpoint and restoring them is trainer/save_restore.py.
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

from models.errors import UserError

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
        raise CheckpointError(f"{where}: {refused_pickle(error)}") from None
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def refused_pickle(error: pickle.UnpicklingError) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    what = found.group(1) if found else str(error).splitlines()[0]
    return f"refused to unpickle {what} (checkpoints load tensors and plain data only, never arbitrary objects)"


def deepspeed_checkpoint_globals() -> list[type]:
    """The plain-data classes DeepSpeed pickles into its ZeRO checkpoints (enums, records)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


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
