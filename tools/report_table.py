"""The report's tables: columns, presets, numbers formatted as papers quote them, markdown and CSV.

A cell aggregates a variant's seeds as mean ± sample std; the headline accuracy columns add the
count, DeiT style: `81.05 ± 0.11 (n=3)`; any other cell shows `(n=k)` only when fewer runs than
the variant has contributed a value. Missing values are shown as "–".
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablations.aggregate import Group, Stat

MISSING = "–"


def _si(value: float, units: tuple[tuple[float, str], ...]) -> str:
    for scale, suffix in units:
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def fmt_count(value: float) -> str:
    """86,567,656 -> 86.57M (parameters, MACs)."""
    return _si(value, ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")))


def _fixed(digits: int) -> Callable[[float], str]:
    def fmt(value: float) -> str:
        text = f"{value:.{digits}f}"
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0000"
    return fmt


def fmt_thousands(value: float) -> str:
    return f"{value:,.0f}"


def fmt_general(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() or abs(value) >= 0.01 else f"{value:.2e}"


def fmt_epoch(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


@dataclass(frozen=True)
class Column:
    key: str  # value key (ablations.aggregate.run_values), or "variant" / "seeds" / "sweep"
    header: str
    fmt: Callable[[float], str] | None = None  # None: text
    headline: bool = False  # always show the seed count
    spread: bool = True  # show ± std (False: cost columns, identical across seeds)


def _acc(key: str, header: str, headline: bool = False) -> Column:
    return Column(key, header, _fixed(2), headline=headline)


VARIANT = Column("variant", "variant")
SEEDS = Column("seeds", "runs")
COLUMNS = {c.key: c for c in [
    VARIANT, SEEDS, Column("sweep", "sweep"),
    Column("params", "params", fmt_count, spread=False),
    Column("trainable_params", "trainable params", fmt_count, spread=False),
    Column("mlp_params", "MLP params", fmt_count, spread=False),
    Column("unique_mlps", "unique MLPs", fmt_general, spread=False),
    Column("macs_linear", "MACs", fmt_count, spread=False),
    Column("train_throughput_img_s", "train img/s", fmt_thousands),
    _acc("top1_final", "top-1", headline=True), _acc("top1_best", "top-1 best"),
    Column("best_epoch", "best epoch", fmt_epoch), _acc("top5_final", "top-5"), _acc("top5_best", "top-5 best"),
    _acc("peak_to_final", "peak→final"),
    _acc("val_top1_best", "val top-1 best"), _acc("top1_at_best_val", "top-1 at best val", headline=True),
    _acc("ema_top1_final", "EMA top-1", headline=True), _acc("ema_top1_best", "EMA top-1 best"),
    Column("ema_best_epoch", "EMA best epoch", fmt_epoch), _acc("ema_top5_final", "EMA top-5"),
    _acc("ema_peak_to_final", "EMA peak→final"),
    Column("cliff_end", "cliff_end"), Column("cliff_size", "Cliff size", _fixed(4)),
    Column("plateau_length", "plateau_length", fmt_epoch), Column("climb_start", "climb_start"),
    Column("isi_last", "ISI (last block)", _fixed(4)), Column("isi_max", "ISI max", _fixed(4)),
    Column("cls_centrality_last", "CLS centrality (last block)", _fixed(4)),
    Column("pe_scale", "α (pe_scale)", fmt_general, spread=False),
    Column("pe_dominance", "PE-Dom", _fixed(3)),
]}

PRESETS = {
    "full": ["variant", "seeds", "params", "trainable_params", "macs_linear", "train_throughput_img_s", "top1_final", "top1_best",
             "best_epoch", "top5_final", "top5_best", "peak_to_final", "ema_top1_final", "ema_top1_best",
             "ema_best_epoch", "ema_peak_to_final", "cliff_end", "plateau_length", "climb_start", "isi_last",
             "isi_max", "cls_centrality_last"],
    # P2's architecture/accuracy table (science.md §5); P2 quotes the EMA model.
    "p2": ["variant", "seeds", "params", "mlp_params", "unique_mlps", "macs_linear", "train_throughput_img_s",
           "ema_top1_final", "ema_peak_to_final", "top1_final", "peak_to_final"],
    # P1's comparisons across depth and scale: accuracy next to the phase and hub diagnostics.
    "p1": ["variant", "seeds", "params", "ema_top1_final", "top1_final", "cliff_end", "cliff_size",
           "plateau_length", "climb_start", "isi_last", "isi_max", "cls_centrality_last"],
    # P3's component finetuning: the test top-1 at the best validation checkpoint, best LR by validation
    "p3": ["variant", "seeds", "trainable_params", "val_top1_best", "top1_at_best_val", "top1_final"],
    "evaluate": ["variant", "pe_scale", "top1_final", "top5_final", "cliff_size", "cliff_end", "pe_dominance",
                 "isi_max", "cls_centrality_last"],
}
OPTIONAL_WHEN_EMPTY = {"trainable_params", "ema_top1_final", "ema_top1_best", "ema_best_epoch", "ema_top5_final", "ema_peak_to_final",
                       "mlp_params", "unique_mlps", "train_throughput_img_s"}


def format_stat(stat: Stat | None, column: Column, group_size: int) -> str:
    if stat is None or stat.mean is None:
        return MISSING
    if column.fmt is None or isinstance(stat.mean, str):
        return str(stat.mean)
    text = column.fmt(stat.mean)
    if column.spread and stat.std is not None:
        text += f" ± {column.fmt(stat.std)}"
    if (column.headline and stat.n > 1) or stat.n < group_size:
        text += f" (n={stat.n})"
    return text


@dataclass
class Table:
    columns: list[Column]
    rows: list[list[str]]

    def markdown(self) -> str:
        header = "| " + " | ".join(c.header for c in self.columns) + " |"
        align = "|" + "|".join("---" if c.fmt is None else "---:" for c in self.columns) + "|"
        return "\n".join([header, align, *("| " + " | ".join(row) + " |" for row in self.rows)])


def build_table(groups: list[Group], values: list[dict[str, Stat]], preset: str) -> Table:
    keys = list(PRESETS[preset])
    if len({g.sweep for g in groups}) > 1:
        keys.insert(1, "sweep")
    keys = [k for k in keys if k not in OPTIONAL_WHEN_EMPTY
            or any(v.get(k) is not None and v[k].mean is not None for v in values)]
    columns = [COLUMNS[k] for k in keys]
    rows = []
    for group, stats in zip(groups, values):
        row = []
        for column in columns:
            if column.key == "variant":
                row.append(group.name)
            elif column.key == "seeds":
                row.append(str(len(group.runs)))
            elif column.key == "sweep":
                row.append(group.sweep or MISSING)
            else:
                row.append(format_stat(stats.get(column.key), column, len(group.runs)))
        rows.append(row)
    return Table(columns, rows)


def write_group_csv(path: Path, groups: list[Group], values: list[dict[str, Stat]]) -> None:
    """One row per variant: `<key>`, `<key>_std`, `<key>_n` for every value (every table column, also when
    no run has it, and whatever else the runs have), unrounded."""
    known = [k for k in COLUMNS if k not in ("variant", "seeds", "sweep")]
    keys = list(dict.fromkeys([*known, *(k for v in values for k in v)]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "sweep", "mode", "runs", *[f"{k}{s}" for k in keys for s in ("", "_std", "_n")]])
        for group, stats in zip(groups, values):
            cells: list[Any] = [group.name, group.sweep or "", group.mode, len(group.runs)]
            for key in keys:
                stat = stats.get(key)
                cells += ["", "", 0] if stat is None else [_csv(stat.mean), _csv(stat.std), stat.n]
            writer.writerow(cells)


def write_run_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv(row.get(k)) for k in keys})


def _csv(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value
