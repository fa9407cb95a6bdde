"""The run directory: the unit everything agrees on, and the only place its file names are spelled.

    <run>/recipe.yaml        resolved recipe (trainer.recipe.save_recipe)
    <run>/summary.json       final / best accuracies, params, MACs, throughput, wall time (`build_summary`)
    <run>/metrics.jsonl      one JSON object per logged step and per evaluation
    <run>/diagnostics.jsonl  one JSON object per diagnostics evaluation (diagnostics/records.py)
    <run>/checkpoints/       step_XXXXXXXX/ (trainer/checkpoint.py), `last` and `best` links
    <run>/tb/                TensorBoard events
    <run>/plots/             figures written by tools/report.py

Also here: refusing to mix two recipes in one run dir, choosing the checkpoint to resume from, the
one atomic file write, and the JSON-lines helpers the loggers share.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diagnostics.records import DIAGNOSTICS_FILE
from models import create_vit_from_recipe, profile_model
from models.weights import WeightInitError
from trainer.checkpoint import (
    MODEL_FILE,
    TMP_PREFIX,
    CheckpointError,
    DiskFullError,
    TrainState,
    checkpoint_dirs,
    format_bytes,
    fsync_file,
    newest_verified_checkpoint,
    out_of_space,
    verify_checkpoint,
)
from trainer.recipe import RecipeError, flatten_recipe, recipe_from_dict, save_recipe
from trainer.recipe_schema import Recipe

# Keys that may change between a run and its resumption: they do not change what is trained.
RESUME_MUTABLE_KEYS = frozenset({
    "train.output_dir", "train.max_steps", "data.num_workers", "data.pin_memory", "logging.progress_bar",
})


class RunDirError(RecipeError):
    """A run directory that cannot be used as asked (another recipe, checkpoints in the way, ...)."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:  # a RunDir is also the path of its root: Path(run_dir, "x"), open(...)
        return str(self.root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def __str__(self) -> str:
        return str(self.root)

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def diagnostics(self) -> Path:
        return self.root / DIAGNOSTICS_FILE  # its format belongs to diagnostics/records.py

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def last_checkpoint(self) -> Path:
        """The `last` link: the newest complete checkpoint."""
        return self.checkpoints / "last"

    def is_run(self) -> bool:
        return self.recipe.is_file()


# ---- files: one atomic write, JSON lines ----------------------------------------------------

def _disk_full(path: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return DiskFullError(errno.ENOSPC, f"no space left on the device writing {path}: it needs {format_bytes(needed)}, "
                                       f"{format_bytes(free)} free; the last good checkpoint is intact, and "
                                       "--resume auto continues once space is freed")


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename (fsync'd first), so a reader or a kill never leaves a half-written file.
    Out of space: DiskFullError, the old file intact and the temporary one removed."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        tmp.write_text(text)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if out_of_space(e, path.parent):
            raise _disk_full(path, len(text.encode())) from None
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, strict_json(data, indent=2) + "\n")


def strict_json(data: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: NaN and infinities become null (Python writes bare `NaN`)."""
    return json.dumps(_finite_or_null(data), allow_nan=False, **kwargs)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


def append_jsonl(path: Path, record: dict) -> None:
    """One strict-JSON line; a line cut off by a full disk is removed again (readers would stop at it)."""
    line = strict_json(record) + "\n"
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as f:
            f.write(line)
    except OSError as e:
        if not out_of_space(e, path.parent):
            raise
        with open(path, "r+") as f:
            f.truncate(size)
        raise _disk_full(path, len(line.encode())) from None


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records logged after `after_step` (they belong to the part of the run being redone).

    Used for metrics.jsonl and diagnostics.jsonl at resume. A last line cut off by a kill
    mid-append is dropped too.
    """
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # cut off by a kill mid-append
            raise RunDirError(f"{path}:{number}: not a JSON record ({e}); repair or delete the line") from None
        if record.get("step", 0) <= after_step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


# ---- recipes in run dirs ----------------------------------------------------------------------

def default_run_dir(recipe: Recipe, recipe_path: str | Path, output: str | None) -> Path:
    if output:
        return Path(output)
    if recipe.train.output_dir:
        return Path(recipe.train.output_dir)
    return Path("runs") / Path(recipe_path).stem


def load_saved_recipe(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RunDirError(f"{path}: not a recipe (invalid YAML: {str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: not a recipe (not text)") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: not a recipe (a {type(data).__name__}, not a mapping of sections)")
    return recipe_from_dict(data, source=str(path))


def recipe_differences(saved: Recipe, current: Recipe) -> list[str]:
    """Flattened keys whose values differ, ignoring RESUME_MUTABLE_KEYS."""
    a, b = flatten_recipe(saved), flatten_recipe(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if k not in RESUME_MUTABLE_KEYS and a.get(k) != b.get(k)]


def check_same_recipe(saved_path: Path, current: Recipe, what: str) -> None:
    diffs = recipe_differences(load_saved_recipe(saved_path), current)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} keys)" if len(diffs) > 8 else "")
        raise RunDirError(f"{what} was trained with a different recipe ({saved_path}): {shown}. "
                          "Use the same recipe and --set overrides, or another --output")


def resolve_resume(run: RunDir, resume: str | None,
                   on_skip: Callable[[Path, str], None] = lambda path, why: None) -> Path | None:
    """The checkpoint to resume from, verified (trainer/checkpoint.py `verify_checkpoint`).

    `auto`: the newest checkpoint of the run dir that verifies (`on_skip(path, why)` for each newer one
    that does not); None when the run dir has no checkpoint at all, but an error when it has some and
    none verifies: a run is never silently started over. A path: that checkpoint, or an error saying
    what is wrong with it.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = newest_verified_checkpoint(run.checkpoints, on_skip)
        existing = checkpoint_dirs(run.checkpoints)
        if found is None and existing:
            raise CheckpointError(f"run dir {run.root}: none of its {len(existing)} checkpoints verifies (newest: "
                                  f"{existing[-1].name}); refusing to start over from step 0: restore a checkpoint, "
                                  "or move the run dir away to train afresh")
        return found
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(2, "checkpoint not found", str(path))
    try:
        verify_checkpoint(path.resolve())
    except CheckpointError as e:
        good = newest_verified_checkpoint(path.resolve().parent)
        raise CheckpointError(f"{e}; the newest checkpoint that verifies is {good or 'none'}") from None
    return path


def check_run_dir(run: RunDir, recipe: Recipe, resume_from: Path | None) -> None:
    """Refuse to overwrite another recipe's run or an unfinished run (every process checks alike)."""
    if run.root.exists() and not run.root.is_dir():
        raise RunDirError(f"--output {run.root} is a file, not a run directory: choose another --output")
    written = [p.name for p in (run.metrics, run.summary, run.diagnostics, run.checkpoints, run.tensorboard)
               if p.exists()]
    if written and not run.recipe.is_file():  # a run writes its recipe.yaml before anything else
        raise RunDirError(f"--output {run.root} holds {', '.join(written)} but no {run.recipe.name}: it is not a "
                          "depthlab run directory, and its files are not the trainer's to overwrite; choose another "
                          "--output")
    if resume_from is not None:
        check_same_recipe(resume_from / run.recipe.name, recipe, f"checkpoint {resume_from}")
    if run.recipe.is_file():
        check_same_recipe(run.recipe, recipe, f"run dir {run.root}")
    existing = checkpoint_dirs(run.checkpoints)
    if resume_from is None and existing:
        raise RunDirError(f"run dir {run.root} already holds checkpoints ({existing[-1]}); "
                          "pass --resume auto to continue it, or choose another --output")


def write_recipe(run: RunDir, recipe: Recipe, header: str = "resolved recipe of this run (depthlab)") -> None:
    """recipe.yaml (main process), written once everything the run needs was built: a start that fails
    (a missing data.root, say) leaves no recipe behind to refuse the corrected command."""
    run.root.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(exist_ok=True)
    save_recipe(recipe, run.recipe, header=header)


def prepare_run_dir(run: RunDir, recipe: Recipe, resume_from: Path | None, is_main: bool,
                    barrier: Callable[[], None] = lambda: None) -> None:
    """`check_run_dir` on every process, then `write_recipe` on the main one (after `barrier`, so no process
    reads a half-written recipe.yaml)."""
    check_run_dir(run, recipe, resume_from)
    barrier()
    if is_main:
        write_recipe(run, recipe)


def resolve_weights_file(checkpoint: str | Path) -> Path:
    """The safetensors file `model.checkpoint` names: the file itself, a checkpoint directory's
    model.safetensors, or a run directory's newest checkpoint (checkpoints/last/model.safetensors)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for candidate in (path / MODEL_FILE, RunDir(path).last_checkpoint / MODEL_FILE):
            if candidate.is_file():
                return candidate
        raise WeightInitError(f"model.checkpoint = {checkpoint}: a directory without {MODEL_FILE} "
                               f"(nor checkpoints/last/{MODEL_FILE}); name a .safetensors file")
    if not path.is_file():
        raise WeightInitError(f"model.checkpoint = {checkpoint}: file not found")
    if path.suffix != ".safetensors":
        raise WeightInitError(f"model.checkpoint = {checkpoint}: expected a .safetensors file "
                               "(convert a torch checkpoint with safetensors.torch.save_file)")
    return path


# ---- summary.json -----------------------------------------------------------------------------

def accuracy_summary(evals: list[dict], suffix: str = "") -> dict[str, Any] | None:
    """Final/best/peak_to_final of top1 and top5 over the evaluations (keys `top1{suffix}`, `top5{suffix}`).

    peak_to_final = best - final is P2's stability measure (P2 quotes the EMA model's). With a validation
    set (data.val_fraction), also val_top1_best and top1_at_best_val: the test top-1 of the evaluation
    that is best on validation, the number P3 reports.
    """
    out: dict[str, Any] = {}
    for metric in ("top1", "top5"):
        key = f"{metric}{suffix}"
        history = [e for e in evals if e.get(key) is not None]
        if not history:
            continue
        final = history[-1][key]
        best = max(history, key=lambda e: e[key])  # earliest of equal bests
        prefix = "" if metric == "top1" else "top5_"
        out[f"{metric}_final"] = final
        out[f"{metric}_best"] = best[key]
        out[f"{prefix}best_epoch"] = best["epoch"]
        out[f"{prefix}best_step"] = best["step"]
        out[f"{prefix}peak_to_final"] = round(best[key] - final, 6)
    validated = [e for e in evals if e.get(f"val_top1{suffix}") is not None and e.get(f"top1{suffix}") is not None]
    if validated:  # data.val_fraction: the test top-1 of the evaluation that is best on validation (P3's report)
        chosen = max(validated, key=lambda e: e[f"val_top1{suffix}"])  # earliest of equal bests
        out.update({"val_top1_best": chosen[f"val_top1{suffix}"], "top1_at_best_val": chosen[f"top1{suffix}"],
                    "best_val_epoch": chosen["epoch"], "best_val_step": chosen["step"]})
    return out or None


def model_cost(recipe: Recipe) -> dict[str, int]:
    """Unique parameters and MACs per image, counted on a meta-device copy (no weights allocated)."""
    profile = profile_model(create_vit_from_recipe(recipe, device="meta", pretrained=False))
    return {"params": profile.params, "macs_linear": profile.macs_linear, "macs_total": profile.macs_total}


def build_summary(recipe: Recipe, cost: dict[str, int], *, status: str, evals: list[dict], num_processes: int,
                  wall_time_s: float, **fields: Any) -> dict[str, Any]:
    """summary.json: what a run reached, in the numbers papers quote (training and --eval-only alike).

    Raw and EMA: final and best top-1/top-5, the epoch of the best and peak_to_final; the model's
    cost; `fields` add what the kind of run knows (training: step, throughput, ...; evaluation:
    the checkpoint, pe_scale, the cliff).
    """
    return {"status": status, "model": recipe.model.name, "variant": recipe.variant.kind, **fields,
            "raw": accuracy_summary(evals), "ema": accuracy_summary(evals, "_ema"), **cost,
            "num_processes": num_processes, "wall_time_s": round(wall_time_s, 2)}


def training_summary(state: TrainState, recipe: Recipe, cost: dict[str, int], *, status: str,
                     global_batch: int) -> dict[str, Any]:
    throughput = state.images_seen / state.train_time_s if state.train_time_s > 0 else None
    return build_summary(
        recipe, cost, status=status, evals=state.evals, num_processes=state.num_processes,
        wall_time_s=state.wall_time_s, step=state.step, epoch=state.epoch, epochs=recipe.schedule.epochs,
        train_throughput_img_s=round(throughput, 2) if throughput else None,
        train_time_s=round(state.train_time_s, 2), images_seen=state.images_seen, global_batch=global_batch,
        nonfinite_skips=state.nonfinite_skips, best_checkpoint=state.best_checkpoint)


def read_summary(run_dir: str | Path) -> dict | None:
    try:
        return json.loads(RunDir(Path(run_dir)).summary.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_is_finished(run_dir: str | Path) -> bool:
    """True once the trainer has written a final summary (training ran to its last step)."""
    summary = read_summary(run_dir)
    return bool(summary) and summary.get("status") == "finished"
