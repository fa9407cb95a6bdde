"""tools/report.py on hand-made run dirs: seed grouping, mean ± std, missing diagnostics, evaluate mode."""

import csv
import json
import statistics
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ablations.aggregate import Stat, combine, diagnostics_values, find_runs, group_runs
from tools import report
from tools.report_table import COLUMNS, fmt_count, format_stat
from trainer.recipe import load_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_digits.yaml"
STAGES = ["embed", "pe", "block_1", "block_2", "block_3", "norm"]


def diagnostics_record(step, isi=None, centrality=None, model="raw"):
    record = {
        "step": step, "epoch": step / 10, "model": model, "trigger": "checkpoint", "probe_size": 64,
        "num_processes": 1, "elapsed_s": 0.1, "stages": STAGES,
        "token_similarity": {"raw": [0.2, 0.1, 0.1, 0.1, 0.2, 0.3],
                             "centered": [0.02, -0.004, -0.003, -0.003, 0.01, 0.02]},
        "pe_dominance": 0.5,
        "phases": {"cliff_end": "pe", "cliff_size": 0.024, "tau": 0.005, "plateau_start": "pe",
                   "plateau_end": "block_2", "plateau_length": 3, "plateau_median": -0.003,
                   "climb_start": "block_3", "tau_sensitivity": []},
    }
    if isi is not None:
        record["isi"] = {"isi": isi, "r2_self": [1.0] * 6, "r2_all": [1.0] * 6}
    if centrality is not None:
        record["attention"] = {"cls_centrality": centrality}
    return record


def make_run(root: Path, name: str, overrides: list[str], top1: float | None, ema: float | None = None,
             diagnostics: list[dict] = (), evals: list[dict] = (), mode: str = "train", extra: dict | None = None):
    run = root / name
    run.mkdir(parents=True)
    save_recipe(load_recipe(DEMO, overrides), run / "recipe.yaml")
    summary = {"status": "finished", "params": 304970, "macs_linear": 5063296, "train_throughput_img_s": 800.0,
               "raw": None if top1 is None else {"top1_final": top1, "top1_best": top1 + 0.5, "best_epoch": 20.0,
                                                  "top5_final": 99.0, "top5_best": 99.5, "peak_to_final": 0.5},
               "ema": None if ema is None else {"top1_final": ema, "top1_best": ema, "best_epoch": 30.0,
                                                "top5_final": 99.0, "top5_best": 99.0, "peak_to_final": 0.0},
               **({"mode": mode} if mode != "train" else {}), **(extra or {})}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "eval", **e}) + "\n" for e in evals))
    if diagnostics:
        (run / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diagnostics))
    return run


@pytest.fixture
def sweep_dir(tmp_path):
    """A sweep with variants A (3 seeds, with diagnostics) and B (2 seeds, none), and its sweep.json."""
    out = tmp_path / "sweep"
    points = []
    a_top1, b_top1 = [80.95, 81.05, 81.15], [70.0, 72.0]
    for seed, top1 in enumerate(a_top1):
        make_run(out / "runs", f"A-seed{seed}", ["model.depth=3", f"train.seed={seed}"], top1, ema=top1 + 1,
                 diagnostics=[diagnostics_record(5, isi=[0.0, 0.001, 0.004, 0.5, 0.003, 0.9],
                                                 centrality=[None, None, 0.3, 0.2, 0.1, None]),
                              diagnostics_record(10, isi=[0.0, 0.001, 0.004, 0.006 + seed * 0.001, 0.003, 0.9],
                                                 centrality=[None, None, 0.3, 0.2, 0.1 * (seed + 1), None])],
                 evals=[{"step": 5, "epoch": 1, "top1": top1 - 5, "top1_ema": top1 - 4},
                        {"step": 10, "epoch": 2, "top1": top1, "top1_ema": top1 + 1}])
        points.append({"name": f"A-seed{seed}", "run_dir": f"runs/A-seed{seed}",
                       "labels": {"model.depth": "A", "train.seed": f"seed{seed}"}})
    for seed, top1 in enumerate(b_top1):
        make_run(out / "runs", f"B-seed{seed}", ["model.depth=2", f"train.seed={seed}"], top1, ema=top1 + 1,
                 evals=[{"step": 10, "epoch": 2, "top1": top1, "top1_ema": top1 + 1}])
        points.append({"name": f"B-seed{seed}", "run_dir": f"runs/B-seed{seed}",
                       "labels": {"model.depth": "B", "train.seed": f"seed{seed}"}})
    (out / "sweep.json").write_text(json.dumps({"name": "fixture", "mode": "train", "points": points}))
    return out, a_top1, b_top1


