"""Runs of sweeps (or single run dirs), grouped into variants, with the numbers a report shows.

    runs = find_runs(["runs/sweeps/mlp_reduction"])      # every run dir under the paths
    groups = group_runs(runs)                             # runs that differ only in train.seed
    row = group_row(groups[0])                            # {"top1_final": Stat(81.05, 0.11, 3), ...}

A run dir is recognised by its `recipe.yaml`. When it lies in a sweep's `runs/` folder, the
sweep's `sweep.json` gives its point name and axis labels. Per run, `run_values` flattens
summary.json (raw and EMA accuracies, cost, throughput) and the final diagnostics record
(diagnostics.jsonl: cliff_end, plateau_length, climb_start, ISI at the last block and its
maximum over blocks, CLS centrality at the last block). Seeds are combined as mean ± sample
standard deviation (ddof = 1) with the count; a value missing in a run is left out of its count.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from diagnostics.records import final_record, read_diagnostics
from models.errors import UserError
from trainer.recipe import RecipeError, flatten_recipe
from trainer.recipe_schema import Recipe
from trainer.run_dir import RESUME_MUTABLE_KEYS, RunDir, load_saved_recipe, read_summary

SWEEP_MANIFEST = "sweep.json"
SEED_KEY = "train.seed"
# Keys that do not make two runs different variants.
NOT_A_VARIANT = frozenset(RESUME_MUTABLE_KEYS | {SEED_KEY})
_BLOCK = re.compile(r"block_(\d+)$")


class ReportError(UserError):
    """Report input that cannot be used (no runs under a path, unreadable files)."""


@dataclass
class Run:
    path: Path
    name: str  # sweep point name, or the run dir's name
    summary: dict[str, Any]  # {} before the trainer wrote one
    recipe: Recipe | None
    flat: dict[str, Any]  # flattened recipe ({} if it does not load)
    labels: dict[str, str] = field(default_factory=dict)  # sweep axis -> label, seed axis excluded
    sweep: str | None = None

    @property
    def mode(self) -> str:
        return "evaluate" if self.summary.get("mode") == "evaluate" else "train"

    @property
    def status(self) -> str:
        return self.summary.get("status", "not started")

    @property
    def seed(self) -> int | None:
        return self.flat.get(SEED_KEY)


@dataclass
class Group:
    name: str
    runs: list[Run]

    @property
    def mode(self) -> str:
        return self.runs[0].mode

    @property
    def sweep(self) -> str | None:
        return self.runs[0].sweep


@dataclass(frozen=True)
class Stat:
    """Mean ± sample std over `n` runs (std None for one run); for strings, the distinct values."""

    mean: float | str | None
    std: float | None = None
    n: int = 0


# --- finding runs ------------------------------------------------------------------------------

def _manifest_points(sweep_dir: Path) -> tuple[str, dict[str, dict]]:
    try:
        manifest = json.loads((sweep_dir / SWEEP_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{sweep_dir / SWEEP_MANIFEST}: unreadable sweep manifest ({e})") from None
    points = {str((sweep_dir / p["run_dir"]).resolve()): p for p in manifest.get("points", [])}
    return manifest.get("name", sweep_dir.name), points


def load_run(path: Path, name: str | None = None, labels: dict[str, str] | None = None,
             sweep: str | None = None) -> Run:
    try:
        recipe = load_saved_recipe(RunDir(path).recipe)
        flat = flatten_recipe(recipe)
    except (RecipeError, OSError):
        recipe, flat = None, {}  # an older schema: shown by name, not grouped by recipe
    labels = {k: v for k, v in (labels or {}).items() if k != SEED_KEY}
    return Run(path, name or path.name, read_summary(path) or {}, recipe, flat, labels, sweep)


def _run_dirs(root: Path) -> list[Path]:
    layout = RunDir(root)
    if layout.is_run():
        return [root]
    # run dirs are found by their recipe.yaml; checkpoints hold copies of it
    return sorted(p.parent for p in root.rglob(layout.recipe.name) if p.parent.parent.name != layout.checkpoints.name)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every run dir under `paths` (a run dir, a sweep output dir, or any folder above them).

    Order: by argument, then a sweep's runs in its grid order, other runs by path."""
    found: dict[Path, tuple[tuple, Run]] = {}
    manifests: dict[Path, tuple[str, dict[str, dict]]] = {}
    for index, given in enumerate(paths):
        root = Path(given)
        if not root.exists():
            raise ReportError(f"{root}: no such run or sweep directory")
        dirs = _run_dirs(root)
        if not dirs:
            raise ReportError(f"{root}: no run directories (folders with a recipe.yaml) found")
        for run_dir in dirs:
            resolved = run_dir.resolve()
            if resolved in found:
                continue
            sweep_dir = run_dir.parent.parent
            if sweep_dir not in manifests:
                has_manifest = (sweep_dir / SWEEP_MANIFEST).is_file()
                manifests[sweep_dir] = _manifest_points(sweep_dir) if has_manifest else (None, {})
            sweep, points = manifests[sweep_dir]
            point = points.get(str(resolved))
            if point is None:
                found[resolved] = ((index, str(run_dir), 0), load_run(run_dir))
            else:
                position = list(points).index(str(resolved))
                found[resolved] = ((index, str(sweep_dir), position),
                                   load_run(run_dir, point["name"], point.get("labels"), sweep))
    return [run for _, run in sorted(found.values(), key=lambda item: item[0])]


