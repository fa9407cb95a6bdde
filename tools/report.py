"""Tables and plots over runs and sweeps.

    python tools/report.py runs/sweeps/demo_mlp_reduction                 # any run or sweep dirs
    python tools/report.py runs/sweeps/mlp_reduction --table p2           # P2's architecture/accuracy table
    python tools/report.py runs/sweeps/depth runs/sweeps/scale --table p1 --out reports/p1   # P1
    python tools/report.py runs/sweeps/finetune_components --best-of optim.lr --table p3   # P3

Runs that differ only in train.seed form one variant: its numbers are mean ± sample std over
the seeds with the count, e.g. `81.05 ± 0.11 (n=3)`. Diagnostics come from each run's last
diagnostics.jsonl record ("–" where a metric was not measured). `mode: evaluate` sweeps (PE
scale) get their own table: α, top-1, Cliff size.

Writes into --out (default: <the one path given>/report):
    report.md      the tables (also printed) and the figures
    report.csv     one row per variant: every number's mean, std and count, unrounded
    runs.csv       one row per run
    plots/         phase_curves.png and isi_curves.png (final records of all runs overlaid, from
                   diagnostics/plots.py), accuracy_curves.png (metrics.jsonl), phase_emergence/<run>.png
                   (stage x step heatmap of S_c with the phases marked), pe_scale.png and
                   pe_scale_phase_curves.png (evaluate sweeps)
    tb_hparams/    TensorBoard HPARAMS view: tensorboard --logdir <out>/tb_hparams
--out must be a new or empty folder, or a report folder written before (its report.md says so),
and not one of the paths given (nor hold one in plots/ or tb_hparams/, which are rewritten).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # `python tools/report.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.aggregate import (
    Group,
    ReportError,
    Run,
    Stat,
    eval_history,
    find_runs,
    group_runs,
    group_values,
    run_values,
    select_best,
)
from ablations.outputs import check_output, read_head
from diagnostics.plots import isi_figure, phase_curve_figure, save_figure
from diagnostics.records import final_record, read_diagnostics
from tools.report_plots import AccuracyCurve, accuracy_figure, pe_scale_figure, phase_emergence_figure
from tools.report_table import build_table, write_group_csv, write_run_csv
from trainer.cli import exit_on_user_error

EVAL_NOTES = ("top-1 on the eval split with patch embedding + α · position embedding; Cliff size = "
              "S_c(embed) − S_c(cliff_end) on the diagnostics probe set at that α; PE-Dom = mean ‖α p_i‖ / "
              "mean ‖e_i‖; mean ± sample std over seeds where a variant has several runs.")
NOTES = ("mean ± sample std over the runs of a variant (runs that differ only in train.seed); MACs: linear "
         "layers + patch embedding per image (P2's count); peak→final = best − final top-1 over the "
         "evaluations; diagnostics: the last diagnostics.jsonl record ({model} weights); – = not measured.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--out", help="output folder (default: <path>/report when one path is given)")
    p.add_argument("--table", choices=("full", "p1", "p2", "p3"), default="full", help="columns of the training table")
    p.add_argument("--best-of", metavar="KEY", help="keep, per variant, the value of KEY with the best mean "
                                                    "top-1 (P3: --best-of optim.lr)")
    p.add_argument("--diagnostics-model", choices=("raw", "ema"), default="raw",
                   help="which weights' diagnostics records the table shows")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true", help="skip the tb_hparams/ view")
    return p.parse_args(argv)


def add_architecture(groups: list[Group], values: list[dict[str, Stat]]) -> None:
    """MLP parameters and unique MLPs (P2's columns), counted on a meta-device copy of each variant."""
    from models import create_vit_from_recipe, profile_model

    for group, stats in zip(groups, values):
        recipe = group.runs[0].recipe
        if recipe is None:
            continue
        recipe = replace(recipe, model=replace(recipe.model, pretrained=False, checkpoint=None))
        profile = profile_model(create_vit_from_recipe(recipe, device="meta", pretrained=False))
        stats["mlp_params"] = Stat(float(profile.mlp_params), None, len(group.runs))
        stats["unique_mlps"] = Stat(float(profile.unique_mlps), None, len(group.runs))


def add_trainable(groups: list[Group], values: list[dict[str, Stat]]) -> None:
    """Parameters `optim.trainable` leaves trainable (component finetuning), counted on a meta-device copy."""
    from models import create_vit_from_recipe
    from trainer.optim import apply_trainable_patterns

    if not any(g.runs[0].recipe is not None and g.runs[0].recipe.optim.trainable for g in groups):
        return  # nothing is frozen anywhere: the column would repeat `params`
    for group, stats in zip(groups, values):
        recipe = group.runs[0].recipe
        if recipe is None:
            continue
        recipe = replace(recipe, model=replace(recipe.model, pretrained=False, checkpoint=None))
        model = create_vit_from_recipe(recipe, device="meta", pretrained=False)
        apply_trainable_patterns(model, recipe.optim.trainable)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)  # shared tensors once
        stats["trainable_params"] = Stat(float(count), None, len(group.runs))