def test_runs_differing_only_in_seed_form_one_variant_with_mean_std_and_count(sweep_dir, capsys):
    out, a_top1, b_top1 = sweep_dir
    groups = group_runs(find_runs([out]))
    assert [(g.name, len(g.runs)) for g in groups] == [("A", 3), ("B", 2)]
    assert report.main([str(out)]) == 0
    printed = capsys.readouterr().out
    # brute force: 80.95, 81.05, 81.15 -> mean 81.05, sample std 0.10
    assert f"{statistics.fmean(a_top1):.2f} ± {statistics.stdev(a_top1):.2f} (n=3)" == "81.05 ± 0.10 (n=3)"
    assert "| A | 3 | 304.97K | 5.06M | 800 ± 0 | 81.05 ± 0.10 (n=3) |" in printed
    assert f"| B | 2 | 304.97K | 5.06M | 800 ± 0 | 71.00 ± {statistics.stdev(b_top1):.2f} (n=2) |" in printed
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "report" / "report.csv"))}
    assert float(rows["A"]["top1_final"]) == pytest.approx(statistics.fmean(a_top1))
    assert float(rows["A"]["top1_final_std"]) == pytest.approx(statistics.stdev(a_top1))
    assert rows["A"]["top1_final_n"] == "3" and float(rows["B"]["ema_top1_final"]) == pytest.approx(72.0)
    per_run = list(csv.DictReader(open(out / "report" / "runs.csv")))
    assert [r["run"] for r in per_run] == ["A-seed0", "A-seed1", "A-seed2", "B-seed0", "B-seed1"]
    assert [r["seed"] for r in per_run] == ["0", "1", "2", "0", "1"]


