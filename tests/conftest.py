"""Shared fixtures: tiny CPU-sized recipes and a clean accelerate state per training run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from models import create_vit
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
    "schedule.epochs=2", "schedule.warmup_epochs=0.5", "schedule.warmup_steps=null", "schedule.warmup_lr=1e-4",
    "logging.every_steps=1", "logging.progress_bar=false", "diagnostics.enabled=false",
]


@pytest.fixture
def tiny_recipe():
    """`tiny_recipe(*overrides, path=DEMO_RECIPE)` -> a validated Recipe shrunk by TINY_OVERRIDES."""

    def make(*overrides: str, path: Path = DEMO_RECIPE):
        return load_recipe(path, [*TINY_OVERRIDES, *overrides])

    return make


def tiny_vit(variant: dict | None = None, *, seed: int | None = 0, eval: bool = True, **kwargs) -> torch.nn.Module:
    """vit_tiny_patch16_224's layout at toy size (16 px, 4 px patches, width 16, depth 2, 2 heads, 10 classes),
    built through depthlab's factory (`variant` as in `create_vit`); `kwargs` override the sizes or pass any
    timm kwarg. Seeded with `seed` first (None: the caller's RNG), in eval mode unless `eval=False`.
    Test modules bind their own sizes with `functools.partial`."""
    if seed is not None:
        torch.manual_seed(seed)
    options = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=10)
    model = create_vit("vit_tiny_patch16_224", variant, **{**options, **kwargs})
    return model.eval() if eval else model


@pytest.fixture(scope="module")
def single_thread():
    """The test machine's 2 cores are shared: intra-op threads on tiny matrices only add contention
    (OpenMP spinning made tiny models ~5x slower). Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons; reset them so runs in one test process are independent."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
