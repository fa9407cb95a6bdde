"""Cliff–Plateau–Climb detection on a per-stage centered-similarity curve (science.md §1).

A pure function of (stage names, S_c values); every threshold is a knob (OPEN in science.md).
The rule, with the ambiguities resolved as follows:

- Cliff: cliff_end = argmin S_c over the stages {pe, block_1, block_2} present (earliest on a
  tie); cliff_size = S_c[embed] − S_c[cliff_end].
- τ = max(tau_floor, tau_fraction · (max S_c − min S_c)), max/min over the whole given curve.
- Plateau: the longest CONTIGUOUS window of stages starting at cliff_end or later in which every
  value lies within τ of the window's own median (the median is recomputed for each candidate
  window; an even-length window uses the mean of its two middle values). Every window is
  tried, so this is exact, not greedy. Ties go to the earliest window. A single stage is a
  window, so a plateau always exists (length ≥ 1).
- Climb: climb_start = the first stage s after the plateau with S_c[s] > plateau median + τ,
  reached by a rise (S_c[s] > S_c[s−1]), such that from s to the last stage S_c decreases at
  most once between consecutive stages (one dip allowed). The rise condition keeps a decaying
  tail that merely stays above the threshold from counting as a climb (its last stage would
  otherwise qualify vacuously). A climb may be a single last stage. None when no stage
  qualifies.
- The final `norm` stage is a per-token normalisation, not a step in depth; callers decide
  whether it belongs to the curve (`phases_from_similarity(include_norm=...)`, default no).

τ-sensitivity: the plateau and climb are recomputed for τ scaled by each of `tau_scales`
(the cliff does not depend on τ).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from diagnostics.capture import EMBED, NORM, PE, block_stage
from diagnostics.token_similarity import similarity_curve

CLIFF_CANDIDATES = (PE, block_stage(0), block_stage(1))
DEFAULT_TAU_FLOOR = 0.005
DEFAULT_TAU_FRACTION = 0.1
DEFAULT_TAU_SCALES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class PlateauClimb:
    """The τ-dependent part of the phases."""

    tau: float
    plateau_start: str
    plateau_end: str
    plateau_length: int  # number of stages, both ends included
    plateau_median: float
    climb_start: str | None


@dataclass(frozen=True)
class Phases:
    cliff_end: str
    cliff_size: float | None  # None when the curve has no `embed` stage
    tau: float
    plateau_start: str
    plateau_end: str
    plateau_length: int
    plateau_median: float
    climb_start: str | None
    tau_sensitivity: list[dict[str, Any]] = field(default_factory=list)  # PlateauClimb + scale, per scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def phase_tau(values: Sequence[float], tau_floor: float = DEFAULT_TAU_FLOOR,
              tau_fraction: float = DEFAULT_TAU_FRACTION) -> float:
    return max(tau_floor, tau_fraction * (max(values) - min(values)))


def longest_flat_window(values: Sequence[float], start: int, tau: float) -> tuple[int, int, float]:
    """(first, last, median) of the longest window values[first:last+1], first ≥ start, whose
    values are all within tau of the window median; earliest on ties."""
    best = (start, start, float(values[start]))
    for first in range(start, len(values)):
        for last in range(len(values) - 1, first + (best[1] - best[0]) - 1, -1):
            window = values[first:last + 1]
            median = statistics.median(window)
            if all(abs(value - median) <= tau for value in window):
                if last - first > best[1] - best[0]:
                    best = (first, last, float(median))
                break
    return best


def first_climb(values: Sequence[float], after: int, threshold: float) -> int | None:
    """First index s > after with values[s] > threshold, values[s] > values[s-1], and at most one
    decrease between consecutive values from s to the end."""
    for candidate in range(after + 1, len(values)):
        if values[candidate] <= threshold or values[candidate] <= values[candidate - 1]:
            continue
        dips = sum(values[k] < values[k - 1] for k in range(candidate + 1, len(values)))
        if dips <= 1:
            return candidate
    return None


def plateau_and_climb(stages: Sequence[str], values: Sequence[float], cliff_index: int,
                      tau: float) -> PlateauClimb:
    first, last, median = longest_flat_window(values, cliff_index, tau)
    climb = first_climb(values, last, median + tau)
    return PlateauClimb(tau=tau, plateau_start=stages[first], plateau_end=stages[last],
                        plateau_length=last - first + 1, plateau_median=median,
                        climb_start=None if climb is None else stages[climb])


def detect_phases(stages: Sequence[str], values: Sequence[float], tau_floor: float = DEFAULT_TAU_FLOOR,
                  tau_fraction: float = DEFAULT_TAU_FRACTION,
                  tau_scales: Sequence[float] = DEFAULT_TAU_SCALES) -> Phases:
    """Cliff, plateau and climb of a per-stage S_c curve given in forward order."""
    if len(stages) != len(values):
        raise ValueError(f"{len(stages)} stage names for {len(values)} values")
    if tau_floor < 0 or tau_fraction < 0:
        raise ValueError(f"tau_floor and tau_fraction must be >= 0, got {tau_floor}, {tau_fraction}")
    if any(scale <= 0 for scale in tau_scales):
        raise ValueError(f"tau_scales must be > 0, got {list(tau_scales)}")
    values = [float(value) for value in values]
    candidates = [stages.index(name) for name in CLIFF_CANDIDATES if name in stages]
    if not candidates:
        raise ValueError(f"the curve has none of the cliff stages {', '.join(CLIFF_CANDIDATES)}")
    cliff_index = min(candidates, key=lambda index: (values[index], index))
    cliff_size = values[stages.index(EMBED)] - values[cliff_index] if EMBED in stages else None
    tau = phase_tau(values, tau_floor, tau_fraction)
    main = plateau_and_climb(stages, values, cliff_index, tau)
    sensitivity = [
        {"scale": float(scale), **asdict(plateau_and_climb(stages, values, cliff_index, scale * tau))}
        for scale in tau_scales
    ]
    return Phases(cliff_end=stages[cliff_index], cliff_size=cliff_size, tau=tau,
                  plateau_start=main.plateau_start, plateau_end=main.plateau_end,
                  plateau_length=main.plateau_length, plateau_median=main.plateau_median,
                  climb_start=main.climb_start, tau_sensitivity=sensitivity)


def phases_from_similarity(similarity: dict[str, Any], include_norm: bool = False,
                           tau_floor: float = DEFAULT_TAU_FLOOR, tau_fraction: float = DEFAULT_TAU_FRACTION,
                           tau_scales: Sequence[float] = DEFAULT_TAU_SCALES) -> Phases:
    """Phases of the centered curve in a `TokenSimilarity.compute()` result."""
    stages, values = similarity_curve(similarity, "centered")
    if not include_norm and NORM in stages:
        index = stages.index(NORM)
        stages, values = stages[:index] + stages[index + 1:], values[:index] + values[index + 1:]
    return detect_phases(stages, values, tau_floor, tau_fraction, tau_scales)
