"""Load, merge, override, validate and save recipes.

A recipe is a YAML file whose keys are the sections of `trainer.recipe_schema.Recipe`.
`base: other.yaml` (relative to the recipe's folder) inherits another recipe; nested mappings
deep-merge, lists and scalars replace. `--set section.key=value` overrides are parsed as YAML.
Everything is validated against the schema before any model is built; every problem raises
`RecipeError` with one line that names the file, the key, the value and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from models.errors import UserError
from trainer.recipe_schema import Recipe

BASE_KEY = "base"


class RecipeError(UserError):
    """A recipe that cannot be used: unknown key, wrong type, out of range, missing file."""


class _RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 requires a dot, which surprises everyone)."""


_RecipeYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeYamlLoader)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_RecipeYamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, over: Mapping, provenance: dict, source: str, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in over.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value, provenance, source, prefix=f"{path}.")
        else:
            out[key] = copy.deepcopy(value)
            provenance[path] = source
            if isinstance(value, Mapping):
                for sub in value:
                    provenance[f"{path}.{sub}"] = source
    return out


def _resolve_file(path: Path, provenance: dict, chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve() if path.exists() else path
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"recipe inheritance cycle: {cycle}")
    data = _read_yaml(path)
    base = data.pop(BASE_KEY, None)
    merged: dict = {}
    if base is not None:
        if not isinstance(base, str):
            raise RecipeError(f"{path}: 'base' must be a path string, got {base!r}")
        base_path = (path.parent / base)
        if not base_path.exists():
            raise RecipeError(f"{path}: base recipe not found: {base_path}")
        merged = _resolve_file(base_path, provenance, (*chain, path))
    return _deep_merge(merged, data, provenance, str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=5e-4` -> (['optim', 'lr'], 0.0005)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected section.key=value (e.g. optim.lr=5e-4)")
    try:
        parsed = parse_yaml_value(value)
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: dict, overrides: Iterable[str], provenance: dict) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        source = f"--set {text}"
        _check_key_path(keys, source)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise RecipeError(f"{source}: '{key}' is not a section")
        node[keys[-1]] = value
        provenance[".".join(keys)] = source
    return data


def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Recipe)}  # type: ignore[misc]


def did_you_mean(key: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _unknown_top_level(key: str) -> str:
    sections = _section_types()
    hint = did_you_mean(key, sections)
    if not hint:
        owners = [s for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if owners:
            hint = f" (did you mean '{owners[0]}.{key}'?)"
    return f"unknown section '{key}'{hint}; sections are: {', '.join(sections)}"


def _check_key_path(keys: list[str], source: str) -> None:
    sections = _section_types()
    if keys[0] not in sections:
        raise RecipeError(f"{source}: {_unknown_top_level(keys[0])}")
    if len(keys) == 1:
        return
    names = [f.name for f in dataclasses.fields(sections[keys[0]])]
    if keys[1] not in names:
        raise RecipeError(f"{source}: unknown key '{keys[1]}' in section '{keys[0]}'{did_you_mean(keys[1], names)}")
    if len(keys) > 2 and keys[1] != "kwargs":
        raise RecipeError(f"{source}: '{keys[0]}.{keys[1]}' is not a section")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_describe(item)}"
    if origin is dict:
        return "a mapping"
    if hint is Any:
        return "anything"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _is_choice(hint: Any) -> bool:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return any(_is_choice(arg) for arg in typing.get_args(hint))
    return typing.get_origin(hint) is Literal


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to the hinted type)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        if value is False and "no" in typing.get_args(hint):  # YAML reads `precision: no` as false
            return True, "no"
        return value in typing.get_args(hint) and isinstance(value, str | bool | int), value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        (item_hint,) = typing.get_args(hint)
        out = []
        for item in value:
            ok, converted = _coerce(item, item_hint)
            if not ok:
                return False, value
            out.append(converted)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"unsupported schema type {hint!r}")


def _check_range(value: Any, meta: Mapping, where: str) -> None:
    if value is None:
        return
    if meta.get("choices") is not None:
        bad = [v for v in value if v not in meta["choices"]]
        if bad:
            raise RecipeError(f"{where}: unknown item {bad[0]!r}; expected items from {', '.join(meta['choices'])}")
    if isinstance(value, list):
        for item in value:
            _check_range(item, {**meta, "choices": None}, f"{where} item")
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        op = ">" if meta.get("min_exclusive") else ">="
        bound = f"{op} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise RecipeError(f"{where} = {value!r} is out of range: expected {bound}")
    if hi is not None and value > hi:
        raise RecipeError(f"{where} = {value!r} is out of range: expected <= {hi}")


def _build_section(name: str, cls: type, data: Any, provenance: Mapping) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        source = provenance.get(name, "recipe")
        raise RecipeError(f"{source}: section '{name}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{name}.{key}"
        source = provenance.get(path, provenance.get(name, "recipe"))
        if key not in fields:
            raise RecipeError(f"{source}: unknown key '{key}' in section '{name}'{did_you_mean(key, fields)}")
        ok, converted = _coerce(value, hints[key])
        if not ok:
            problem = "is not a valid choice" if _is_choice(hints[key]) else "has the wrong type"
            # YAML 1.1 reads off/on/no/yes as booleans: `precision: no` arrives as False
            hint = (" (YAML reads on/off/yes/no as booleans: quote the word)"
                    if isinstance(value, bool) and _is_choice(hints[key]) else "")
            raise RecipeError(f"{source}: {path} = {value!r} {problem}: expected {_describe(hints[key])}{hint}")
        _check_range(converted, fields[key].metadata, f"{source}: {path}")
        kwargs[key] = converted
    return cls(**kwargs)


def _check_consistency(recipe: Recipe, source: str) -> None:
    def fail(msg: str) -> None:
        raise RecipeError(f"{source}: {msg}")

    a = recipe.augment
    for key in ("scale", "ratio"):
        pair = getattr(a, key)
        if len(pair) != 2 or pair[0] > pair[1] or pair[0] <= 0:
            fail(f"augment.{key} = {pair} must be [low, high] with 0 < low <= high")
    if len(a.mean) != len(a.std) or any(s <= 0 for s in a.std):
        fail(f"augment.mean {a.mean} and augment.std {a.std} must have equal length and positive std")
    betas = recipe.optim.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        fail(f"optim.betas = {betas} must be two numbers in [0, 1)")
    if recipe.variant.kind == "truncated" and recipe.variant.keep_depth is None:
        fail("variant.kind = 'truncated' needs variant.keep_depth (the number of blocks to keep)")
    metrics = recipe.diagnostics.metrics
    if len(set(metrics)) != len(metrics):
        fail(f"diagnostics.metrics = {metrics} lists a metric twice")


def recipe_from_dict(data: Mapping, provenance: Mapping | None = None, source: str = "recipe") -> Recipe:
    provenance = dict(provenance or {})
    sections = _section_types()
    for key in data:
        if key not in sections:
            raise RecipeError(f"{provenance.get(key, source)}: {_unknown_top_level(key)}")
    built = {name: _build_section(name, cls, data.get(name), provenance) for name, cls in sections.items()}
    recipe = Recipe(**built)
    _check_consistency(recipe, source)
    return recipe


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Resolve `base:` inheritance, apply `--set` overrides, validate, return the typed recipe."""
    path = Path(path)
    provenance: dict[str, str] = {}
    data = _resolve_file(path, provenance)
    data = apply_overrides(data, overrides, provenance)
    return recipe_from_dict(data, provenance, source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


class _RecipeDumper(yaml.SafeDumper):
    """Sections and keys in block style, short lists inline: `betas: [0.9, 0.999]`."""


_RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    body = yaml.dump(recipe_to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False,
                     width=100)
    return "\n".join(lines) + ("\n" if lines else "") + body


def save_recipe(recipe: Recipe, path: str | Path, header: str = "") -> None:
    Path(path).write_text(dump_recipe(recipe, header))


def flatten_recipe(recipe: Recipe) -> dict[str, Any]:
    """{'optim.lr': 0.001, ...} with lists and dicts as strings (TensorBoard hparams, sweep tables)."""
    flat = {}
    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