# --- figures -------------------------------------------------------------------------------------

def _final_records(groups: list[Group], model: str) -> list[tuple[str, dict]]:
    series = []
    for group in groups:
        for run in group.runs:
            record = final_record(run.path, model=model)
            if record is not None:
                series.append((run.name, record))
    return series


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+=" else "_" for c in name)


def write_plots(train: list[Group], evaluate: list[Group], eval_values: list[dict[str, Stat]], out: Path,
                model: str) -> list[Path]:
    """The report's PNGs (see the module docstring); returns the files written."""
    plots = out / "plots"
    shutil.rmtree(plots, ignore_errors=True)
    figures = {}
    series = _final_records(train, model)
    if any("token_similarity" in record for _, record in series):
        figures["phase_curves"] = phase_curve_figure(series)
    if any("isi" in record for _, record in series):
        figures["isi_curves"] = isi_figure(series)
    accuracy = []
    for color, group in enumerate(train):
        for run in group.runs:
            history = eval_history(run.path)
            if history:
                ema = [e.get("top1_ema") for e in history]
                accuracy.append(AccuracyCurve(group.name, [e["epoch"] for e in history], [e["top1"] for e in history],
                                              ema if all(v is not None for v in ema) else None, color))
    if accuracy:
        figures["accuracy_curves"] = accuracy_figure(accuracy)
    for group in train:
        for run in group.runs:
            records = sorted((r for r in read_diagnostics(run.path) if r.get("model") == model),
                             key=lambda r: r["step"])
            figure = phase_emergence_figure(records, f"phase emergence (S_c): {run.name}")
            if figure is not None:
                figures[f"phase_emergence/{_safe_name(run.name)}"] = figure
    if evaluate:
        series = [(f"α={records[-1].get('pe_scale', '?')}", records[-1]) for group in evaluate for run in group.runs
                  if (records := read_diagnostics(run.path))]
        if series:
            figures["pe_scale_phase_curves"] = phase_curve_figure(series)
        scaled = sorted((stats["pe_scale"].mean, stats) for stats in eval_values
                        if isinstance(stats.get("pe_scale", Stat(None)).mean, float))
        if scaled:
            figures["pe_scale"] = pe_scale_figure([a for a, _ in scaled],
                                                  [s.get("top1_final", Stat(None)).mean for _, s in scaled],
                                                  [s.get("cliff_size", Stat(None)).mean for _, s in scaled])
    return [save_figure(figure, plots / f"{name}.png") for name, figure in figures.items()]


# --- TensorBoard hparams -------------------------------------------------------------------------

