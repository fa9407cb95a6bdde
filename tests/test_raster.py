"""diagnostics/raster.py: the training-time images, checked pixel by pixel against what they encode."""

import math
import re

import matplotlib
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from diagnostics.raster import (
    CURVE_COLORS,
    MARK,
    MISSING,
    VIRIDIS,
    Canvas,
    curve_panel,
    heatmap_image,
    heatmap_values,
    nice_ticks,
    phase_curve_image,
    robust_range,
    stage_step_heatmap_image,
    viridis,
)
from tests.conftest import REPO


def test_viridis_matches_matplotlibs_table():
    t = np.linspace(0, 1, 256)
    reference = np.rint(matplotlib.colormaps["viridis"](t)[:, :3] * 255)
    assert np.abs(viridis(t).astype(int) - reference).max() <= 4
    assert (viridis(np.array([-1.0, 2.0])) == viridis(np.array([0.0, 1.0]))).all()  # clipped


def test_the_depth_tabs_colour_map_is_the_images_one():
    # the browser's copy of the polynomial (static/index.js) draws the same colours as the PNG images
    source = (REPO / "diagnostics" / "tensorboard_plugin" / "static" / "index.js").read_text()
    block = re.search(r"const VIRIDIS = \[(.*?)\];", source, re.S).group(1)
    rows = [[float(v) for v in row.split(",")] for row in re.findall(r"\[([^\[\]]+)\]", block)]
    assert np.array_equal(np.array(rows), VIRIDIS)
    missing = re.search(r"const MISSING = '#(\w{6})';", source).group(1)
    assert tuple(int(missing[i:i + 2], 16) for i in (0, 2, 4)) == MISSING


@given(st.floats(-1e6, 1e6), st.floats(1e-6, 1e6))
def test_nice_ticks_are_round_even_and_inside(low, span):
    assume(span > 1e-6 * abs(low))  # ticks a float can still tell apart
    high = low + span
    ticks = nice_ticks(low, high)
    assert 3 <= len(ticks) <= 8  # count=4: between 3 and 2.5 * 3 + 1
    assert all(low - 1e-9 * span <= t <= high + 1e-9 * span for t in ticks)
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0], rtol=1e-6)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-3


def test_heatmap_cells_carry_their_values_row_zero_at_the_bottom_nan_grey():
    values = np.array([[0.0, 1.0, np.nan], [0.5, 0.25, 0.75]])  # row 0 = the first stage (embed)
    image = heatmap_image(values, ["embed", "norm"], ["10", "20", "30"], "title")
    assert image.shape == (236, 348, 3) and image.dtype == np.uint8  # TensorBoard's thumbnail width, shown 1:1
    centres = {}
    for (i, j), value in np.ndenumerate(values):
        colour = MISSING if np.isnan(value) else tuple(viridis(np.array(value)))
        pixels = np.argwhere((image[24:202, 48:286] == colour).all(axis=2))  # inside the plot box (raster.py layout)
        assert len(pixels) > 2000, (i, j)  # a filled cell, not a stray pixel
        (top, left), (bottom, right) = pixels.min(axis=0), pixels.max(axis=0)
        assert len(pixels) == (bottom - top + 1) * (right - left + 1)  # one solid rectangle
        centres[i, j] = ((top + bottom) / 2, (left + right) / 2)
    for j in range(3):
        assert centres[0, j][0] > centres[1, j][0]  # row 0 below row 1
    for i in range(2):
        assert centres[i, 0][1] < centres[i, 1][1] < centres[i, 2][1]  # steps left to right
    assert {round(centres[0, j][0]) for j in range(3)} == {round(centres[0, 0][0])}  # a grid


