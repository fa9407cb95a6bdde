"""Recipes: inheritance, overrides, validation messages, round trips, and every shipped recipe."""

import subprocess
import sys
from pathlib import Path

import pytest

from models import count_parameters, create_vit_from_recipe
from tests.conftest import DEMO_RECIPE
from trainer.recipe import RecipeError, dump_recipe, flatten_recipe, load_recipe, save_recipe
from trainer.recipe_schema import Recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_train_cli(*args: str) -> subprocess.CompletedProcess:
    """`python trainer/train.py ARGS --print-recipe` as a process (what a user runs)."""
    return subprocess.run([sys.executable, str(ROOT / "trainer" / "train.py"), *args, "--print-recipe"],
                          capture_output=True, text=True, cwd=ROOT)


def call_train_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same entry point called in this process (`trainer.train.main`, its error handling included):
    the recipe errors need no fresh interpreter, and each would cost one (~3.5 s of imports)."""
    from trainer.train import main

    try:
        main([*args, "--print-recipe"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_defaults_live_in_the_schema(tmp_path):
    recipe = load_recipe(write(tmp_path / "empty.yaml", ""))
    assert recipe == Recipe()
    assert recipe.optim.lr == 1e-3 and recipe.augment.repeated_aug == 3 and recipe.train.ema_decay == 0.9998


def test_base_inheritance_deep_merges_relative_to_the_recipe_folder(tmp_path):
    write(tmp_path / "bases" / "root.yaml", "optim:\n  lr: 0.01\n  weight_decay: 0.2\n  betas: [0.8, 0.9]\n"
                                             "model:\n  kwargs: {qkv_bias: false}\n")
    write(tmp_path / "bases" / "mid.yaml", "base: root.yaml\noptim:\n  weight_decay: 0.1\n")
    child = write(tmp_path / "child.yaml", "base: bases/mid.yaml\noptim:\n  betas: [0.9, 0.95]\n"
                                           "model:\n  kwargs: {qk_norm: true}\n")
    recipe = load_recipe(child)
    assert recipe.optim.lr == 0.01  # from the grandparent
    assert recipe.optim.weight_decay == 0.1  # the parent overrides the grandparent
    assert recipe.optim.betas == [0.9, 0.95]  # lists replace, they do not merge
    assert recipe.model.kwargs == {"qkv_bias": False, "qk_norm": True}  # mappings merge


def test_dotted_overrides_are_parsed_as_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", ""), [
        "optim.lr=5e-4", "variant.kind=grouped_mlp", "train.ema_decay=null", "train.compile=true",
        "optim.betas=[0.9, 0.98]", "model.kwargs.qk_norm=true", "schedule.warmup_epochs=2"])
    assert recipe.optim.lr == 5e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.variant.kind == "grouped_mlp" and recipe.train.ema_decay is None
    assert recipe.train.compile is True and recipe.optim.betas == [0.9, 0.98]
    assert recipe.model.kwargs == {"qk_norm": True}
    assert recipe.schedule.warmup_epochs == 2.0 and isinstance(recipe.schedule.warmup_epochs, float)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    assert load_recipe(write(tmp_path / "r.yaml", "optim:\n  lr: 1e-3\n")).optim.lr == 1e-3


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: fast\n", "optim.lr = 'fast' has the wrong type: expected a number"),
    ("schedule:\n  epochs: 1.5\n", "schedule.epochs = 1.5 has the wrong type: expected an integer"),
    ("train:\n  precision: fp8\n", "train.precision = 'fp8' is not a valid choice: expected one of 'bf16', 'fp16', 'no'"),
    ("optim:\n  lr: 0\n", "optim.lr = 0.0 is out of range: expected > 0"),
    ("augment:\n  hflip: 1.5\n", "augment.hflip = 1.5 is out of range: expected <= 1"),
    ("diagnostics:\n  metrics: [isi, scrambling]\n", "unknown item 'scrambling'"),
    ("augment:\n  scale: [1.0, 0.5]\n", "augment.scale = [1.0, 0.5] must be [low, high]"),
    ("variant:\n  kind: truncated\n", "needs variant.keep_depth"),
    ("optim: 3\n", "section 'optim' must be a mapping"),
    ("- a\n- b\n", "a recipe must be a mapping of sections"),
])
def test_invalid_values_name_the_key_the_value_and_the_expectation(tmp_path, text, message):
    with pytest.raises(RecipeError, match=None) as err:
        load_recipe(write(tmp_path / "bad.yaml", text))
    assert message in str(err.value)
    assert str(tmp_path / "bad.yaml") in str(err.value)


def test_errors_name_the_file_that_set_the_key(tmp_path):
    write(tmp_path / "parent.yaml", "optim:\n  lr: -1\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\n")
    with pytest.raises(RecipeError, match="parent.yaml: optim.lr = -1.0 is out of range"):
        load_recipe(child)


def test_inheritance_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_round_trips_through_its_resolved_form(tmp_path, path):
    recipe = load_recipe(path)
    save_recipe(recipe, tmp_path / "recipe.yaml", header=f"resolved from {path.name}")
    assert load_recipe(tmp_path / "recipe.yaml") == recipe
    assert (tmp_path / "recipe.yaml").read_text().startswith("# resolved from")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_builds_its_model(path):
    recipe = load_recipe(path)
    full = create_vit_from_recipe(recipe, device="meta")  # full size, no weights allocated
    assert count_parameters(full) > 0
    assert full.head.out_features == recipe.model.num_classes
    if recipe.variant.kind == "grouped_mlp":
        assert full.blocks[1].mlp is full.blocks[0].mlp
    if recipe.model.depth is not None:
        assert len(full.blocks) == recipe.model.depth
    # ...and really builds at reduced size through the same path.
    small = load_recipe(path, ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
                               "model.num_heads=2"])
    model = create_vit_from_recipe(small)
    assert type(model.blocks[0].mlp) is type(full.blocks[0].mlp)


def test_p2_recipes_reproduce_the_published_parameter_counts():
    counts = {name: count_parameters(create_vit_from_recipe(load_recipe(ROOT / "recipes" / name), device="meta"))
              for name in ("vit_b.yaml", "vit_b_grouped_mlp.yaml", "vit_b_shallow_mlp.yaml", "vit_b_thin_mlp.yaml")}
    assert counts == {"vit_b.yaml": 86_567_656, "vit_b_grouped_mlp.yaml": 58_233_064,
                      "vit_b_shallow_mlp.yaml": 58_237_672, "vit_b_thin_mlp.yaml": 58_237_672}


def test_flatten_recipe_is_scalar_valued():
    flat = flatten_recipe(load_recipe(ROOT / "recipes" / "vit_b.yaml"))
    assert flat["optim.lr"] == 1e-3 and flat["augment.mean"] == "[0.5, 0.5, 0.5]"
    assert all(isinstance(v, int | float | str | bool) for v in flat.values())


def test_dump_is_readable_yaml_in_schema_order():
    text = dump_recipe(Recipe())
    sections = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert sections[:3] == ["model:", "variant:", "data:"]
    assert "  betas: [0.9, 0.999]" in text


# The command line's entry point: one message on stderr, exit code 2, no traceback (a real process below).
@pytest.mark.parametrize("recipe_text, overrides, message", [
    ("trainer:\n  seed: 1\n", [], "unknown section 'trainer' (did you mean 'train'?)"),
    ("lr: 0.1\n", [], "unknown section 'lr' (did you mean 'optim.lr'?)"),
    ("optim:\n  weight_decy: 0.1\n", [], "unknown key 'weight_decy' in section 'optim' (did you mean 'weight_decay'?)"),
    ("optim:\n  lr: [1]\n", [], "optim.lr = [1] has the wrong type: expected a number"),
    ("train:\n  batch_size: 0\n", [], "train.batch_size = 0 is out of range: expected >= 1"),
    ("base: no_such_base.yaml\n", [], "base recipe not found: "),
    ("", ["--set", "optim.lrr=1"], "--set optim.lrr=1: unknown key 'lrr' in section 'optim' (did you mean 'lr'?)"),
    ("", ["--set", "optim.lr"], "--set 'optim.lr': expected section.key=value"),
])
def test_cli_reports_recipe_errors_with_exit_code_2(tmp_path, capsys, recipe_text, overrides, message):
    recipe = write(tmp_path / "r.yaml", recipe_text)
    result = call_train_main(capsys, "--recipe", str(recipe), *overrides)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_cli_reports_a_missing_recipe_file(tmp_path):
    result = run_train_cli("--recipe", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and f"recipe file not found: {tmp_path / 'nope.yaml'}" in result.stderr


def test_cli_prints_the_resolved_recipe_with_overrides(capsys):
    result = call_train_main(capsys, "--recipe", str(ROOT / "recipes" / "vit_b_grouped_mlp.yaml"), "--set", "optim.lr=5e-4")
    assert result.returncode == 0, result.stderr
    assert "kind: grouped_mlp" in result.stdout and "lr: 0.0005" in result.stdout


def test_an_unquoted_yaml_boolean_for_a_word_choice_says_to_quote_it():
    with pytest.raises(RecipeError, match=r"diagnostics.tensorboard_images = False is not a valid choice: expected "
                                          r"one of .*\(YAML reads on/off/yes/no as booleans: quote the word\)"):
        load_recipe(DEMO_RECIPE, ["diagnostics.tensorboard_images=off"])
    # `precision: no` is how accelerate users write it: YAML's false means the choice "no"
    assert load_recipe(DEMO_RECIPE, ["train.precision=bf16", "train.precision=no"]).train.precision == "no"
    with pytest.raises(RecipeError, match=r"train.batch_size = True has the wrong type: expected an integer$"):
        load_recipe(DEMO_RECIPE, ["train.batch_size=yes"])
