"""Depth diagnostics of trained runs or timm models, offline: analysis.json and PNG plots.

    python tools/analyze.py --run runs/demo_digits --output runs/demo_digits/analysis
    python tools/analyze.py --run runs/demo_digits --checkpoint runs/demo_digits/checkpoints/best --model ema ...
    python tools/analyze.py --timm-model vit_small_patch16_224 --pretrained --output out/vit_s
    python tools/analyze.py --run runs/a --run runs/b --timm-model vit_tiny_patch16_224 --output out/compare
    python tools/analyze.py --run runs/demo_digits --pe-scale 0.5 --output out/pe_0.5

The same metrics as the training callback (diagnostics/suite.py), on one process. Probe set and
knobs: a run's own recipe (its eval split and `diagnostics:` section); for a timm model, --recipe,
else the embedded digits data resized to the model's input with the model's normalisation.
--recipe replaces, and --set / --data adjust, that recipe for every source (e.g.
--set diagnostics.probe_size=450 diagnostics.isi_pca_rank=64). For a timm model, --set model.KEY=V
is also passed to timm.create_model (e.g. model.img_size=32 model.depth=4). --pretrained uses
weights already in the local Hugging Face / torch hub cache; nothing is downloaded.
Several --run / --timm-model sources are overlaid in one figure per metric.

Writes <output>/analysis.json ({"records": [one diagnostics record per source, with "label",
"source" and "pe_scale"]}) and <output>/{phase_curves,isi,attention,neural_collapse,plasticity}.png.
--output must be a new or empty folder, or one this tool wrote before (it holds such an analysis.json),
and none of the runs, checkpoint, recipe or data given.
Exit codes: 0 done, 2 bad input (missing run dir or checkpoint, unknown model, bad recipe key).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ablations.outputs import check_output, read_json
from diagnostics.capture import scaled_position_embedding, stage_names
from diagnostics.records import build_record, json_value
from diagnostics.suite import DiagnosticsSetupError, check_config, load_probe, run_diagnostics
from models import load_model_file
from trainer.checkpoint import EMA_FILE, MODEL_FILE, is_complete, latest_checkpoint, read_manifest
from trainer.cli import exit_on_user_error
from trainer.data import build_probe_dataset
from trainer.host_memory import keep_freed_memory_for_reuse
from trainer.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict
from trainer.run_dir import RunDir

DEFAULT_TIMM_DATA = ["data.source=digits", "data.num_workers=0"]


class AnalyzeError(RecipeError):
    """Arguments that do not make sense together, or weights that are not available offline."""


@dataclass
class Source:
    label: str
    model: torch.nn.Module
    recipe: Any
    description: dict[str, Any]  # what was analysed: run dir, checkpoint, weights / timm name
    step: int | None = None
    epoch: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], metavar="DIR", help="a run directory (repeatable)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint dir or .safetensors file (one --run only)")
    p.add_argument("--model", choices=("raw", "ema"), default="raw", help="which weights of a run (default raw)")
    p.add_argument("--timm-model", action="append", default=[], metavar="NAME", help="a timm model (repeatable)")
    p.add_argument("--pretrained", action="store_true", help="timm models: cached pretrained weights")
    p.add_argument("--recipe", metavar="YAML", help="recipe of the probe set and diagnostics knobs")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="recipe overrides, e.g. diagnostics.probe_size=450")
    p.add_argument("--data", metavar="digits|synthetic|DIR", help="probe data: embedded digits, synthetic, or "
                   "an image folder root holding the eval split (data.eval_split, default val/)")
    p.add_argument("--pe-scale", type=float, metavar="ALPHA", help="evaluate with e_i + ALPHA * p_i (patch rows; "
                   "--set eval.pe_scale_rows=all scales the CLS row too)")
    p.add_argument("--output", required=True, metavar="DIR", help="where analysis.json and the PNGs go")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def data_overrides(data: str | None) -> list[str]:
    if data is None:
        return []
    if data in ("digits", "synthetic"):
        return [f"data.source={data}"]
    if not Path(data).is_dir():
        raise FileNotFoundError(2, "--data: image folder not found", data)
    return ["data.source=imagefolder", f"data.root={data}"]


def probe_recipe(base: Path | None, overrides: list[str], fallback: list[str] | None = None) -> Any:
    """--recipe (or the run's recipe.yaml, or the fallback overrides on the defaults) plus overrides."""
    if base is not None:
        return load_recipe(base, overrides)
    provenance: dict[str, str] = {}
    return recipe_from_dict(apply_overrides({}, [*(fallback or []), *overrides], provenance), provenance,
                            source="tools/analyze.py")


def checkpoint_weights(run: Path, checkpoint: str | None, which: str) -> tuple[Path, dict[str, Any]]:
    """(weights file, manifest or {}) of a run's checkpoint: --checkpoint, else `last` / the newest."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(2, "checkpoint not found", str(path))
        if path.is_file():
            return path, {}
    else:
        paths = RunDir(run)
        path = paths.last_checkpoint.resolve()
        if not is_complete(path):
            path = latest_checkpoint(paths.checkpoints)
        if path is None:
            raise FileNotFoundError(2, "no complete checkpoint in the run", str(paths.checkpoints))
    manifest = read_manifest(path.resolve())
    weights = path / (MODEL_FILE if which == "raw" else EMA_FILE)
    if not weights.is_file():
        raise AnalyzeError(f"{path} has no {weights.name} (the run had no EMA); use --model raw")
    return weights, manifest


def run_source(run: str, args: argparse.Namespace, overrides: list[str]) -> Source:
    root = Path(run)
    if not root.is_dir():
        raise FileNotFoundError(2, "run directory not found", str(root))
    saved_recipe = RunDir(root).recipe
    if args.recipe is None and not saved_recipe.is_file():
        raise FileNotFoundError(2, f"not a depthlab run directory (no {saved_recipe.name})", str(saved_recipe))
    recipe = probe_recipe(Path(args.recipe) if args.recipe else saved_recipe, overrides)
    weights, manifest = checkpoint_weights(root, args.checkpoint, args.model)
    model = load_model_file(weights, device=args.device)
    step = manifest.get("step")
    label = root.name + ("" if args.model == "raw" else " ema") + (f" step {step}" if args.checkpoint else "")
    description = {"run": str(root), "weights": str(weights), "model": args.model}
    return Source(label, model, recipe, description, step=step, epoch=manifest.get("epoch"))


def cached_pretrained_file(name: str) -> str:
    """The local file of a timm model's default pretrained weights; AnalyzeError when it is not cached."""
    import huggingface_hub
    import timm
    from timm.models._hub import hf_split

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise AnalyzeError(f"timm model {name!r} has no pretrained weights")
    if cfg.hf_hub_id:
        repo, revision = hf_split(cfg.hf_hub_id)
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):
                return found
    if cfg.url and not cfg.url.endswith(".npz"):
        found = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if found.is_file():
            return str(found)
    where = f"{cfg.hf_hub_id} in the Hugging Face cache" if cfg.hf_hub_id else f"{cfg.url} in the torch hub cache"
    raise AnalyzeError(f"--pretrained: the weights of timm model {name!r} ({where}) are not cached locally and "
                       "nothing is downloaded here; fetch them once with timm.create_model(name, pretrained=True) "
                       "where there is network, or drop --pretrained")