def write_hparams(groups: list[Group], out: Path, model: str) -> Path:
    """One hparams run per run dir: the recipe keys that vary across the runs, the variant, the seed."""
    from torch.utils.tensorboard import SummaryWriter

    folder = out / "tb_hparams"
    shutil.rmtree(folder, ignore_errors=True)
    runs = [run for group in groups for run in group.runs]
    varying = sorted(k for k in {k for r in runs for k in r.flat}
                     if len({repr(r.flat.get(k)) for r in runs}) > 1 and k != "train.output_dir")
    with SummaryWriter(log_dir=str(folder)) as writer:
        for group in groups:
            for run in group.runs:
                hparams = {"variant": group.name, **{k: _hparam(run.flat.get(k)) for k in varying}}
                metrics = {f"hparam/{k}": float(v) for k, v in run_values(run, model).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                if metrics:
                    writer.add_hparams(hparams, metrics, run_name=_safe_name(run.name))
    return folder


def _hparam(value: object) -> bool | int | float | str:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


# --- the report ----------------------------------------------------------------------------------

def _unfinished(groups: list[Group]) -> list[str]:
    return [f"{run.name} ({run.status})" for g in groups for run in g.runs if run.status != "finished"]


def section(title: str, groups: list[Group], values: list[dict[str, Stat]], preset: str, notes: str) -> str:
    lines = [f"## {title}", "", build_table(groups, values, preset).markdown(), "", notes]
    unfinished = _unfinished(groups)
    if unfinished:
        lines.append(f"Not finished (numbers so far): {', '.join(unfinished)}.")
    return "\n".join(lines)


def build_report(args: argparse.Namespace, runs: list[Run], command: str
                 ) -> tuple[str, list[Group], list[Group], list, list]:
    groups = group_runs(runs)
    if args.best_of:
        groups = select_best(groups, args.best_of, diagnostics_model=args.diagnostics_model)
    train = [g for g in groups if g.mode == "train"]
    evaluate = sorted((g for g in groups if g.mode == "evaluate"),
                      key=lambda g: (g.sweep or "", g.runs[0].flat.get("eval.pe_scale", 0.0)))
    train_values = [group_values(g, args.diagnostics_model) for g in train]
    eval_values = [group_values(g, "raw") for g in evaluate]
    if args.table == "p2" and train:
        add_architecture(train, train_values)
    add_trainable(train, train_values)
    sweeps = sorted({r.sweep for r in runs if r.sweep})
    title = ", ".join(sweeps) if sweeps else ", ".join(str(p) for p in args.paths)
    parts = [f"# Report: {title}", "",
             f"{len(runs)} runs in {len(groups)} variants. Regenerate with: `{command}`"]
    if train:
        parts += ["", section("Training runs", train, train_values, args.table,
                                  NOTES.format(model=args.diagnostics_model))]
    if evaluate:
        parts += ["", section("Evaluation runs (mode: evaluate)", evaluate, eval_values, "evaluate", EVAL_NOTES)]
    return "\n".join(parts) + "\n", train, evaluate, train_values, eval_values


def is_report_folder(folder: Path) -> bool:
    """A folder this tool wrote: its report.md starts with the title and the command that regenerates it."""
    head = read_head(folder / "report.md", 2**20)
    return head.startswith("# Report: ") and "Regenerate with: `python tools/report.py " in head


def check_out_folder(args: argparse.Namespace, out: Path) -> None:
    """--out and what is written in it may be written (ablations/outputs.py), before anything is computed."""
    check_output(out, "--out", inputs=args.paths, folder=True, own=is_report_folder,
                 own_what="a folder tools/report.py wrote (with its report.md)")
    # Inside its own folder only an input (or a file or folder in the way) stops the report.
    for name in ("report.md", "report.csv", "runs.csv"):
        check_output(out / name, "--out", inputs=args.paths, own=lambda _: True)
    for name, written in (("plots", not args.no_plots), ("tb_hparams", not args.no_tensorboard)):
        if written:
            check_output(out / name, "--out", inputs=args.paths, folder=True, own=lambda _: True, replaces=True)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None and len(args.paths) > 1:
        raise ReportError("several paths given: choose the output folder with --out")
    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    check_out_folder(args, out)
    runs = find_runs(args.paths)
    command = "python tools/report.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    markdown, train, evaluate, train_values, eval_values = build_report(args, runs, command)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        plots = write_plots(train, evaluate, eval_values, out, args.diagnostics_model)
        if plots:
            markdown += "\n## Figures\n\n" + "\n".join(
                f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots) + "\n"
    (out / "report.md").write_text(markdown)
    write_group_csv(out / "report.csv", train + evaluate, train_values + eval_values)
    write_run_csv(out / "runs.csv", [{"run": r.name, "variant": g.name, "seed": r.seed, "path": str(r.path),
                                      **run_values(r, args.diagnostics_model)}
                                     for g in train + evaluate for r in g.runs])
    if not args.no_tensorboard:
        write_hparams(train + evaluate, out, args.diagnostics_model)
    print(markdown)
    print(f"report written to {out}: report.md, report.csv, runs.csv"
          + ("" if args.no_plots else ", plots/") + ("" if args.no_tensorboard else ", tb_hparams/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