def test_heatmap_values_log_and_missing_stages():
    records = [{"step": 5, "stages": ["embed", "norm"], "neural_collapse": {"nc1": [10.0, 0.0]}},
               {"step": 9, "stages": ["embed", "norm"], "neural_collapse": {"nc1": [100.0, None]}},
               {"step": 12, "stages": ["embed", "norm"]}]  # no NC this time: skipped
    stages, steps, values = heatmap_values(records, "neural_collapse", "nc1", log=True)
    assert stages == ["embed", "norm"] and steps == [5, 9]
    np.testing.assert_array_equal(values, [[1.0, 2.0], [np.nan, np.nan]])
    assert stage_step_heatmap_image(records, "isi", "isi", "isi") is None
    assert stage_step_heatmap_image(records, "neural_collapse", "nc1", "nc1", log=True).shape == (236, 348, 3)


def test_constant_heatmap_is_drawn():
    image = heatmap_image(np.full((3, 2), 0.3), ["a", "b", "c"], ["1", "2"], "flat")
    assert (image == viridis(np.array(0.0))).all(axis=2).sum() > 1000


def test_curve_points_and_phase_marks_land_where_they_should():
    canvas = Canvas(400, 200)
    box = (40, 30, 380, 170)
    values = np.array([0.0, -1.0, -1.0, -1.0, 1.0])
    curve_panel(canvas, box, ["embed", "pe", "block_1", "block_2", "norm"], [(values, "")], "S_c",
                marks={"cliff_end": 1, "plateau_start": 1, "plateau_end": 3, "climb_start": 3}, zero_line=True)
    image = canvas.pixels()
    # x of stage k: box left + 8 + k * (width - 16) / 4; the lowest and highest points are at the range ends
    x_of = [40 + 8 + k * (340 - 16) / 4 for k in range(5)]
    curve = np.argwhere((image == CURVE_COLORS[0]).all(axis=2))
    assert abs(curve[:, 0].max() - curve[curve[:, 1] == round(x_of[2]), 0].max()) <= 3  # the plateau is lowest
    assert curve[:, 0].min() <= image.shape[0] and curve[curve[:, 1] == round(x_of[4]), 0].min() < 45
    mark_columns = set(np.argwhere((image == MARK).all(axis=2))[:, 1])
    assert {int(x_of[1]), int(x_of[3])} <= mark_columns  # the cliff end and climb start lines


def test_phase_curve_image_of_a_record():
    record = {"step": 3, "stages": ["embed", "pe", "block_1", "norm"],
              "token_similarity": {"raw": [0.1, 0.2, 0.3, 0.4], "centered": [0.0, -0.02, -0.03, 0.01]},
              "phases": {"cliff_end": "pe", "plateau_start": "pe", "plateau_end": "block_1", "climb_start": None}}
    image = phase_curve_image(record, "step 3")
    assert image.shape == (236, 348, 3)  # readable as TensorBoard's thumbnail
    assert (image == CURVE_COLORS[0]).all(axis=2).sum() > 100 and (image == MARK).all(axis=2).any()


@pytest.mark.parametrize("values", [np.array([[np.nan]]), np.zeros((1, 1))])
def test_degenerate_heatmaps(values):
    assert heatmap_image(values, ["embed"], ["1"], "x").shape == (236, 348, 3)


def test_one_outlier_cell_does_not_take_the_colour_range():
    values = np.linspace(0.0, 1.0, 24).reshape(3, 8)
    values[1, 3] = 100.0  # one cell 100x the rest
    low, high, clipped_low, clipped_high = robust_range(values)
    assert low == 0.0 and 0.9 < high < 3.5 and clipped_high and not clipped_low
    image = heatmap_image(values, ["embed", "pe", "norm"], [str(j) for j in range(8)], "outlier")
    top = tuple(viridis(np.array(1.0)))
    plot = image[24:202, :286]
    assert (plot == top).all(axis=2).sum() > 500  # the outlier and the largest ordinary cells share the top colour
    distinct = {tuple(c) for c in plot.reshape(-1, 3)} & {tuple(viridis(np.array(t))) for t in np.linspace(0, 1, 256)}
    assert len(distinct) > 15  # the other cells still spread over the colour map
    assert robust_range(np.array([np.nan, 2.0, 2.0])) == (2.0, 2.0, False, False)