def test_diagnostics_columns_come_from_the_final_record_and_missing_ones_show_a_dash(sweep_dir, capsys):
    out, _, _ = sweep_dir
    report.main([str(out), "--no-plots", "--no-tensorboard"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| A |") or
             line.startswith("| B |")]
    a_cells, b_cells = ([c.strip() for c in line.strip("|").split(" | ")] for line in table)
    # final record (step 10): ISI at block_3 (the last block, not norm) = 0.003; max over blocks =
    # 0.006 + seed * 0.001 -> mean 0.007 ± 0.001; CLS centrality at block_3 = 0.1, 0.2, 0.3.
    assert a_cells[-6:] == ["pe", "3 ± 0", "block_3", "0.0030 ± 0.0000", "0.0070 ± 0.0010", "0.2000 ± 0.1000"]
    assert b_cells[-6:] == ["–"] * 6


def test_diagnostics_values_follow_the_record_format():
    values = diagnostics_values(diagnostics_record(3, isi=[0.0, None, 0.002, 0.009, 0.004, 0.5]))
    assert values == {"cliff_end": "pe", "cliff_size": 0.024, "plateau_length": 3, "climb_start": "block_3",
                      "pe_dominance": 0.5, "isi_last": 0.004, "isi_max": 0.009}
    assert diagnostics_values(None) == {}


def test_a_value_missing_in_one_seed_is_counted_out(tmp_path, capsys):
    make_run(tmp_path, "vit-seed0", ["train.seed=0"], 90.0)
    make_run(tmp_path, "vit-seed1", ["train.seed=1"], None)  # no evaluation yet
    report.main([str(tmp_path), "--no-plots", "--no-tensorboard"])
    assert "| vit | 2 | 304.97K | 5.06M | 800 ± 0 | 90.00 (n=1) |" in capsys.readouterr().out


def test_evaluate_runs_get_alpha_top1_and_cliff_size_sorted_by_alpha(tmp_path, capsys):
    for alpha, top1, cliff in ((1.0, 98.9, 0.0085), (0.0, 60.0, 0.0017), (0.5, 95.5, 0.0037)):
        make_run(tmp_path, f"pe{alpha}", [f"eval.pe_scale={alpha}", "model.checkpoint=x.safetensors"], top1,
                 mode="evaluate", extra={"pe_scale": alpha, "cliff_size": cliff, "cliff_end": "block_2",
                                         "pe_dominance": 0.28 * alpha})
    assert report.main([str(tmp_path), "--no-tensorboard"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| pe_scale=")]
    assert lines == ["| pe_scale=0.0 | 0 | 60.00 | 99.00 | 0.0017 | block_2 | 0.000 | – | – |",
                     "| pe_scale=0.5 | 0.5 | 95.50 | 99.00 | 0.0037 | block_2 | 0.140 | – | – |",
                     "| pe_scale=1.0 | 1 | 98.90 | 99.00 | 0.0085 | block_2 | 0.280 | – | – |"]
    assert (tmp_path / "report" / "plots" / "pe_scale.png").stat().st_size > 0


def test_best_of_keeps_the_best_learning_rate_per_component(tmp_path, capsys):
    for component, lrs in (("MHA", {0.01: 90.0, 0.03: 92.0}), ("LN1", {0.01: 88.0, 0.03: 85.0})):
        pattern = "blocks.*.attn.*" if component == "MHA" else "blocks.*.norm1.*"
        for lr, top1 in lrs.items():
            make_run(tmp_path, f"{component}-lr{lr}", [f"optim.trainable=['{pattern}', 'head.*']",
                                                        f"optim.lr={lr}"], top1)
    report.main([str(tmp_path), "--best-of", "optim.lr", "--no-plots", "--no-tensorboard"])
    printed = capsys.readouterr().out
    # trainable params, brute force for the demo ViT (width 64, 6 blocks, 10 classes): head 64*10+10 plus
    # per block attn.qkv 64*192+192 and attn.proj 64*64+64 (MHA), or norm1 64+64 (LN1)
    mha, ln1 = 650 + 6 * (64 * 192 + 192 + 64 * 64 + 64), 650 + 6 * 128
    assert f"| trainable=['blocks.*.attn.*', 'head.*'] (best lr=0.03) | 1 | 304.97K | {mha / 1e3:.2f}K | 5.06M | 800 " \
           "| 92.00 |" in printed
    assert f"| trainable=['blocks.*.norm1.*', 'head.*'] (best lr=0.01) | 1 | 304.97K | {ln1 / 1e3:.2f}K | 5.06M | 800 " \
           "| 88.00 |" in printed
    assert "85.00" not in printed and "| 90.00 |" not in printed


def test_figures_and_tensorboard_hparams_are_written(sweep_dir):
    out, _, _ = sweep_dir
    report.main([str(out), "--out", str(out / "r")])
    plots = out / "r" / "plots"
    for name in ("phase_curves.png", "isi_curves.png", "accuracy_curves.png", "phase_emergence/A-seed0.png"):
        assert (plots / name).stat().st_size > 1000, name
    assert not (plots / "phase_emergence" / "B-seed0.png").exists()  # no diagnostics records
    hparams = sorted(p.name for p in (out / "r" / "tb_hparams").iterdir() if p.is_dir())
    assert hparams == ["A-seed0", "A-seed1", "A-seed2", "B-seed0", "B-seed1"]
    events = EventAccumulator(str(out / "r" / "tb_hparams" / "A-seed1"))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert events.Scalars("hparam/top1_final")[0].value == pytest.approx(81.05)
    assert "![phase_curves](plots/phase_curves.png)" in (out / "r" / "report.md").read_text()


def test_paths_without_runs_are_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no run directories (folders with a recipe.yaml) found"


@pytest.mark.parametrize("values, expected", [
    ([81.0, 81.2], Stat(81.1, statistics.stdev([81.0, 81.2]), 2)), ([None, 5], Stat(5.0, None, 1)),
    ([None], Stat(None, None, 0)), (["pe", "pe", "block_1"], Stat("pe/block_1", None, 3)),
])
def test_combine_is_mean_sample_std_and_count(values, expected):
    got = combine(values)
    assert got.n == expected.n and got.mean == (pytest.approx(expected.mean) if isinstance(expected.mean, float)
                                                else expected.mean)
    assert got.std == (None if expected.std is None else pytest.approx(expected.std))


def test_number_formats():
    assert [fmt_count(v) for v in (86_567_656, 16.87e9, 304_970, 12)] == ["86.57M", "16.87G", "304.97K", "12"]
    assert format_stat(Stat(81.05, 0.11, 3), COLUMNS["top1_final"], 3) == "81.05 ± 0.11 (n=3)"
    assert format_stat(Stat(0.47, 0.02, 3), COLUMNS["ema_peak_to_final"], 3) == "0.47 ± 0.02"
    assert format_stat(Stat(58_233_064.0, 0.0, 3), COLUMNS["params"], 3) == "58.23M"
    assert format_stat(Stat(None), COLUMNS["isi_last"], 3) == "–"
    assert format_stat(Stat(-0.00001, None, 1), COLUMNS["isi_last"], 1) == "0.0000"
    assert format_stat(Stat(-0.0051, None, 1), COLUMNS["isi_last"], 1) == "-0.0051"
