"""Sweep files: expansion (grid, zip, seeds, labels), validation, and the run-dir safety checks."""

import json
from pathlib import Path

import pytest

from ablations import sweep
from ablations.sweep_spec import SweepError, expand, load_sweep
from trainer.recipe import load_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "demo_digits.yaml"


def sweep_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {BASE}\noutput: {tmp_path / 'out'}\n{body}")
    return path


def test_grid_is_a_product_with_seeds_and_labelled_names(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, "grid:\n  variant.kind: [none, grouped_mlp]\n  model.depth: [2, 4]\n"
                                           "seeds: [0, 1]\n"))
    points = expand(spec)
    assert [p.name for p in points] == [
        "none-depth2-seed0", "none-depth2-seed1", "none-depth4-seed0", "none-depth4-seed1",
        "grouped_mlp-depth2-seed0", "grouped_mlp-depth2-seed1", "grouped_mlp-depth4-seed0", "grouped_mlp-depth4-seed1"]
    p = points[-1]
    assert (p.recipe.variant.kind, p.recipe.model.depth, p.recipe.train.seed) == ("grouped_mlp", 4, 1)
    assert p.overrides == ["variant.kind=grouped_mlp", "model.depth=4", "train.seed=1"]
    assert p.labels == {"variant.kind": "grouped_mlp", "model.depth": "depth4", "train.seed": "seed1"}


def test_zip_steps_axes_together_and_combines_with_the_grid(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, "zip:\n  model.embed_dim: [32, 64]\n  model.num_heads: [2, 4]\n"
                                           "grid:\n  optim.lr: [0.001, 0.01]\n"))
    points = expand(spec)
    assert [p.name for p in points] == ["lr0.001-embed_dim32", "lr0.001-embed_dim64",
                                        "lr0.01-embed_dim32", "lr0.01-embed_dim64"]
    assert {(p.recipe.model.embed_dim, p.recipe.model.num_heads) for p in points} == {(32, 2), (64, 4)}


def test_mapping_axes_label_list_values(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, "grid:\n  optim.trainable:\n    MHA: ['blocks.*.attn.*', 'head.*']\n"
                                           "    full: []\n"))
    points = expand(spec, ["schedule.epochs=2"])
    assert [p.name for p in points] == ["MHA", "full"]
    assert points[0].recipe.optim.trainable == ["blocks.*.attn.*", "head.*"]
    assert points[1].recipe.optim.trainable == [] and points[1].recipe.schedule.epochs == 2


@pytest.mark.parametrize("body, message", [
    ("grids:\n  a: [1]\n", "unknown sweep key 'grids' (did you mean 'grid'?)"),
    ("zip:\n  model.depth: [1, 2]\n  model.embed_dim: [8]\n", "zip axes must have equal lengths"),
    ("grid:\n  optim.lrr: [0.1]\n", "point 'lrr0.1': --set optim.lrr=0.1: unknown key 'lrr' in section 'optim'"),
    ("grid:\n  optim.lr: [-1]\n", "optim.lr = -1.0 is out of range"),
    ("grid:\n  optim.betas: [[0.9, 0.99]]\n", "give list- or mapping-valued points labels"),
    ("seeds: 3\n", "seeds = 3 must be a list of integers"),
    ("mode: finetune\n", "mode = 'finetune' is not one of train, evaluate"),
])
def test_bad_sweeps_are_clear_errors(tmp_path, body, message):
    with pytest.raises(SweepError) as err:
        expand(load_sweep(sweep_file(tmp_path, body)))
    assert message in str(err.value)


def test_missing_base_recipe_is_named(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: nowhere.yaml\n")
    with pytest.raises(SweepError, match=f"base recipe not found: {tmp_path / 'nowhere.yaml'}"):
        load_sweep(path)


def test_dry_run_lists_points_and_state(tmp_path, capsys):
    path = sweep_file(tmp_path, "grid:\n  model.depth: [2, 4]\n")
    out = tmp_path / "out" / "runs"
    # depth2 finished earlier; depth4 was interrupted (recipe saved, no final summary).
    for name, status in (("depth2", "finished"), ("depth4", None)):
        (out / name).mkdir(parents=True)
        save_recipe(load_recipe(BASE, [f"model.depth={name[-1]}"]), out / name / "recipe.yaml")
        if status:
            (out / name / "summary.json").write_text(json.dumps({"status": status}))
    assert sweep.main([str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 points" in printed
    assert "depth2" in printed and "[done]" in printed and "[resume]" in printed and "model.depth=4" in printed


def test_refuses_to_clobber_a_run_dir_with_a_different_recipe(tmp_path, capsys):
    path = sweep_file(tmp_path, "grid:\n  model.depth: [2]\n")
    run_dir = tmp_path / "out" / "runs" / "depth2"
    run_dir.mkdir(parents=True)
    save_recipe(load_recipe(BASE, ["model.depth=2", "optim.lr=0.5"]), run_dir / "recipe.yaml")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([str(path), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"run dir {run_dir} holds a different recipe" in err and f"(saved -> sweep: optim.lr: 0.5 -> {load_recipe(BASE).optim.lr!r})" in err
