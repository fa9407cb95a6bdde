"""ISI on ViTs whose true ISI is known (issue #12 §3), at the recipes' probe settings shrunk to CPU size.

No mixing: attention masked to the diagonal (every token, CLS too, attends only to itself) and probe
images with independent patches, so the true ISI is 0 at every stage. Fixed permutation: the same
model with the patch tokens deranged right after `pe`, so ISI must be large. Models, settings and the
bias-versus-probe-size table: tools/benchmark_isi_bias.py.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from diagnostics.capture import capture
from diagnostics.isi import ScramblingIndex
from diagnostics.ridge import IllPosedRegressionWarning
from diagnostics.streaming import run_probe
from tools.benchmark_isi_bias import (
    iid_images,
    measure,
    no_mixing_vit,
    permute_tokens,
    recipe_settings,
    setting_model,
)
from trainer.recipe_schema import DiagnosticsConfig

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = recipe_settings()
DEMO_PROBE_SIZE = SETTINGS["demo"].probe_size  # the recipe's probe_size (200 today)


def test_self_only_attention_moves_nothing_between_tokens_and_the_permutation_moves_everything():
    model = no_mixing_vit(img_size=16, embed_dim=16, depth=2, num_heads=2)
    images = iid_images(3, 16, seed=0)
    changed = images.clone()
    changed[:, :, :4, :4] += 1.0  # patch 0 only
    before, after = capture(model, images).stages, capture(model, changed).stages
    for stage in ("block_1", "block_2", "norm"):
        moved = (before[stage] - after[stage]).abs().amax((0, 2))  # per token: CLS, then patches 0..15
        assert moved[1] > 1e-3 and moved[[0, *range(2, 17)]].max() == 0, stage
    permuted = permute_tokens(no_mixing_vit(img_size=16, embed_dim=16, depth=2, num_heads=2))
    order = permuted.norm_pre.order
    assert not (order == torch.arange(16)).any() and sorted(order.tolist()) == list(range(16))
    stages = capture(permuted, images).stages
    torch.testing.assert_close(stages["block_1"][:, 1:], before["block_1"][:, 1:][:, order])


@pytest.mark.parametrize("name, probe_size", [
    ("demo", DEMO_PROBE_SIZE), ("demo", 256), ("demo64", DEMO_PROBE_SIZE), ("demo64", 256),
    ("vit_s", SETTINGS["vit_s"].probe_size), ("vit_s64", SETTINGS["vit_s64"].probe_size)])
def test_no_mixing_vit_isi_is_zero_at_every_stage(name, probe_size):
    """Issue #12 §3 target: |ISI| <= 0.001 at every stage (the joint fit gave -0.07 .. -0.01 here)."""
    results = measure(SETTINGS[name], probe_size)
    assert len(results) == SETTINGS[name].depth + 3
    for stage, values in results.items():
        assert abs(values["isi"]) <= 1e-3, (stage, values)
        assert values["r2_all"] >= values["r2_self"] - 1e-3
    assert results["norm"]["r2_self"] < 0.9  # the per-token maps are far from linear: the test has teeth


def test_joint_nested_fit_is_biased_low_on_the_no_mixing_vit():
    """The single-penalty estimator ISI used before, kept as nested_fit="joint", on the demo setting."""
    results = measure(SETTINGS["demo"], 256, estimator="joint")
    assert min(values["isi"] for values in results.values()) < -0.01
    assert all(values["ridge_multiplier_residual"] is None for values in results.values())


@pytest.mark.parametrize("name, probe_size", [("demo", DEMO_PROBE_SIZE), ("demo64", 256),
                                              ("vit_s", SETTINGS["vit_s"].probe_size)])
def test_fixed_permutation_after_pe_keeps_isi_large(name, probe_size):
    results = measure(SETTINGS[name], probe_size, permuted=True)
    for stage in ("embed", "pe"):
        assert abs(results[stage]["isi"]) <= 1e-3 and results[stage]["r2_self"] > 0.999
    for stage, values in list(results.items())[2:]:
        assert values["isi"] > 0.4 and values["r2_self"] < 0.4, (stage, values)
        assert values["ridge_multiplier_residual"] < math.inf


def isi_warnings(nested_fit: str, probe_size: int) -> tuple[int, list[str]]:
    model = setting_model(dataclasses.replace(SETTINGS["demo"], embed_dim=8, num_heads=2, depth=1))
    metric = ScramblingIndex(model, pca_rank=8, pca_oversample=4, stages=["block_1"], nested_fit=nested_fit)
    images = iid_images(probe_size, 16, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_probe(model, [(images, None, torch.arange(probe_size))], [metric])["isi"]
    messages = [str(w.message) for w in caught if issubclass(w.category, IllPosedRegressionWarning)]
    return results["block_1"]["num_train_images"], messages


def test_warning_thresholds_follow_the_nested_fit():
    """D + r = 16 inputs: residual warns below 1.25x (20 training images), joint below 2x (32)."""
    train, messages = isi_warnings("residual", 24)
    assert 20 <= train < 32 and not messages
    train, messages = isi_warnings("joint", 24)
    assert 20 <= train < 32 and len(messages) == 1 and "joint nested fit overfits" in messages[0]
    train, messages = isi_warnings("residual", 16)
    assert train < 20 and len(messages) == 1 and "below 1.25x as many images the residual fit" in messages[0]


def test_from_config_reads_isi_nested_fit_and_defaults_to_residual():
    model = no_mixing_vit(img_size=16, embed_dim=8, depth=1, num_heads=2)
    assert DiagnosticsConfig().isi_nested_fit == "residual"
    assert ScramblingIndex.from_config(model, DiagnosticsConfig()).nested_fit == "residual"
    joint = dataclasses.replace(DiagnosticsConfig(), isi_nested_fit="joint")
    assert ScramblingIndex.from_config(model, joint).nested_fit == "joint"
    with pytest.raises(ValueError, match="nested_fit = 'both'"):
        ScramblingIndex(model, nested_fit="both")


def test_benchmark_prints_the_table_and_draws_the_figure(capsys, tmp_path):
    from tools import benchmark_isi_bias

    out_json, png = tmp_path / "rows.json", tmp_path / "bias.png"
    benchmark_isi_bias.main(["--settings", "vit_s", "--sizes", "128", "--repeats", "1", "--permuted",
                             "--json", str(out_json), "--png", str(png)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["setting", "model", "estimator", "probe"]
    rows = {(line.split()[1], line.split()[2]): line.split() for line in lines[1:] if line.startswith("vit_s")}
    assert set(rows) == {(m, e) for m in ("no_mixing", "permuted") for e in ("joint", "residual")}
    assert float(rows["no_mixing", "joint"][7]) < -0.1 and abs(float(rows["no_mixing", "residual"][7])) < 0.002
    assert float(rows["permuted", "residual"][9]) > 0.4  # mean ISI over block_1 .. norm
    assert png.stat().st_size > 10_000
    benchmark_isi_bias.main(["--replot", str(out_json), "--png", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").stat().st_size > 10_000
