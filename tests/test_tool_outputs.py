"""No command overwrites what it did not write (issue #10): every tool that writes refuses, with exit 2 and one
`error:` line naming the path, a target that is one of its inputs or that exists and is not its own earlier
output, leaves it byte-identical, and still reruns into its own previous output (ablations/outputs.py)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from ablations import sweep
from ablations.outputs import OutputError, check_output
from tests.test_analyze import TINY_TIMM
from tests.test_report import make_run
from tools import analyze, benchmark_diagnostics, model_table, report

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_digits.yaml"


def contents(*paths: Path) -> dict[Path, bytes | None]:
    """Every file under `paths` with its bytes (folders: None), to compare before and after."""
    found: dict[Path, bytes | None] = {}
    for path in paths:
        for item in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
            found[item] = None if item.is_dir() else item.read_bytes()
    return found


def refused(main, argv: list[str], capsys, target: Path | str, why: str) -> str:
    """`main(argv)` exits 2 with one `error:` line that names `target` and says `why`; returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: refusing to "), err
    assert f" {target} (" in err and why in err, err
    return err


# --- the helper ----------------------------------------------------------------------------------------------

def test_check_output_compares_resolved_paths_and_hard_links(tmp_path):
    recipe = tmp_path / "a.yaml"
    recipe.write_text("model:\n  depth: 2\n")
    (tmp_path / "link.yaml").symlink_to(recipe)
    os.link(recipe, tmp_path / "hard.yaml")
    for alias in ("link.yaml", "hard.yaml", "sub/../a.yaml"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(OutputError, match="one of this command's inputs"):
            check_output(tmp_path / alias, "--json", inputs=[recipe], own=lambda _: True)
    empty = tmp_path / "empty.json"
    empty.touch()
    assert check_output(empty, "--json") == empty  # nothing in it to lose
    with pytest.raises(OutputError, match="it holds the input"):
        check_output(tmp_path, "--out", inputs=[recipe], folder=True, own=lambda _: True, replaces=True)


# --- tools/model_table.py ------------------------------------------------------------------------------------

@pytest.fixture
def recipe_copies(tmp_path, monkeypatch):
    """recipes/vit_b.yaml, its base and recipes/vit_b_grouped_mlp.yaml (whose base is vit_b.yaml) copied to tmp_path, the
    working directory."""
    (tmp_path / "recipes").mkdir()
    for name in ("imagenet_deit.yaml", "vit_b.yaml", "vit_b_grouped_mlp.yaml"):
        shutil.copy(ROOT / "recipes" / name, tmp_path / "recipes" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "recipes"


def test_model_table_json_as_a_switch_does_not_overwrite_the_recipe(recipe_copies, capsys):
    """The reported command: --json read as a switch takes recipes/vit_b.yaml as its PATH."""
    before = contents(recipe_copies)
    refused(model_table.main, ["--json", "recipes/vit_b.yaml", "recipes/vit_b_grouped_mlp.yaml"], capsys,
            "recipes/vit_b.yaml", "it exists and is not a JSON table written by tools/model_table.py")
    assert contents(recipe_copies) == before


def test_model_table_refuses_an_input_a_folder_and_an_unrelated_file(recipe_copies, tmp_path, capsys):
    grouped = "recipes/vit_b_grouped_mlp.yaml"
    notes = tmp_path / "notes.json"
    notes.write_text('{"models": "mine"}')
    before = contents(recipe_copies, notes)
    refused(model_table.main, [grouped, "--no-throughput", "--json", "recipes/../" + grouped], capsys,
            "recipes/../" + grouped, "it is one of this command's inputs")
    refused(model_table.main, ["vit_tiny_patch16_224", "--no-throughput", "--json", "recipes"], capsys,
            "recipes", "it is a folder, not a file")
    refused(model_table.main, ["vit_tiny_patch16_224", "--no-throughput", "--json", str(notes)], capsys,
            notes, "it exists and is not a JSON table")
    assert contents(recipe_copies, notes) == before


def test_model_table_rewrites_its_own_table(tmp_path):
    table = tmp_path / "table.json"
    table.touch()  # an empty file holds nothing to lose
    model_table.main(["vit_tiny_patch16_224", "--no-throughput", "--json", str(table)])
    first = json.loads(table.read_text())
    model_table.main(["vit_tiny_patch16_224_grouped_mlp", "--no-throughput", "--json", str(table)])
    second = json.loads(table.read_text())
    assert [r["name"] for r in first["models"]] == ["vit_tiny_patch16_224"]
    assert [r["name"] for r in second["models"]] == ["vit_tiny_patch16_224_grouped_mlp"]


# --- tools/analyze.py ----------------------------------------------------------------------------------------

def test_analyze_refuses_its_run_dir_a_file_and_a_foreign_folder(tmp_path, capsys):
    run = make_run(tmp_path, "run", [], 90.0)  # refused before anything is loaded: no checkpoint needed
    other = make_run(tmp_path, "other", [], 80.0)
    recipe = tmp_path / "vit_b.yaml"
    shutil.copy(ROOT / "recipes" / "vit_b.yaml", recipe)
    before = contents(tmp_path)
    refused(analyze.main, ["--run", str(run), "--output", str(run)], capsys, run, "one of this command's inputs")
    refused(analyze.main, ["--run", str(run), "--output", str(other)], capsys, other,
            "it exists and is not empty and not a folder tools/analyze.py wrote")
    refused(analyze.main, [*TINY_TIMM, "--output", str(recipe)], capsys, recipe, "it is a file, not a folder")
    assert contents(tmp_path) == before


def test_analyze_reruns_into_its_own_folder(tmp_path):
    out = tmp_path / "analysis"
    for pe_scale in ("1", "0"):
        analyze.main([*TINY_TIMM, "diagnostics.metrics=[token_similarity]", "diagnostics.probe_size=24",
                      "--pe-scale", pe_scale, "--output", str(out)])
        (record,) = json.loads((out / "analysis.json").read_text())["records"]
        assert record["pe_scale"] == float(pe_scale)
    assert {p.name for p in out.iterdir()} == {"analysis.json", "phase_curves.png"}


# --- tools/report.py -----------------------------------------------------------------------------------------

def test_report_refuses_its_input_a_file_and_a_foreign_folder_with_plots(tmp_path, capsys):
    run = make_run(tmp_path / "runs", "vit-seed0", ["train.seed=0"], 90.0)
    paper = tmp_path / "paper"
    (paper / "plots").mkdir(parents=True)
    (paper / "plots" / "figure1.png").write_bytes(b"not the report's")
    (paper / "main.tex").write_text("\\section{Results}\n")
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    before = contents(tmp_path)
    refused(report.main, [str(run), "--out", str(run)], capsys, run, "one of this command's inputs")
    refused(report.main, [str(run), "--out", str(paper)], capsys, paper,
            "it exists and is not empty and not a folder tools/report.py wrote")
    refused(report.main, [str(run), "--out", str(notes)], capsys, notes, "it is a file, not a folder")
    assert contents(tmp_path) == before


def test_report_reruns_into_its_own_folder_but_never_deletes_an_input_in_it(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "vit-seed0", ["train.seed=0"], 90.0, evals=[{"step": 5, "epoch": 1, "top1": 90.0}])
    for _ in range(2):  # the default --out, <path>/report; plots/ and tb_hparams/ are rewritten
        assert report.main([str(runs)]) == 0
        assert (runs / "report" / "plots" / "accuracy_curves.png").is_file()
    assert "Regenerate with: `python tools/report.py" in (runs / "report" / "report.md").read_text()
    inside = make_run(runs / "report" / "plots", "kept", [], 70.0)
    capsys.readouterr()
    before = contents(inside)
    refused(report.main, [str(inside), "--out", str(runs / "report")], capsys, runs / "report" / "plots",
            f"it holds the input {inside}")
    assert contents(inside) == before


# --- ablations/sweep.py --------------------------------------------------------------------------------------

def finishing_command(recipe, overrides, run_dir, *args, **kwargs):
    """Stands in for the trainer: marks the run finished at once (the runner's bookkeeping is what is tested)."""
    code = (f"import json, pathlib; p = pathlib.Path({str(run_dir)!r}); p.mkdir(parents=True, exist_ok=True); "
            "(p / 'summary.json').write_text(json.dumps({'status': 'finished'}))")
    return [sys.executable, "-c", code]


def write_sweep(path: Path, output: Path, base: Path = DEMO) -> Path:
    path.write_text(yaml.safe_dump({"base": str(base), "output": str(output), "grid": {"model.depth": [1]}}))
    return path


def test_sweep_refuses_a_foreign_output_and_a_snapshot_over_its_base(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "train_command", finishing_command)
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    path = write_sweep(tmp_path / "s.yaml", foreign)
    before = contents(tmp_path)
    refused(sweep.main, [str(path)], capsys, foreign, "it exists and is not empty and not a sweep's output folder")
    refused(sweep.main, [str(path), "--output", str(path)], capsys, path, "one of this command's inputs")
    assert sweep.main([str(path), "--dry-run"]) == 0  # a dry run writes nothing; it warns
    assert f"warning: refusing to overwrite {foreign} (output)" in capsys.readouterr().out
    assert contents(tmp_path) == before

    out = tmp_path / "out"  # the base recipe is where the point's snapshot would go
    base = out / "recipes" / "depth1.yaml"
    base.parent.mkdir(parents=True)
    base.write_text(f"base: {DEMO}\nmodel:\n  embed_dim: 16\n  num_heads: 2\n")
    path = write_sweep(tmp_path / "s2.yaml", out, base)
    before = contents(out)
    refused(sweep.main, [str(path)], capsys, base, "one of this command's inputs")
    assert contents(out) == before


def test_sweep_reruns_into_its_own_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "train_command", finishing_command)
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", out)
    assert sweep.main([str(path)]) == 0
    (out / "report").mkdir()  # what tools/report.py adds by default: still the sweep's folder (sweep.json)
    assert sweep.main([str(path)]) == 0
    assert (out / "recipes" / "depth1.yaml").read_text().startswith("# sweep s, point depth1:")
    assert [p["status"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["done"]


# --- tools/benchmark_diagnostics.py --------------------------------------------------------------------------

@pytest.fixture
def fake_runs(monkeypatch):
    """timed_run without training: makes the run dir and returns made-up numbers; the run dirs it was given."""
    given = []

    def timed_run(recipe, overrides, output):
        given.append(output)
        output.mkdir(parents=True)
        (output / "summary.json").write_text("{}")
        return {"wall_s": 1.0, "process_s": 2.0, "cpu_s": 2.0, "top1": 50.0, "evaluations": 1, "diagnostics_s": 0.1}

    monkeypatch.setattr(benchmark_diagnostics, "timed_run", timed_run)
    return given


def test_benchmark_diagnostics_keeps_runs_only_in_new_run_dirs(tmp_path, capsys, fake_runs):
    keep = tmp_path / "keep"
    (keep / "with_0").mkdir(parents=True)
    (keep / "with_0" / "summary.json").write_text('{"status": "finished"}')
    recipe = tmp_path / "demo.yaml"
    shutil.copy(DEMO, recipe)
    before = contents(tmp_path)
    refused(benchmark_diagnostics.main, ["--repeats", "1", "--keep", str(keep)], capsys, keep / "with_0",
            "it exists and is not empty")
    refused(benchmark_diagnostics.main, ["--recipe", str(recipe), "--keep", str(recipe)], capsys, recipe,
            "one of this command's inputs")
    assert contents(tmp_path) == before and fake_runs == []

    shutil.rmtree(keep / "with_0")
    (keep / "notes.txt").write_text("mine\n")  # anything else in --keep is left alone
    benchmark_diagnostics.main(["--repeats", "1", "--keep", str(keep)])
    assert fake_runs == [keep / "without_0", keep / "with_0"] and (keep / "notes.txt").read_text() == "mine\n"
    assert "overhead" in capsys.readouterr().out
    # A rerun into the same --keep would have to start over its own runs, which the trainer refuses: exit 2 first.
    refused(benchmark_diagnostics.main, ["--repeats", "1", "--keep", str(keep)], capsys, keep / "without_0",
            "it exists and is not empty")
