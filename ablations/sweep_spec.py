"""Sweep files: a base recipe, axes of dotted recipe keys, and seeds -> one run per point.

    base: ../recipes/vit_b.yaml        # relative to the sweep file
    name: mlp_reduction                # default: the file's stem
    output: runs/sweeps/mlp_reduction  # default: runs/sweeps/<name>
    set: [data.root=/data/imagenet]    # overrides applied to every point
    grid:                              # cartesian product of the axes
      variant.kind: [none, grouped_mlp, shallow_mlp, thin_mlp]
      optim.trainable:                 # a mapping gives each value a label
        MHA: ["blocks.*.attn.*", "norm.*", "head.*"]
    zip:                               # axes of equal length, stepped together
      model.name: [vit_small_patch16_224, vit_base_patch16_224]
      train.batch_size: [256, 128]
    seeds: [0, 1, 2]                   # train.seed axis (default: the recipe's seed)
    mode: train                        # or evaluate (score a trained checkpoint per point)
    launcher:
      accelerate_args: [--multi_gpu, --num_processes, "8"]   # default: --num_processes 1
      max_parallel: 1                  # local launcher: points run at a time (--max-parallel)
      slurm: {slurm_partition: gpu, nodes: 1, gpus_per_node: 8, cpus_per_task: 80, timeout_min: 4320}

Points are the product grid x zip x seeds; each is named from its labels, e.g.
`grouped_mlp-seed1` or `depth6-seed0`, and gets its own run dir `<output>/runs/<name>`.
Labels: a number gets its key's last part (`depth6`, `lr0.01`), a string stays itself, a
mapping axis uses its keys; a zip is labelled by its first axis. `launcher.slurm` takes
submitit's parameters: generic ones (nodes, gpus_per_node, cpus_per_task, mem_gb, timeout_min)
and Slurm's with the `slurm_` prefix (slurm_partition, slurm_account, slurm_qos, ...).
`mode: evaluate` points run `trainer/train.py --eval-only` (score `model.checkpoint`, e.g. over
`eval.pe_scale`) instead of training.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.errors import UserError
from trainer.recipe import RecipeError, did_you_mean, load_recipe
from trainer.recipe_schema import Recipe

SWEEP_KEYS = ("base", "name", "output", "set", "grid", "zip", "seeds", "mode", "launcher", "description")
LAUNCHER_KEYS = ("accelerate_args", "slurm", "max_parallel")
MODES = ("train", "evaluate")


class SweepError(UserError):
    """A sweep file that cannot be expanded or a sweep state that must not be touched."""


@dataclass
class Axis:
    key: str
    labels: list[str]
    values: list[Any]


@dataclass
class SweepPoint:
    name: str
    overrides: list[str]  # `key=value` strings, as for `--set`
    recipe: Recipe
    labels: dict[str, str] = field(default_factory=dict)  # axis key -> label


@dataclass
class SweepSpec:
    path: Path
    base: Path
    name: str
    output: Path
    common: list[str]
    grid: list[Axis]
    zipped: list[Axis]
    seeds: list[int] | None
    mode: str
    launcher: dict[str, Any]
    description: str = ""


def _label(key: str, value: Any) -> str:
    short = key.rsplit(".", 1)[-1]
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or value is None:
        text = f"{short}-{str(value).lower()}"
    elif isinstance(value, int | float):
        text = f"{short}{value:g}"
    else:
        raise SweepError(f"axis '{key}': give list- or mapping-valued points labels (write the axis as "
                         f"a mapping label: value), got {value!r}")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _axis(key: str, spec: Any, where: str) -> Axis:
    if isinstance(spec, dict):
        if not spec:
            raise SweepError(f"{where}: axis '{key}' is empty")
        return Axis(key, [re.sub(r"[^A-Za-z0-9_.+-]", "_", str(k)) for k in spec], list(spec.values()))
    if not isinstance(spec, list) or not spec:
        raise SweepError(f"{where}: axis '{key}' must be a non-empty list or a mapping label: value")
    return Axis(key, [_label(key, v) for v in spec], list(spec))


def _override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


def load_sweep(path: str | Path, output: str | Path | None = None) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=yaml.SafeLoader) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep must be a mapping")
    for key in data:
        if key not in SWEEP_KEYS:
            raise SweepError(f"{path}: unknown sweep key '{key}'{did_you_mean(key, SWEEP_KEYS)}")
    if "base" not in data:
        raise SweepError(f"{path}: 'base' (the recipe every point starts from) is required")
    base = (path.parent / str(data["base"])).resolve()
    if not base.is_file():
        raise SweepError(f"{path}: base recipe not found: {base}")
    name = str(data.get("name") or path.stem)
    mode = data.get("mode", "train")
    if mode not in MODES:
        raise SweepError(f"{path}: mode = {mode!r} is not one of {', '.join(MODES)}")
    grid = [_axis(k, v, str(path)) for k, v in (data.get("grid") or {}).items()]
    zipped = [_axis(k, v, str(path)) for k, v in (data.get("zip") or {}).items()]
    if len({len(a.values) for a in zipped}) > 1:
        lengths = ", ".join(f"{a.key}: {len(a.values)}" for a in zipped)
        raise SweepError(f"{path}: zip axes must have equal lengths ({lengths})")
    keys = [a.key for a in grid + zipped]
    if len(set(keys)) != len(keys):
        raise SweepError(f"{path}: an axis appears twice in grid/zip: {keys}")
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds)):
        raise SweepError(f"{path}: seeds = {seeds!r} must be a list of integers")
    if seeds is not None and "train.seed" in keys:
        raise SweepError(f"{path}: use either 'seeds' or a train.seed axis, not both")
    launcher = data.get("launcher") or {}
    for key in launcher:
        if key not in LAUNCHER_KEYS:
            raise SweepError(f"{path}: unknown launcher key '{key}'{did_you_mean(key, LAUNCHER_KEYS)}")
    common = data.get("set") or []
    if not isinstance(common, list):
        raise SweepError(f"{path}: 'set' must be a list of key=value overrides")
    out = Path(output) if output is not None else Path(data.get("output") or f"runs/sweeps/{name}")
    return SweepSpec(path=path, base=base, name=name, output=out, common=[str(s) for s in common], grid=grid,
                     zipped=zipped, seeds=seeds, mode=mode, launcher=dict(launcher),
                     description=str(data.get("description", "")))


def expand(spec: SweepSpec, extra_overrides: list[str] = ()) -> list[SweepPoint]:
    """Every point of the sweep with its resolved, validated recipe (no model is built)."""
    grid_choices = [list(zip(a.labels, a.values)) for a in spec.grid]
    zip_choices = [list(zip(*[list(zip(a.labels, a.values)) for a in spec.zipped]))] if spec.zipped else []
    seeds = [(f"seed{s}", s) for s in spec.seeds] if spec.seeds is not None else [None]
    points: dict[str, SweepPoint] = {}
    for combo in itertools.product(*grid_choices, *zip_choices, seeds):
        labels: dict[str, str] = {}
        overrides = list(spec.common)
        for axis, choice in zip(spec.grid, combo[:len(spec.grid)]):
            labels[axis.key] = choice[0]
            overrides.append(_override(axis.key, choice[1]))
        if spec.zipped:
            for i, (label, value) in enumerate(combo[len(spec.grid)]):
                if i == 0:
                    labels[spec.zipped[0].key] = label
                overrides.append(_override(spec.zipped[i].key, value))
        if combo[-1] is not None:
            labels["train.seed"] = combo[-1][0]
            overrides.append(f"train.seed={combo[-1][1]}")
        overrides.extend(extra_overrides)
        name = "-".join(labels.values()) or "default"
        if name in points:
            raise SweepError(f"{spec.path}: two points share the name '{name}'; label the axis values")
        try:
            recipe = load_recipe(spec.base, overrides)
        except RecipeError as e:
            raise SweepError(f"{spec.path}: point '{name}': {e}") from None
        points[name] = SweepPoint(name, overrides, recipe, labels)
    return list(points.values())
