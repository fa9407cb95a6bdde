"""Training-time images drawn with numpy and Pillow: the labelled stage × step heatmap and the phase
curve, in milliseconds each.

Sized for TensorBoard's *Images* cards, which show an image about 350 px wide: drawn at that width
with 11–12 px text, they are readable as thumbnails (no "Show actual image size"). A heatmap's colours
span its `robust_range` (Tukey's far fences), so one outlier cell cannot take the colour range; the
colorbar's end triangles mark values beyond it. The colours of one image are one scale over all its
columns (evaluations); the Depth tab (diagnostics/tensorboard_plugin/) keeps one scale per run.

matplotlib draws the offline figures (tools/analyze.py, reports). Inside a training process its import
(~0.5 s) and each figure (~0.1–0.2 s) cost more than a whole probe evaluation at demo scale, which
put the callback over its cost budget; these images need only cells, polylines and text. Colours:
viridis from a degree-6 polynomial fit (within 4/255 of matplotlib's table, tested), curves in
matplotlib's default cycle; text in Pillow's bundled scalable font.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diagnostics.records import phase_indices, quantity, stage_step_matrix

# viridis(t) = sum_k VIRIDIS[k] t^k per channel (Matt Zucker's fit of matplotlib's viridis)
VIRIDIS = np.array([
    [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
    [0.1050930431085774, 1.404613529898575, 1.384590162594685],
    [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
    [-4.634230498983486, -5.799100973351585, -19.33244095627987],
    [6.228269936347081, 14.17993336680509, 56.69055260068105],
    [4.776384997670288, -13.74514537774601, -65.35303263337234],
    [-5.435455855934631, 4.645852612178535, 26.3124352495832],
])
CURVE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
WHITE, INK, GRID, MISSING = (255, 255, 255), (30, 30, 30), (228, 228, 228), (215, 215, 215)
MARK = (100, 100, 100)  # phase boundaries
MAX_ROW_LABELS, MAX_COLUMN_LABELS = 16, 5
THUMBNAIL_WIDTH = 348  # TensorBoard's Images card shows ~350 px: drawn at this width, shown 1:1
FENCE = 3.0  # Tukey's far fences: quartiles -/+ 3 IQR

Box = tuple[int, int, int, int]  # left, top, right, bottom (pixels, inclusive-exclusive)


def viridis(t: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] (clipped), shape (..., 3)."""
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)[..., None]
    rgb = sum(VIRIDIS[k] * t ** k for k in range(len(VIRIDIS)))
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) inside [low, high]: between `count` − 1 and
    2.5 (`count` − 1) + 1 of them (the largest such step at most (high − low) / (`count` − 1))."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = max(m * magnitude for m in (1, 2, 5) if m * magnitude <= raw * (1 + 1e-12))
    first = math.ceil(low / step - 1e-9) * step
    ticks = [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _label(value: float) -> str:
    return f"{value:.3g}"


def _thin(count: int, most: int) -> list[int]:
    return list(range(0, count, -(-count // most))) if count else []


class Canvas:
    """A white RGB image with the few drawing operations the diagnostics images use."""

    def __init__(self, width: int, height: int):
        self.image = Image.new("RGB", (width, height), WHITE)
        self.draw = ImageDraw.Draw(self.image)

    def text(self, xy: tuple[float, float], text: str, size: int = 11, anchor: str = "la",
             fill: tuple[int, int, int] = INK) -> None:
        self.draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)

    def text_width(self, text: str, size: int = 11) -> int:
        return math.ceil(self.draw.textlength(text, font=font(size)))

    def vline(self, x: float, top: float, bottom: float, fill: tuple[int, int, int], dash: int = 0,
              width: int = 1) -> None:
        if not dash:
            self.draw.line([(x, top), (x, bottom)], fill=fill, width=width)
            return
        y = top
        while y < bottom:
            self.draw.line([(x, y), (x, min(y + dash, bottom))], fill=fill, width=width)
            y += 2 * dash

    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8."""
        return np.asarray(self.image).copy()


def stage_values(record: Mapping[str, Any], metric: str, key: str, positive: bool = False) -> np.ndarray | None:
    """One per-stage quantity of a record as floats (None -> NaN; with `positive`, values <= 0 too,
    for a log scale), or None when the record lacks it."""
    values = quantity(record, metric, key)
    if values is None:
        return None
    array = np.array(values, dtype=float)  # None -> NaN
    return np.where(array > 0, array, np.nan) if positive else array


def heatmap_values(records: Sequence[Mapping[str, Any]], metric: str, key: str,
                   log: bool = False) -> tuple[list[str], list[int], np.ndarray]:
    """(stages, steps, values[stage, step]) of one quantity over one model's records; missing values are
    NaN, and with `log` the values are log10 (non-positive ones NaN)."""
    stages, steps, matrix = stage_step_matrix(records, metric, key)
    values = np.array(matrix, dtype=float)  # None -> NaN
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.log10(np.where(values > 0, values, np.nan))
    return stages, steps, values


def stage_step_heatmap_image(records: Sequence[Mapping[str, Any]], metric: str, key: str, title: str, *,
                             log: bool = False) -> np.ndarray | None:
    """The stage × training-step heatmap of one quantity (None when no record has it)."""
    stages, steps, values = heatmap_values(records, metric, key, log)
    if not steps:
        return None
    return heatmap_image(values, stages, [str(step) for step in steps], f"log10 {title}" if log else title)


def robust_range(values: np.ndarray) -> tuple[float, float, bool, bool]:
    """(low, high, clipped_low, clipped_high) of a heatmap's colours: min..max of the finite values, narrowed
    to Tukey's far fences (quartiles -/+ FENCE IQR), so that one outlier cell cannot take the whole range.
    (The Depth tab's frontend applies the same rule.)"""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 1.0, False, False
    low, high = float(finite.min()), float(finite.max())
    q1, q3 = (float(q) for q in np.quantile(finite, [0.25, 0.75]))
    if q3 > q1:
        low, high = max(low, q1 - FENCE * (q3 - q1)), min(high, q3 + FENCE * (q3 - q1))
    return low, high, bool(finite.min() < low), bool(finite.max() > high)


def heatmap_image(values: np.ndarray, row_labels: Sequence[str], column_labels: Sequence[str], title: str, *,
                  width: int = THUMBNAIL_WIDTH, height: int = 236) -> np.ndarray:
    """A labelled heatmap of `values[row][column]` (row 0 at the bottom, NaN grey) with a colorbar; colours span
    `robust_range(values)` (cells beyond it take the end colours, shown by triangles on the colorbar)."""
    values = np.asarray(values, dtype=float)
    rows, columns = values.shape
    canvas = Canvas(width, height)
    row_step = max(1, -(-rows * 12 // max(height - 60, 1)))  # at most one label per 12 px
    shown_rows, shown_columns = _thin(rows, min(MAX_ROW_LABELS, -(-rows // row_step))), _thin(columns, MAX_COLUMN_LABELS)
    left = 8 + max((canvas.text_width(row_labels[i], 11) for i in shown_rows), default=0)
    box = (left, 24, width - 62, height - 34)
    low, high, clipped_low, clipped_high = robust_range(values)
    span = high - low if high > low else 1.0

    cells = viridis(np.nan_to_num((values - low) / span))
    cells[~np.isfinite(values)] = MISSING
    plot_w, plot_h = box[2] - box[0], box[3] - box[1]
    tile = Image.fromarray(np.ascontiguousarray(cells[::-1])).resize((plot_w, plot_h), Image.Resampling.NEAREST)
    canvas.image.paste(tile, box[:2])
    canvas.draw.rectangle([box[0] - 1, box[1] - 1, box[2], box[3]], outline=INK)

    canvas.text((width / 2, 4), title, 12, anchor="ma")
    for i in shown_rows:
        y = box[3] - (i + 0.5) * plot_h / rows
        canvas.text((box[0] - 4, y), row_labels[i], 11, anchor="rm")
    for j in shown_columns:
        x = box[0] + (j + 0.5) * plot_w / columns
        canvas.text((x, box[3] + 3), column_labels[j], 11, anchor="ma")
    canvas.text(((box[0] + box[2]) / 2, height - 3), "training step", 11, anchor="md")

    bar = (box[2] + 8, box[1] + 7, box[2] + 20, box[3] - 7)
    gradient = viridis(np.linspace(1.0, 0.0, bar[3] - bar[1]))[:, None, :].repeat(bar[2] - bar[0], axis=1)
    canvas.image.paste(Image.fromarray(np.ascontiguousarray(gradient)), bar[:2])
    canvas.draw.rectangle([bar[0] - 1, bar[1] - 1, bar[2], bar[3]], outline=INK)
    middle = (bar[0] + bar[2]) / 2
    if clipped_high:  # values above the range: an end triangle in the top colour
        canvas.draw.polygon([(bar[0] - 1, bar[1] - 2), (bar[2], bar[1] - 2), (middle, bar[1] - 8)],
                            fill=tuple(viridis(np.array(1.0))), outline=INK)
    if clipped_low:
        canvas.draw.polygon([(bar[0] - 1, bar[3] + 1), (bar[2], bar[3] + 1), (middle, bar[3] + 7)],
                            fill=tuple(viridis(np.array(0.0))), outline=INK)
    for tick in nice_ticks(low, high, 3 if bar[3] - bar[1] < 120 else 4) if high > low else [low]:
        y = bar[3] - (tick - low) / span * (bar[3] - bar[1]) if high > low else (bar[1] + bar[3]) / 2
        canvas.draw.line([(bar[2], y), (bar[2] + 3, y)], fill=INK)
        canvas.text((bar[2] + 5, y), _label(tick), 11, anchor="lm")
    return canvas.pixels()


def _panel_range(curves: Sequence[np.ndarray], zero_line: bool) -> tuple[float, float]:
    finite = np.concatenate([c[np.isfinite(c)] for c in curves]) if curves else np.array([])
    if zero_line:
        finite = np.append(finite, 0.0)
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    pad = (high - low) * 0.06 or abs(high) * 0.1 or 1.0
    return low - pad, high + pad


def curve_panel(canvas: Canvas, box: Box, stages: Sequence[str], curves: Sequence[tuple[np.ndarray, str]],
                title: str, *, marks: Mapping[str, int | None] | None = None, zero_line: bool = False) -> None:
    """Per-stage curves (one colour each) in `box`, stage names on the x axis, phase `marks` if given."""
    left, top, right, bottom = box
    low, high = _panel_range([values for values, _ in curves], zero_line)
    count = max(len(stages) - 1, 1)

    def x_of(index: float) -> float:
        return left + 8 + index * (right - left - 16) / count

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    canvas.text(((left + right) / 2, top - 20), title, 13, anchor="ma")
    legend: list[tuple[str, tuple[int, int, int], int | None]] = []  # (text, colour, dash; None = a box)
    marks = marks or {}
    if marks.get("plateau_start") is not None:
        shade = (214, 226, 240)
        canvas.draw.rectangle([x_of(marks["plateau_start"] - 0.2), top, x_of(marks["plateau_end"] + 0.2), bottom],
                              fill=shade)
        legend.append(("plateau", shade, None))
    for tick in nice_ticks(low, high):
        y = y_of(tick)
        canvas.draw.line([(left, y), (right, y)], fill=GRID)
        canvas.text((left - 5, y), _label(tick), 10, anchor="rm")
    for i in _thin(len(stages), MAX_ROW_LABELS):
        canvas.draw.line([(x_of(i), bottom), (x_of(i), bottom + 3)], fill=INK)
        canvas.text((x_of(i), bottom + 5), stages[i].replace("block_", "b"), 10, anchor="ma")
    if zero_line and low < 0 < high:
        canvas.draw.line([(left, y_of(0)), (right, y_of(0))], fill=(150, 150, 150))
    for name, text, dash in (("cliff_end", "cliff end", 2), ("climb_start", "climb start", 5)):
        if marks.get(name) is not None:
            canvas.vline(x_of(marks[name]), top, bottom, MARK, dash=dash)
            legend.append((text, MARK, dash))
    canvas.draw.rectangle([left, top, right, bottom], outline=INK)
    drawn: list[tuple[float, float]] = []
    for index, (values, label) in enumerate(curves):
        color = CURVE_COLORS[index % len(CURVE_COLORS)]
        points = [(x_of(i), y_of(v)) for i, v in enumerate(values) if math.isfinite(v)]
        if len(points) > 1:
            canvas.draw.line(points, fill=color, width=2)
        for x, y in points:
            canvas.draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
        drawn += points
        if label:
            legend.append((label, color, 0))
    if legend:
        _legend(canvas, box, legend, drawn)


def _legend(canvas: Canvas, box: Box, entries: Sequence[tuple[str, tuple[int, int, int], int | None]],
            points: Sequence[tuple[float, float]]) -> None:
    """A boxed legend in the corner of `box` that covers the fewest curve points; each entry a swatch
    (box, line or dashed line) and its text."""
    left, top, right, bottom = box
    width = sum(canvas.text_width(text, 10) + 26 for text, _, _ in entries) + 4
    corners = [(right - 4 - width, top + 4), (left + 4, top + 4), (right - 4 - width, bottom - 22),
               (left + 4, bottom - 22)]

    def covered(corner: tuple[float, float]) -> int:
        x0, y0 = corner
        return sum(x0 - 4 <= x <= x0 + width + 4 and y0 - 4 <= y <= y0 + 22 for x, y in points)

    x, y0 = min(corners, key=covered)
    canvas.draw.rectangle([x, y0, x + width, y0 + 18], fill=WHITE, outline=GRID)
    y = y0 + 9
    for text, color, dash in entries:
        if dash is None:
            canvas.draw.rectangle([x + 6, y - 4, x + 16, y + 4], fill=color)
        elif dash == 0:
            canvas.draw.line([(x + 4, y), (x + 18, y)], fill=color, width=2)
        else:
            for start in range(4, 18, 2 * dash):
                canvas.draw.line([(x + start, y), (x + min(start + dash, 18), y)], fill=color)
        canvas.text((x + 22, y), text, 10, anchor="lm")
        x += canvas.text_width(text, 10) + 26


def phase_curve_image(record: Mapping[str, Any], label: str = "", *, width: int = THUMBNAIL_WIDTH,
                      height: int = 236) -> np.ndarray:
    """Centered token similarity S_c with the detected cliff end, plateau and climb start (the raw S and every
    other quantity are in the Depth tab's depth profile)."""
    canvas = Canvas(width, height)
    stages = list(record["stages"])
    values = stage_values(record, "token_similarity", "centered")
    curves = [(values, label)] if values is not None else []
    curve_panel(canvas, (50, 46, width - 10, height - 22), stages, curves, "centered token similarity S_c",
                marks=phase_indices(record), zero_line=True)
    return canvas.pixels()
