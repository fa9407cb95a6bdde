"""Figures of diagnostics records (matplotlib), for tools/analyze.py and tools/report.py.

Every curve figure takes `series`, a list of (label, record) pairs in the diagnostics.jsonl
layout (diagnostics/records.py), and overlays them: one colour per record, one legend below the
panels. The x axis is the stage (embed, pe, block_1, ..., norm) when every record has the same
depth, and relative depth (0 = embed, 1 = norm) when they differ, so that models of different depth
line up end to end. Figures are `matplotlib.figure.Figure` objects built
without pyplot (no global state, any backend); `figure_to_rgb` renders one for TensorBoard and
`save_figure` writes a PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from diagnostics.raster import heatmap_values, stage_values
from diagnostics.records import phase_indices, quantity
from diagnostics.registry import METRICS

Series = Sequence[tuple[str, Mapping[str, Any]]]
MAX_STAGE_TICKS = 16
MAX_STEP_TICKS = 8


def new_figure(panels: int = 1, *, width: float = 6.4, height: float = 3.6, dpi: int = 100,
               columns: int | None = None) -> tuple[Figure, list[Any]]:
    """A figure with `panels` axes in a grid (at most 2 columns by default); fixed margins (cheap to draw)."""
    columns = columns or min(panels, 2)
    rows = -(-panels // columns)
    figure = Figure(figsize=(width * columns, height * rows), dpi=dpi)
    figure.subplots_adjust(left=0.1 / columns ** 0.5, right=0.97, bottom=0.2 / rows ** 0.5, top=0.9,
                           wspace=0.25, hspace=0.5)
    axes = [figure.add_subplot(rows, columns, index + 1) for index in range(panels)]
    return figure, axes


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a figure."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def relative_depth(series: Series) -> bool:
    """Whether the x axis is relative depth (0 = embed, 1 = norm): when the records' models differ in depth,
    so that their phases line up; otherwise stage positions, labelled with the stage names."""
    return len({len(record["stages"]) for _, record in series}) > 1


def positions(record: Mapping[str, Any], relative: bool) -> np.ndarray:
    count = len(record["stages"])
    return np.arange(count) / max(count - 1, 1) if relative else np.arange(count, dtype=float)


def _stage_axis(ax: Any, series: Series) -> None:
    if relative_depth(series):
        ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0], ["embed", "0.25", "0.5", "0.75", "norm"], fontsize=8)
        ax.set_xlabel("relative depth (0 = embed, 1 = norm)", fontsize=8)
    else:
        stages = series[0][1]["stages"]
        step = -(-len(stages) // MAX_STAGE_TICKS)
        ticks = list(range(0, len(stages), step))
        ax.set_xticks(ticks, [stages[i] for i in ticks], rotation=45, ha="right", fontsize=8)
    ax.grid(alpha=0.3)


def _curve_panel(ax: Any, series: Series, metric: str, key: str, title: str, log: bool = False) -> bool:
    """One quantity of every record on `ax`; False when no record has it."""
    drawn, relative = False, relative_depth(series)
    for index, (label, record) in enumerate(series):
        values = stage_values(record, metric, key, positive=log)
        if values is None or np.isnan(values).all():
            continue
        ax.plot(positions(record, relative), values, marker="o", markersize=3, color=f"C{index}", label=label)
        drawn = True
    ax.set_title(title, fontsize=10)
    if log and drawn:
        ax.set_yscale("log")
    _stage_axis(ax, series)
    return drawn


def _legend(figure: Figure, axes: list[Any], series: Series, extra: Sequence[Any] = ()) -> None:
    """One legend for the figure, below its panels (never over a title or a curve)."""
    handles, labels = axes[0].get_legend_handles_labels()
    handles, labels = [*handles, *extra], [*labels, *(artist.get_label() for artist in extra)]
    if not handles or (len(series) == 1 and not series[0][0] and not extra):
        return
    columns = min(len(handles), 4)
    rows = -(-len(handles) // columns)
    inches = figure.get_figheight()
    figure.subplots_adjust(bottom=figure.subplotpars.bottom + (0.1 + 0.18 * rows) / inches)
    figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.01), fontsize=8, ncols=columns,
                  frameon=False)


def _mark_phases(ax: Any, series: Series) -> list[Any]:
    """Each record's plateau as a bar of its colour in its own row along the bottom (bands of several runs
    never stack), its cliff end (▼) and climb start (▲) on its curve; the legend's phase entries."""
    relative = relative_depth(series)
    low, high = ax.get_ylim()
    row_height = 0.07 * (high - low)
    ticks = [tick for tick in ax.get_yticks() if low <= tick <= high]  # no value ticks beside the strip
    ax.set_ylim(low - row_height * (len(series) + 0.5), high)  # a strip below the curves, a row per run
    ax.set_yticks(ticks)
    for index, (_, record) in enumerate(series):
        marks, x = phase_indices(record), positions(record, relative)
        values = stage_values(record, "token_similarity", "centered")
        color = f"C{index}"
        if marks["plateau_start"] is not None and marks["plateau_end"] is not None:
            row = low - row_height * (index + 0.75)
            ax.plot([x[marks["plateau_start"]], x[marks["plateau_end"]]], [row, row], color=color, linewidth=4,
                    solid_capstyle="butt", alpha=0.85)
        for name, marker in (("cliff_end", "v"), ("climb_start", "^")):
            if marks[name] is not None and values is not None:
                ax.plot(x[marks[name]], values[marks[name]], marker, color=color, markersize=9,
                        markeredgecolor="black", zorder=5)
    return [Line2D([], [], color="grey", linewidth=4, label="plateau (one row per run)"),
            Line2D([], [], marker="v", linestyle="", color="grey", markeredgecolor="black", label="cliff end"),
            Line2D([], [], marker="^", linestyle="", color="grey", markeredgecolor="black", label="climb start")]


