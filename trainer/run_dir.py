"""The run directory: where it is, what it holds, and never mixing two recipes in one.

    <run>/recipe.yaml        resolved recipe (trainer.recipe.save_recipe)
    <run>/summary.json       final / best accuracies, params, MACs, throughput, wall time
    <run>/metrics.jsonl      one JSON object per logged step and per evaluation
    <run>/diagnostics.jsonl  one JSON object per diagnostics evaluation (diagnostics/records.py)
    <run>/checkpoints/       step_XXXXXXXX/ (see trainer/checkpoint.py), `last` and `best` links
    <run>/tb/                TensorBoard events
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer.checkpoint import CheckpointError, is_complete, latest_checkpoint
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
        return self.root / "diagnostics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"


def default_run_dir(recipe: Recipe, recipe_path: str | Path, output: str | None) -> Path:
    if output:
        return Path(output)
    if recipe.train.output_dir:
        return Path(recipe.train.output_dir)
    return Path("runs") / Path(recipe_path).stem


def load_saved_recipe(path: Path) -> Recipe:
    data = yaml.safe_load(path.read_text()) or {}
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


def resolve_resume(run: RunDir, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one in the run dir (None if there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run.checkpoints)
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(2, "checkpoint not found", str(path))
    if not is_complete(path):
        raise CheckpointError(f"--resume {path}: not a complete checkpoint (no valid MANIFEST.json); "
                              f"complete ones: {latest_checkpoint(path.parent) or 'none'}")
    return path


def prepare_run_dir(run: RunDir, recipe: Recipe, resume_from: Path | None, is_main: bool,
                    barrier: Callable[[], None] = lambda: None) -> None:
    """Refuse to overwrite another recipe's run or an unfinished run; write recipe.yaml.

    Called on every process: all check (and raise the same error) before `barrier`, after which
    only the main process writes, so no process reads a half-written recipe.yaml.
    """
    if resume_from is not None:
        check_same_recipe(resume_from / "recipe.yaml", recipe, f"checkpoint {resume_from}")
    if run.recipe.is_file():
        check_same_recipe(run.recipe, recipe, f"run dir {run.root}")
    if resume_from is None and latest_checkpoint(run.checkpoints) is not None:
        raise RunDirError(f"run dir {run.root} already holds checkpoints ({latest_checkpoint(run.checkpoints)}); "
                          "pass --resume auto to continue it, or choose another --output")
    barrier()
    if is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        run.checkpoints.mkdir(exist_ok=True)
        save_recipe(recipe, run.recipe, header="resolved recipe of this run (depthlab)")


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop records logged after `after_step` (they belong to the part of the run being redone).

    Used for metrics.jsonl at resume, and by the diagnostics callback for diagnostics.jsonl. A last
    line cut off by a kill mid-append is dropped too.
    """
    if not path.is_file():
        return
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= after_step]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