def timm_source(name: str, args: argparse.Namespace, overrides: list[str]) -> Source:
    from timm.data import resolve_model_data_config

    from models import create_vit

    base = Path(args.recipe) if args.recipe else None
    recipe = probe_recipe(base, overrides, fallback=DEFAULT_TIMM_DATA)
    explicit = {key.split("=", 1)[0].strip()[len("model."):] for key in overrides if key.startswith("model.")}
    kwargs = {key: getattr(recipe.model, key) for key in explicit
              if key not in ("name", "pretrained", "checkpoint", "kwargs")}
    kwargs.update(recipe.model.kwargs if "kwargs" in explicit else {})
    if args.pretrained:
        kwargs["pretrained_cfg_overlay"] = {"file": cached_pretrained_file(name), "source": ""}
    with torch.random.fork_rng(devices=[]):  # a random init is train.seed's, the same on every call
        torch.manual_seed(recipe.train.seed)
        model = create_vit(name, pretrained=args.pretrained, **kwargs).to(args.device).eval()
    data_config = resolve_model_data_config(model)
    model_cfg = replace(recipe.model, img_size=int(model.patch_embed.img_size[0]),
                        in_chans=int(model.patch_embed.proj.in_channels),
                        num_classes=int(model.num_classes) or recipe.model.num_classes)
    recipe = replace(recipe, model=model_cfg)
    if base is None:  # the model's own normalisation; the whole image (digits are centred)
        interpolation = data_config["interpolation"]
        recipe = replace(recipe, augment=replace(
            recipe.augment, mean=list(data_config["mean"]), std=list(data_config["std"]), crop_pct=1.0,
            eval_interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"))
    label = name + (" pretrained" if args.pretrained else " random init")
    return Source(label, model, recipe, {"timm_model": name, "pretrained": args.pretrained,
                                         "kwargs": {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}})


def analyse(source: Source, pe_scale: float | None) -> dict[str, Any]:
    """Run the recipe's diagnostics on one source and return its record."""
    cfg, model = source.recipe.diagnostics, source.model
    check_config(cfg, model)
    dataset = build_probe_dataset(source.recipe, cfg.probe_size, cfg.probe_seed)
    probe = load_probe(dataset, cfg, num_workers=source.recipe.data.num_workers)
    num_classes, top_label = int(model.num_classes), int(probe.labels.max())
    if "neural_collapse" in cfg.metrics and 0 < num_classes <= top_label:
        raise DiagnosticsSetupError(f"{source.label}: the model has {num_classes} classes but the probe labels go "
                                    f"up to {top_label}; drop neural_collapse from diagnostics.metrics")
    start = time.perf_counter()
    scaling = scaled_position_embedding(model, pe_scale, source.recipe.eval.pe_scale_rows) \
        if pe_scale is not None else contextlib.nullcontext()
    with scaling:
        results = run_diagnostics(model, probe, cfg, num_classes or source.recipe.model.num_classes,
                                  with_accuracy=num_classes == source.recipe.model.num_classes)
    record = build_record(results, stage_names(model), step=source.step or 0, epoch=source.epoch or 0.0,
                          model="ema" if source.description.get("model") == "ema" else "raw", trigger="offline",
                          probe_size=probe.size, num_processes=1, elapsed_s=time.perf_counter() - start)
    if source.step is None:
        record["step"] = record["epoch"] = None
    return {**record, "label": source.label, "source": json_value(source.description), "pe_scale": pe_scale}


TABLE_COLUMNS = (("S_c", "token_similarity", "centered"), ("S", "token_similarity", "raw"), ("ISI", "isi", "isi"),
                 ("CCC*T", "attention", "cls_centrality_ratio"), ("ACI", "attention", "consensus"),
                 ("NC1", "neural_collapse", "nc1"), ("plast.MHA", "plasticity", "MHA"))


def format_record(record: dict[str, Any]) -> str:
    """The console summary of one analysed source: a per-stage table and the detected phases."""
    head = [f"{record['probe_size']} probe images", f"{record['elapsed_s']:.1f} s"]
    if record.get("probe_top1") is not None:
        head.append(f"probe top1 {record['probe_top1']:.2f}")
    if record.get("pe_dominance") is not None:
        head.append(f"PE-Dom {record['pe_dominance']:.3f}")
    lines = [f"== {record['label']}: {', '.join(head)}"]
    columns = [(title, values) for title, metric, key in TABLE_COLUMNS
               if (values := (record.get(metric) or {}).get(key)) is not None]
    lines.append(f"{'stage':<10}" + "".join(f"{title:>11}" for title, _ in columns))
    for index, stage in enumerate(record["stages"]):
        cells = ["-" if values[index] is None else f"{values[index]:.4g}" for _, values in columns]
        lines.append(f"{stage:<10}" + "".join(f"{cell:>11}" for cell in cells))
    phases = record.get("phases")
    if phases:
        lines.append(f"phases: cliff_end {phases['cliff_end']} (size {phases['cliff_size']:.4f}), plateau "
                     f"{phases['plateau_start']}..{phases['plateau_end']} ({phases['plateau_length']} stages, "
                     f"tau {phases['tau']:.4f}), climb_start {phases['climb_start'] or 'none'}")
    return "\n".join(lines)


def is_analysis_folder(folder: Path) -> bool:
    """An --output folder this tool wrote: its analysis.json is {"records": [{"label": ..., "source": ...}, ...]}."""
    data = read_json(folder / "analysis.json")
    return isinstance(data, dict) and isinstance(data.get("records"), list) and \
        all(isinstance(r, dict) and "label" in r and "source" in r for r in data["records"])


def check_output_folder(args: argparse.Namespace) -> Path:
    """--output, unless it is an input, or exists and is not an analysis folder (ablations/outputs.py)."""
    data = args.data if args.data not in (None, "digits", "synthetic") else None
    inputs = [*args.run, *(p for p in (args.checkpoint, args.recipe, data) if p)]
    output = check_output(args.output, "--output", inputs=inputs, folder=True, own=is_analysis_folder,
                          own_what="a folder tools/analyze.py wrote (with its analysis.json)")
    # Inside its own folder only an input (or a folder in the way) stops the tool from writing.
    check_output(output / "analysis.json", "--output", inputs=inputs, own=lambda _: True)
    return output


def unique_labels(sources: list[Source], pe_scale: float | None) -> None:
    seen: dict[str, int] = {}
    for source in sources:
        if pe_scale is not None:
            source.label += f" pe_scale={pe_scale:g}"
        count = seen.get(source.label, 0)
        seen[source.label] = count + 1
        if count:
            source.label += f" ({count + 1})"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.run and not args.timm_model:
        raise AnalyzeError("nothing to analyse: give --run DIR and/or --timm-model NAME")
    if args.checkpoint and len(args.run) != 1:
        raise AnalyzeError(f"--checkpoint needs exactly one --run (got {len(args.run)})")
    if args.pretrained and not args.timm_model:
        raise AnalyzeError("--pretrained applies to --timm-model sources")
    output = check_output_folder(args)
    keep_freed_memory_for_reuse()
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    overrides = [*data_overrides(args.data), *args.overrides]
    sources = ([run_source(run, args, overrides) for run in args.run]
               + [timm_source(name, args, overrides) for name in args.timm_model])
    unique_labels(sources, args.pe_scale)
    records = []
    for source in sources:
        records.append(analyse(source, args.pe_scale))
        print(format_record(records[-1]), flush=True)
    output.mkdir(parents=True, exist_ok=True)
    written = [output / "analysis.json"]
    written[0].write_text(json.dumps({"records": records}, indent=1) + "\n")
    from diagnostics.plots import analysis_figures, save_figure

    for name, figure in analysis_figures([(record["label"], record) for record in records]).items():
        written.append(save_figure(figure, output / f"{name}.png"))
    print("wrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