def phase_curve_figure(series: Series, *, dpi: int = 100) -> Figure:
    """Centered token similarity with the detected cliff end, plateau and climb start; raw similarity."""
    figure, (centered, raw) = new_figure(2, dpi=dpi)
    _curve_panel(centered, series, "token_similarity", "centered", "centered token similarity S_c")
    phase_marks = _mark_phases(centered, series)
    centered.axhline(0, color="grey", linewidth=0.6)
    _curve_panel(raw, series, "token_similarity", "raw", "raw token similarity S")
    _legend(figure, [centered], series, phase_marks)
    return figure


def isi_figure(series: Series, *, dpi: int = 100) -> Figure:
    figure, axes = new_figure(2, dpi=dpi)
    _curve_panel(axes[0], series, "isi", "isi", "information scrambling index ISI = R²_all − R²_self")
    axes[0].axhline(0, color="grey", linewidth=0.6)
    for index, (label, record) in enumerate(series):
        for key, style in (("r2_self", "-"), ("r2_all", "--")):
            values = stage_values(record, "isi", key)
            if values is not None:
                axes[1].plot(positions(record, relative_depth(series)), values, style, marker="o", markersize=3, color=f"C{index}",
                             label=f"{label} {key}".strip() if index == 0 or key == "r2_self" else None)
    axes[1].set_title("held-out R² (solid: self-only, dashed: all tokens)", fontsize=10)
    _stage_axis(axes[1], series)
    _legend(figure, axes, series)
    return figure


ATTENTION_PANELS = (("cls_centrality_ratio", "CLS centrality × tokens (1 = uniform)"),
                    ("consensus", "attention consensus ACI"),
                    ("entropy_normalized", "attention entropy / log T"),
                    ("mean_distance", "mean attention distance (patches)"))


def attention_figure(series: Series, *, dpi: int = 100) -> Figure:
    figure, axes = new_figure(len(ATTENTION_PANELS), dpi=dpi)
    for ax, (key, title) in zip(axes, ATTENTION_PANELS):
        _curve_panel(ax, series, "attention", key, title)
    _legend(figure, axes, series)
    return figure


NC_STAGE_PANELS = (("nc1", "NC1 tr(Σ_W Σ_B⁺)/C (log)", True), ("nc2_etf_gap", "NC2 distance to a simplex ETF", False),
                   ("nc2_equinorm_cv", "NC2 equinorm CV", False))
NC_FINAL_KEYS = ("nc3_self_duality", "nc4_ncc_mismatch", "logit_margin")


