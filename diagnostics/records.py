"""Diagnostics records: one JSON object per analysed model and evaluation, `<run>/diagnostics.jsonl`.

    {"step": 630, "epoch": 30.0, "model": "raw", "trigger": "checkpoint", "probe_size": 450,
     "num_processes": 1, "elapsed_s": 1.9, "stages": ["embed", "pe", "block_1", ..., "norm"],
     "token_similarity": {"raw": [...], "centered": [...]}, "pe_dominance": 0.033,
     "phases": {"cliff_end": "block_1", ..., "tau_sensitivity": [...]},
     "isi": {"isi": [...], "r2_self": [...], "r2_all": [...]},
     "attention": {...}, "neural_collapse": {...}, "plasticity": {...}, "grad_norms": {...},
     "probe_top1": 98.4}

Every per-stage quantity is a list aligned with `stages`, null where undefined (attention off
the blocks, NC3/NC4 off `norm`, ...); a metric that was not enabled is absent; numbers are plain
floats (NaN and infinities become null). `probe_top1` (top-1 of the head on the probe images, in
percent) is present when the probe labels are the head's classes. tools/analyze.py writes the
same layout, plus `label`, `source` and `pe_scale`, into analysis.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diagnostics.capture import NORM
from diagnostics.registry import METRICS, PER_STAGE_KEYS
from models.errors import UserError

DIAGNOSTICS_FILE = "diagnostics.jsonl"
PHASE_BOUNDARIES = ("cliff_end", "plateau_start", "plateau_end", "climb_start")


class DiagnosticsRecordError(UserError):
    """A diagnostics.jsonl that cannot be read (a malformed line that is not a cut-off last line)."""


def json_value(value: Any) -> Any:
    """Plain JSON: floats stay floats (non-finite -> None), containers recursively, tensors via .item()."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    raise TypeError(f"cannot store {type(value).__name__} in a diagnostics record")


def aligned(per_stage: Mapping[str, Any], stages: Sequence[str], key: str | None = None) -> list[Any]:
    """`[per_stage[s][key] for s in stages]` (or `per_stage[s]` without a key), None where missing."""
    values = []
    for stage in stages:
        entry = per_stage.get(stage)
        if key is not None:
            entry = entry.get(key) if isinstance(entry, Mapping) else None
        values.append(json_value(entry))
    return values


def build_record(results: Mapping[str, Any], stages: Sequence[str], *, step: int, epoch: float, model: str,
                 trigger: str, probe_size: int, num_processes: int, elapsed_s: float,
                 grad_norms: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A record from `diagnostics.suite.run_diagnostics` results (and `component_grad_norms` output)."""
    record: dict[str, Any] = {
        "step": int(step), "epoch": float(epoch), "model": model, "trigger": trigger,
        "probe_size": int(probe_size), "num_processes": int(num_processes), "elapsed_s": round(elapsed_s, 3),
        "stages": list(stages),
    }
    for metric, keys in PER_STAGE_KEYS.items():
        if metric not in results:
            continue
        record[metric] = {key: aligned(results[metric], stages, key) for key in keys}
        if metric == "token_similarity":
            dominance = results.get("pe_dominance", {}).get("pe", {}).get("pe_dominance")
            record["pe_dominance"] = json_value(dominance)
            if "phases" in results:
                record["phases"] = json_value(results["phases"])
    if grad_norms is not None:
        record["grad_norms"] = {component: aligned(grad_norms.get(component, {}), stages)
                                for component in METRICS["grad_norms"].keys}
    accuracy = results.get("probe_accuracy", {}).get(NORM)
    if accuracy:
        record["probe_top1"] = json_value(accuracy["top1"])
    return record


def diagnostics_path(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".jsonl" else path / DIAGNOSTICS_FILE


def read_diagnostics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run (or of a .jsonl path), in file order; [] when the run has none.

    A cut-off last line (a process killed mid-append) is ignored; any other malformed line raises
    DiagnosticsRecordError naming the file and line.
    """
    path = diagnostics_path(run_dir)
    if not path.is_file():
        if not path.parent.is_dir():
            raise FileNotFoundError(2, "run directory not found", str(path.parent))
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise DiagnosticsRecordError(f"{path}:{number}: not a JSON record ({error.msg})") from None
    return records


def final_record(run_dir: str | Path, model: str = "raw") -> dict[str, Any] | None:
    """The record of the latest step for `model` ("raw" or "ema"), or None when there is none."""
    candidates = [record for record in read_diagnostics(run_dir) if record.get("model") == model]
    return max(reversed(candidates), key=lambda record: record["step"]) if candidates else None


def stage_index(record: Mapping[str, Any], stage: str | None) -> int | None:
    """Position of `stage` in the record's stages (0 = embed), None for a missing stage."""
    stages = record["stages"]
    return stages.index(stage) if stage in stages else None


def phase_indices(record: Mapping[str, Any]) -> dict[str, int | None]:
    """{cliff_end, plateau_start, plateau_end, climb_start} as stage indices (None when absent)."""
    phases = record.get("phases") or {}
    return {name: stage_index(record, phases.get(name)) for name in PHASE_BOUNDARIES}


def quantity(record: Mapping[str, Any], metric: str, key: str) -> list[float | None] | None:
    """One aligned per-stage list of a record, or None when the metric was not recorded."""
    values = record.get(metric)
    return None if values is None else values.get(key)


def stage_step_matrix(records: Sequence[Mapping[str, Any]], metric: str,
                      key: str) -> tuple[list[str], list[int], list[list[float | None]]]:
    """(stages, steps, values[stage][record]) of one quantity over records of one model, for a heatmap.

    Stages are the latest record's; records without the metric are skipped.
    """
    kept = [record for record in records if quantity(record, metric, key) is not None]
    if not kept:
        return [], [], []
    stages = list(kept[-1]["stages"])
    columns = [dict(zip(record["stages"], quantity(record, metric, key))) for record in kept]
    return stages, [record["step"] for record in kept], [[column.get(stage) for column in columns]
                                                         for stage in stages]