# --- grouping ----------------------------------------------------------------------------------

def variant_key(run: Run) -> tuple:
    if not run.flat:
        return (("path", str(run.path)),)
    return tuple(sorted((k, v) for k, v in run.flat.items() if k not in NOT_A_VARIANT))


def _varying_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.flat} - NOT_A_VARIANT)
    return [k for k in keys if len({repr(r.flat.get(k)) for r in runs}) > 1]


def _group_name(runs: list[Run], varying: list[str]) -> str:
    labels = {tuple(r.labels.items()) for r in runs}
    if len(labels) == 1 and runs[0].labels:
        return "-".join(runs[0].labels.values())
    if runs[0].flat and 0 < len(varying) <= 3:
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={runs[0].flat.get(k)}" for k in varying)
    return re.sub(r"[-_]?seed\d+$", "", runs[0].name) or runs[0].sweep or runs[0].path.parent.name


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs of one sweep with equal recipes up to train.seed (and keys that do not change training), in order."""
    grouped: dict[tuple, list[Run]] = {}
    for run in runs:  # each sweep keeps its own rows, even where two sweeps share a recipe
        grouped.setdefault((run.sweep, run.mode, variant_key(run)), []).append(run)
    varying = {mode: _varying_keys([r for r in runs if r.mode == mode]) for mode in {r.mode for r in runs}}
    groups = [Group(_group_name(members, varying[members[0].mode]), members) for members in grouped.values()]
    seen: dict[str, int] = {}
    for group in groups:  # two variants may share labels (e.g. the same sweep reported twice)
        seen[group.name] = seen.get(group.name, 0) + 1
        if seen[group.name] > 1:
            group.name = f"{group.name} ({seen[group.name]})"
    return groups


# --- numbers per run ---------------------------------------------------------------------------

ACCURACY_KEYS = ("top1_final", "top1_best", "best_epoch", "top5_final", "top5_best", "peak_to_final",
                 "val_top1_best", "top1_at_best_val")


def _stage_value(record: dict, section: str, key: str, stage: str) -> float | None:
    values = (record.get(section) or {}).get(key)
    stages = record.get("stages") or []
    if not values or stage not in stages:
        return None
    return values[stages.index(stage)]


def last_block(stages: list[str]) -> str | None:
    blocks = [s for s in stages if _BLOCK.match(s)]
    return max(blocks, key=lambda s: int(_BLOCK.match(s).group(1))) if blocks else None


def diagnostics_values(record: dict | None) -> dict[str, Any]:
    """The table's diagnostics from one diagnostics.jsonl record (missing metrics are absent)."""
    if not record:
        return {}
    out: dict[str, Any] = {}
    phases = record.get("phases") or {}
    for key in ("cliff_end", "cliff_size", "plateau_length", "climb_start"):
        if key in phases:
            out[key] = phases[key]
    if record.get("pe_dominance") is not None:
        out["pe_dominance"] = record["pe_dominance"]
    stages = record.get("stages") or []
    final = last_block(stages)
    if final is not None:
        isi = (record.get("isi") or {}).get("isi")
        if isi:
            out["isi_last"] = _stage_value(record, "isi", "isi", final)
            block_isi = [v for s, v in zip(stages, isi) if _BLOCK.match(s) and v is not None]
            if block_isi:
                out["isi_max"] = max(block_isi)
        centrality = _stage_value(record, "attention", "cls_centrality", final)
        if centrality is not None:
            out["cls_centrality_last"] = centrality
    return {k: v for k, v in out.items() if v is not None}


