"""The report's own figures, next to those of diagnostics/plots.py (phase curves, ISI curves, the
stage × step heatmap), built the same way (matplotlib Figures without pyplot, one colour per
series):

- accuracy curves: top-1 over epochs from metrics.jsonl (EMA dashed), one colour per variant;
- phase emergence: the heatmap of S_c over stage × step with each record's cliff end (x),
  plateau (bar) and climb start (triangle) marked;
- the PE-scale curve: top-1 and Cliff size against α.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from diagnostics.plots import new_figure, stage_step_heatmap
from diagnostics.records import phase_indices


@dataclass
class AccuracyCurve:
    label: str  # variant; the legend shows each label once
    epochs: list[float]
    top1: list[float]
    top1_ema: list[float] | None
    color: int  # variant index


def _legend_once(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")


def accuracy_figure(curves: Sequence[AccuracyCurve]) -> Figure:
    """Top-1 over epochs of every run (EMA dashed); seeds of a variant share its colour."""
    figure, (ax,) = new_figure(1, width=7.0, height=4.0)
    for curve in curves:
        ax.plot(curve.epochs, curve.top1, color=f"C{curve.color % 10}", linewidth=1.2, label=curve.label)
        if curve.top1_ema:
            ax.plot(curve.epochs, curve.top1_ema, color=f"C{curve.color % 10}", linewidth=1.0, linestyle="--")
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, not 2.5
    ax.set_ylabel("top-1 (%), EMA dashed", fontsize=8)
    ax.set_title("evaluation accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_once(ax)
    return figure


def phase_emergence_figure(records: Sequence[Mapping[str, Any]], title: str) -> Figure | None:
    """diagnostics.plots.stage_step_heatmap of S_c (embed at the bottom) with each record's phases."""
    records = [r for r in records if (r.get("token_similarity") or {}).get("centered") is not None]
    figure = stage_step_heatmap(records, "token_similarity", "centered", title)
    if figure is None:
        return None
    ax = figure.axes[0]
    stages = list(records[-1]["stages"])
    for column, record in enumerate(records):  # rows are the last record's stages, as in the heatmap
        marks = {name: (None if index is None else stages.index(record["stages"][index])
                        if record["stages"][index] in stages else None)
                 for name, index in phase_indices(record).items()}
        if marks["plateau_start"] is not None and marks["plateau_end"] is not None:
            ax.plot([column, column], [marks["plateau_start"], marks["plateau_end"]], color="white", linewidth=3,
                    alpha=0.8, label="plateau")
        if marks["cliff_end"] is not None:
            ax.plot(column, marks["cliff_end"], "x", color="red", markersize=7, label="cliff end")
        if marks["climb_start"] is not None:
            ax.plot(column, marks["climb_start"], "^", color="gold", markeredgecolor="black", markersize=7,
                    label="climb start")
    _legend_once(ax)
    return figure


def pe_scale_figure(alphas: Sequence[float], top1: Sequence[float | None],
                    cliff_size: Sequence[float | None]) -> Figure:
    """Top-1 and Cliff size against the position-embedding scale α (science.md §1)."""
    figure, (ax,) = new_figure(1, width=6.0, height=4.0)
    figure.subplots_adjust(right=0.85)
    ax.plot(alphas, [float("nan") if v is None else v for v in top1], marker="o", color="C0")
    ax.set_xlabel("α (eval.pe_scale)", fontsize=8)
    ax.set_ylabel("top-1 (%)", color="C0", fontsize=8)
    twin = ax.twinx()
    twin.plot(alphas, [float("nan") if v is None else v for v in cliff_size], marker="s", color="C1")
    twin.set_ylabel("Cliff size S_c(embed) − S_c(cliff_end)", color="C1", fontsize=8)
    ax.set_title("evaluation with e + α·p", fontsize=10)
    ax.grid(alpha=0.3)
    return figure
