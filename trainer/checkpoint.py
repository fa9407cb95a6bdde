"""Atomic, resumable checkpoints.

Layout of one checkpoint, `<run>/checkpoints/step_00001234/`:

    model.safetensors      raw weights, `models.save_model_file` (shared tensors once, rebuild spec)
    ema.safetensors        EMA weights, same format (when the run has an EMA)
    optimizer.pt           optimizer state dict            (torch.load(weights_only=True))
    scheduler.pt           timm scheduler state dict       (weights_only)
    scaler.pt              fp16 grad-scaler state          (weights_only; fp16 runs only)
    rng_rank<r>.pt         python / numpy / torch / cuda RNG states of process r (weights_only)
    trainer_state.json     step, epoch, data position, evaluation history, ...
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
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
POINTERS = ("last", "best")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, or not a depthlab checkpoint)."""


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename, so a reader never sees a half-written file."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    fsync_file(tmp)
    os.replace(tmp, path)


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


# ---- RNG streams: the loop's own randomness (drop-path, mixup draws, ...) -----------------------

def capture_rng_state() -> dict:
    """Every RNG stream of this process, as tensors and plain values (torch.load(weights_only=True))."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


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