def neural_collapse_figure(series: Series, *, dpi: int = 100) -> Figure:
    """NC1/NC2 per stage, and the head-dependent NC3, NC4 and logit margin at `norm` as bars."""
    figure, axes = new_figure(4, dpi=dpi)
    for ax, (key, title, log) in zip(axes, NC_STAGE_PANELS):
        _curve_panel(ax, series, "neural_collapse", key, title, log=log)
    bars = axes[3]
    width = 0.8 / len(series)
    for index, (label, record) in enumerate(series):
        final = {key: (stage_values(record, "neural_collapse", key) if "neural_collapse" in record else None)
                 for key in NC_FINAL_KEYS}
        heights = [values[-1] if values is not None else np.nan for values in final.values()]
        drawn = bars.bar(np.arange(len(NC_FINAL_KEYS)) + index * width, heights, width, color=f"C{index}",
                         label=label)
        bars.bar_label(drawn, fmt="%.3g", fontsize=7)
    bars.set_xticks(np.arange(len(NC_FINAL_KEYS)) + 0.4 - width / 2, NC_FINAL_KEYS, fontsize=8)
    bars.set_title("at norm (head): NC3, NC4, logit margin", fontsize=10)
    bars.grid(alpha=0.3, axis="y")
    _legend(figure, axes, series)
    return figure


def plasticity_figure(series: Series, *, dpi: int = 100) -> Figure:
    """One model: its five components together; several: one panel per component."""
    components = [key for key in ("MHA", "FC1", "FC2", "LN2", "LN1")
                  if any(quantity(record, "plasticity", key) is not None for _, record in series)]
    if len(series) == 1:
        figure, (ax,) = new_figure(1, dpi=dpi)
        label, record = series[0]
        for index, key in enumerate(components):
            values = stage_values(record, "plasticity", key)
            ax.plot(positions(record, False), values, marker="o", markersize=3, color=f"C{index}", label=key)
        ax.set_title("plasticity ‖f(X) − f(Y)‖ / ‖X − Y‖ per component" + (f" ({label})" if label else ""),
                     fontsize=10)
        ax.set_yscale("log")
        _stage_axis(ax, series)
        ax.legend(fontsize=8)
        return figure
    figure, axes = new_figure(len(components), dpi=dpi)
    for ax, key in zip(axes, components):
        _curve_panel(ax, series, "plasticity", key, f"plasticity {key}", log=True)
    _legend(figure, axes, series)
    return figure


def analysis_figures(series: Series, *, dpi: int = 100) -> dict[str, Figure]:
    """Every figure (diagnostics/registry.py) some record of `series` has data for, by file name: the PNGs
    tools/analyze.py writes."""
    make: Callable[..., Figure]
    figures = {}
    for metric, spec in METRICS.items():
        if spec.figure is not None and any(metric in record for _, record in series):
            make = globals()[spec.figure.function]
            figures[spec.figure.file] = make(series, dpi=dpi)
    return figures


def stage_step_heatmap(records: Sequence[Mapping[str, Any]], metric: str, key: str, title: str, *,
                       log: bool = False, dpi: int = 80) -> Figure | None:
    """Stage (rows, embed at the bottom) × training step (columns) of one quantity over one run's records."""
    stages, steps, values = heatmap_values(records, metric, key, log)
    if not steps:
        return None
    if log:
        title = f"log10 {title}"
    figure, (ax,) = new_figure(1, width=6.4, height=4.0, dpi=dpi)
    figure.subplots_adjust(left=0.16, right=0.88, bottom=0.14)  # room for the colorbar's tick labels
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", origin="lower", interpolation="nearest",
                      cmap="viridis")
    stage_step = -(-len(stages) // MAX_STAGE_TICKS)
    rows = list(range(0, len(stages), stage_step))
    ax.set_yticks(rows, [stages[i] for i in rows], fontsize=7)
    column_step = -(-len(steps) // MAX_STEP_TICKS)
    columns = list(range(0, len(steps), column_step))
    ax.set_xticks(columns, [str(steps[i]) for i in columns], fontsize=7)
    ax.set_xlabel("training step", fontsize=8)
    ax.set_title(title, fontsize=10)
    colorbar = figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    colorbar.ax.tick_params(labelsize=7)
    return figure