def run_values(run: Run, diagnostics_model: str = "raw") -> dict[str, Any]:
    """One run's numbers, flat: accuracies (`ema_` prefix for the EMA model), cost, diagnostics."""
    s = run.summary
    values: dict[str, Any] = {"status": run.status}
    for key in ("params", "macs_linear", "macs_total", "train_throughput_img_s", "train_time_s", "wall_time_s"):
        if s.get(key) is not None:
            values[key] = s[key]
    for prefix, section in (("", s.get("raw")), ("ema_", s.get("ema"))):
        for key in ACCURACY_KEYS:
            if section and section.get(key) is not None:
                values[prefix + key] = section[key]
    if run.mode == "evaluate":
        values["pe_scale"] = s.get("pe_scale", run.flat.get("eval.pe_scale"))
    if run.mode == "evaluate":  # one record, of whichever weights were evaluated
        records = read_diagnostics(run.path)
        values.update(diagnostics_values(records[-1] if records else None))
    else:
        values.update(diagnostics_values(final_record(run.path, model=diagnostics_model)))
    if run.mode == "evaluate":  # the summary's own cliff (same record, kept if diagnostics.jsonl is gone)
        for key in ("cliff_size", "cliff_end", "pe_dominance"):
            if key not in values and s.get(key) is not None:
                values[key] = s[key]
    return values


def combine(values: list[Any]) -> Stat:
    present = [v for v in values if v is not None]
    if not present:
        return Stat(None, None, 0)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        finite = [float(v) for v in present if math.isfinite(float(v))]
        if not finite:
            return Stat(None, None, 0)
        std = statistics.stdev(finite) if len(finite) > 1 else None
        return Stat(statistics.fmean(finite), std, len(finite))
    distinct = list(dict.fromkeys(str(v) for v in present))
    return Stat("/".join(distinct), None, len(present))


def group_values(group: Group, diagnostics_model: str = "raw") -> dict[str, Stat]:
    per_run = [run_values(r, diagnostics_model) for r in group.runs]
    keys = list(dict.fromkeys(k for values in per_run for k in values))
    return {k: combine([values.get(k) for values in per_run]) for k in keys}


def select_best(groups: list[Group], key: str, metric: str | None = None,
                diagnostics_model: str = "raw") -> list[Group]:
    """P3's "best LR by validation": among groups equal up to `key`, keep the best mean `metric` (default: the
    validation top-1, `val_top1_best`, where runs held a validation set out; else `top1_final`)."""
    if metric is None:
        validated = all(group_values(g, diagnostics_model).get("val_top1_best", Stat(None)).mean is not None
                        for g in groups)
        metric = "val_top1_best" if groups and validated else "top1_final"
    best: dict[tuple, tuple[float, Group]] = {}
    order: list[tuple] = []
    for group in groups:
        run = group.runs[0]
        if key not in run.flat:
            raise ReportError(f"--best-of {key}: not a recipe key of {run.path} (e.g. optim.lr)")
        rest = (group.sweep, group.mode, tuple((k, v) for k, v in variant_key(run) if k != key))
        score = group_values(group, diagnostics_model).get(metric, Stat(None)).mean
        score = float("-inf") if not isinstance(score, float) else score
        if rest not in best:
            order.append(rest)
        if rest not in best or score > best[rest][0]:
            best[rest] = (score, group)
    all_runs = [run for group in groups for run in group.runs]
    varying = [k for k in _varying_keys(all_runs) if k != key]
    chosen = []
    for rest in order:
        group = best[rest][1]
        runs = [replace(r, labels={k: v for k, v in r.labels.items() if k != key}) for r in group.runs]
        name = _group_name(runs, varying)
        chosen.append(Group(f"{name} (best {key.rsplit('.', 1)[-1]}={group.runs[0].flat[key]})", group.runs))
    return chosen


def eval_history(run_dir: str | Path) -> list[dict]:
    """The `kind: eval` records of `<run>/metrics.jsonl` (epoch, top1, top5, top1_ema, ...)."""
    path = RunDir(Path(run_dir)).metrics
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r.get("kind") == "eval"]
