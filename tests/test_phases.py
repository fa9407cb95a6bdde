"""Cliff–Plateau–Climb detection on hand-built S_c curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.phases import detect_phases, longest_flat_window, phases_from_similarity


def curve(*values: float, blocks_from: int = 2) -> tuple[list[str], list[float]]:
    """Stages embed, pe, block_1.. for the given values."""
    names = ["embed", "pe"] + [f"block_{i}" for i in range(1, len(values) - blocks_from + 1)]
    return names, list(values)


# embed, pe, block_1 .. block_8: range 0.052 -> tau = max(0.005, 0.0052) = 0.0052
CLIFF_PLATEAU_CLIMB = curve(0.020, -0.002, 0.000, -0.001, 0.001, 0.000, 0.003, 0.008, 0.030, 0.050)


def test_cliff_plateau_climb():
    phases = detect_phases(*CLIFF_PLATEAU_CLIMB)
    assert phases.cliff_end == "pe"
    assert phases.cliff_size == pytest.approx(0.022)
    assert phases.tau == pytest.approx(0.0052)
    # pe..block_5 has median 0 and every value within 0.0052; adding block_6 (0.008) breaks it
    assert (phases.plateau_start, phases.plateau_end, phases.plateau_length) == ("pe", "block_5", 6)
    assert phases.plateau_median == pytest.approx(0.0)
    assert phases.climb_start == "block_6"


def test_tau_sensitivity_moves_the_plateau_end_and_climb_start():
    sensitivity = detect_phases(*CLIFF_PLATEAU_CLIMB).tau_sensitivity
    assert [entry["scale"] for entry in sensitivity] == [0.5, 1.0, 2.0]
    assert [entry["tau"] for entry in sensitivity] == pytest.approx([0.0026, 0.0052, 0.0104])
    # tau/2 rejects block_5 (0.003); 2 tau accepts block_6 (0.008) but not block_7 (0.030 vs median 0.0005)
    assert [entry["plateau_end"] for entry in sensitivity] == ["block_4", "block_5", "block_6"]
    assert [entry["plateau_length"] for entry in sensitivity] == [5, 6, 7]
    assert [entry["climb_start"] for entry in sensitivity] == ["block_5", "block_6", "block_7"]
    assert [entry["plateau_median"] for entry in sensitivity] == [0.0, 0.0, 0.0]


def test_flat_curve_has_no_climb():
    phases = detect_phases(*curve(0.020, -0.003, -0.002, -0.001, 0.000, -0.001, 0.000))
    assert phases.cliff_end == "pe" and phases.tau == 0.005
    assert (phases.plateau_start, phases.plateau_end) == ("pe", "block_5")
    assert phases.climb_start is None


def test_decaying_tail_above_threshold_is_not_a_climb():
    phases = detect_phases(*curve(0.02, -0.002, 0.0, 0.0, 0.0, 0.03, 0.025, 0.02, 0.015))
    assert phases.plateau_end == "block_3"
    assert phases.climb_start is None


def test_climb_allows_one_dip_but_not_two():
    one_dip = detect_phases(*curve(0.02, -0.002, 0.0, 0.0, 0.0, 0.02, 0.015, 0.03, 0.04))
    assert one_dip.climb_start == "block_4"
    two_dips = detect_phases(*curve(0.02, -0.002, 0.0, 0.0, 0.0, 0.02, 0.015, 0.03, 0.025, 0.04))
    assert two_dips.climb_start == "block_6"


def test_cliff_end_can_be_a_later_block_and_plateau_starts_there():
    phases = detect_phases(*curve(0.020, 0.010, 0.000, -0.004, -0.003, -0.004, -0.003))
    assert phases.cliff_end == "block_2"
    assert phases.cliff_size == pytest.approx(0.024)
    assert (phases.plateau_start, phases.plateau_end, phases.plateau_length) == ("block_2", "block_5", 4)


def test_phases_from_similarity_drops_the_final_norm_by_default():
    names, values = CLIFF_PLATEAU_CLIMB
    similarity = {name: {"centered": value} for name, value in zip(names, values)}
    similarity["norm"] = {"centered": -0.5}  # would stretch tau if it were part of the curve
    assert phases_from_similarity(similarity).to_dict() == detect_phases(*CLIFF_PLATEAU_CLIMB).to_dict()
    with_norm = phases_from_similarity(similarity, include_norm=True)
    assert with_norm.tau == pytest.approx(0.1 * 0.55)
    json.dumps(with_norm.to_dict())


def test_bad_curves_are_rejected():
    with pytest.raises(ValueError, match="stage names"):
        detect_phases(["embed", "pe"], [0.1])
    with pytest.raises(ValueError, match="none of the cliff stages"):
        detect_phases(["embed", "norm"], [0.1, 0.2])
    with pytest.raises(ValueError, match="tau_scales"):
        detect_phases(*CLIFF_PLATEAU_CLIMB, tau_scales=(0.0,))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=1, max_size=12), st.data())
def test_longest_flat_window_is_the_longest_of_all_windows(values, data):
    start = data.draw(st.integers(0, len(values) - 1))
    tau = data.draw(st.floats(0, 0.5))
    first, last, median = longest_flat_window(values, start, tau)
    flat = [(a, b) for a in range(start, len(values)) for b in range(a, len(values))
            if all(abs(v - np.median(values[a:b + 1])) <= tau for v in values[a:b + 1])]
    longest = max(b - a for a, b in flat)
    assert last - first == longest
    assert (first, last) == min((a, b) for a, b in flat if b - a == longest)
    assert median == pytest.approx(np.median(values[first:last + 1]))


def literal_climb(values, after, threshold):
    """science.md's words taken literally: the first stage after the plateau above the threshold from which
    the curve keeps rising to the end with at most one dip (no condition on how the stage was reached)."""
    for s in range(after + 1, len(values)):
        if values[s] > threshold and sum(values[k] < values[k - 1] for k in range(s + 1, len(values))) <= 1:
            return s
    return None


def test_a_climb_starts_with_a_rise_never_at_a_drop():
    # after the plateau: 0.02, 0.015, 0.03, 0.025, 0.04. From 0.02 the curve dips twice; the literal rule
    # would start the climb at 0.015, a drop; depthlab starts it at the next rise, 0.03 (block_6)
    names, values = curve(0.02, -0.002, 0.0, 0.0, 0.0, 0.02, 0.015, 0.03, 0.025, 0.04)
    phases = detect_phases(names, values)
    after, threshold = names.index(phases.plateau_end), phases.plateau_median + phases.tau
    assert names[literal_climb(values, after, threshold)] == "block_5" and phases.climb_start == "block_6"
    # a rise into the last stage alone is a climb; a rise followed by a fall at the end is one dip
    assert detect_phases(*curve(0.02, -0.002, 0.0, 0.0, 0.0, 0.0, 0.03)).climb_start == "block_5"
    assert detect_phases(*curve(0.02, -0.002, 0.0, 0.0, 0.0, 0.03, 0.02)).climb_start == "block_4"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-0.05, 0.05, allow_nan=False), min_size=5, max_size=15))
def test_the_climb_rule_differs_from_the_literal_one_only_where_that_one_starts_at_a_drop(values):
    names = ["embed", "pe"] + [f"block_{i}" for i in range(1, len(values) - 1)]
    phases = detect_phases(names, values)
    after, threshold = names.index(phases.plateau_end), phases.plateau_median + phases.tau
    literal = literal_climb(values, after, threshold)
    ours = None if phases.climb_start is None else names.index(phases.climb_start)
    if ours != literal:
        assert literal is not None and values[literal] <= values[literal - 1]  # the literal one starts at a drop
        assert ours is None or ours > literal
