"""Shared fixtures: tiny CPU-sized recipes and a clean accelerate state per training run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from trainer.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo_digits.yaml"

# CI must be reproducible: the same examples on every run, no wall-clock deadlines on slow machines.
# HYPOTHESIS_PROFILE=explore draws fresh random examples.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Shrinks any recipe to a seconds-long CPU run on random tensors.
TINY_OVERRIDES = [
    "data.source=synthetic", "data.synthetic_train_size=64", "data.synthetic_eval_size=24",
    "data.num_workers=0", "data.pin_memory=false",
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "train.batch_size=8", "train.precision='no'", "eval.batch_size=16",
    "schedule.epochs=2", "schedule.warmup_epochs=0.5", "schedule.warmup_lr=1e-4",
    "logging.every_steps=1", "logging.progress_bar=false", "diagnostics.enabled=false",
]


@pytest.fixture
def tiny_recipe():
    """`tiny_recipe(*overrides, path=DEMO_RECIPE)` -> a validated Recipe shrunk by TINY_OVERRIDES."""

    def make(*overrides: str, path: Path = DEMO_RECIPE):
        return load_recipe(path, [*TINY_OVERRIDES, *overrides])

    return make


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons; reset them so runs in one test process are independent."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
