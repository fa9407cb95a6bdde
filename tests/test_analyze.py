"""tools/analyze.py: run dirs, random-init timm ViTs, overlays, the PE-scale option and user errors."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch

from diagnostics.records import PER_STAGE_KEYS
from tests.test_diagnostics_callback import ALL_METRICS, tiny_train
from tools.analyze import main as analyze

PROBE = [ALL_METRICS, "diagnostics.probe_size=120", "diagnostics.isi_pca_rank=4",
         "diagnostics.isi_ridge_grid=[0.001,0.1,10]", "diagnostics.plasticity_pairs=16"]
TINY_TIMM = ["--timm-model", "vit_tiny_patch16_224", "--set", "model.img_size=16", "model.patch_size=4",
             "model.embed_dim=32", "model.depth=3", "model.num_heads=2", "model.num_classes=10", *PROBE]
PNGS = {"phase_curves.png", "isi.png", "attention.png", "neural_collapse.png", "plasticity.png"}


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Two 2-step digits runs (different seeds) with an EMA."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        tiny_train(["data.source=digits", "train.max_steps=2", "train.ema_decay=0.9", f"train.seed={seed}"],
                   root / f"seed{seed}")
    return root / "seed0", root / "seed1"


def records(output: Path) -> list[dict]:
    return json.loads((output / "analysis.json").read_text())["records"]


def test_a_run_dir_gives_a_record_pngs_and_a_table(run_dirs, tmp_path, capsys):
    analyze(["--run", str(run_dirs[0]), "--output", str(tmp_path), "--set", *PROBE])
    (record,) = records(tmp_path)
    assert record["label"] == "seed0" and record["trigger"] == "offline" and record["step"] == 2
    assert record["stages"] == ["embed", "pe", "block_1", "block_2", "norm"] and record["probe_size"] == 120
    for metric, keys in PER_STAGE_KEYS.items():
        assert all(len(record[metric][key]) == 5 for key in keys), metric
    assert record["source"]["weights"].endswith("step_00000002/model.safetensors")
    assert PNGS <= {path.name for path in tmp_path.iterdir()}
    out = capsys.readouterr().out
    assert "== seed0: 120 probe images" in out and "phases: cliff_end" in out and "analysis.json" in out
    assert out.count("\nblock_") == 2


def test_two_runs_and_the_ema_weights_are_overlaid(run_dirs, tmp_path):
    analyze(["--run", str(run_dirs[0]), "--run", str(run_dirs[1]), "--model", "ema", "--output", str(tmp_path),
             "--set", *PROBE])
    first, second = records(tmp_path)
    assert (first["label"], second["label"]) == ("seed0 ema", "seed1 ema")
    assert first["model"] == "ema" and first["source"]["weights"].endswith("ema.safetensors")
    assert first["token_similarity"]["centered"] != second["token_similarity"]["centered"]
    assert PNGS <= {path.name for path in tmp_path.iterdir()}


def test_random_init_timm_vit_on_digits(tmp_path):
    """science.md: at random init attention is near uniform, so CLS centrality × tokens ≈ 1."""
    analyze([*TINY_TIMM, "--output", str(tmp_path)])
    (record,) = records(tmp_path)
    assert record["label"] == "vit_tiny_patch16_224 random init" and record["step"] is None
    assert record["source"]["kwargs"]["depth"] == 3 and len(record["stages"]) == 6
    ratios = [r for r in record["attention"]["cls_centrality_ratio"] if r is not None]
    assert len(ratios) == 3 and all(abs(r - 1) < 0.05 for r in ratios)
    assert PNGS <= {path.name for path in tmp_path.iterdir()}


def test_pe_scale_zero_removes_the_position_embedding(tmp_path):
    analyze([*TINY_TIMM, "diagnostics.metrics=[token_similarity]", "--pe-scale", "0", "--output", str(tmp_path)])
    (record,) = records(tmp_path)
    assert record["pe_scale"] == 0 and record["label"].endswith("pe_scale=0")
    centered = record["token_similarity"]["centered"]
    assert centered[1] == pytest.approx(centered[0], abs=1e-7)  # pe == embed for the patch tokens
    # no drop at pe; the random-init blocks move S_c by ~1e-4 at most, so the cliff (argmin over pe, block_1,
    # block_2) is no larger than that
    assert record["pe_dominance"] == 0 and 0 <= record["phases"]["cliff_size"] < 1e-3
    assert {path.name for path in tmp_path.iterdir()} == {"analysis.json", "phase_curves.png"}


def test_a_random_init_is_the_seeds_whatever_ran_before(tmp_path):
    runs = []
    for name in ("a", "b"):
        analyze([*TINY_TIMM, "diagnostics.metrics=[token_similarity]", "--output", str(tmp_path / name)])
        runs.append(records(tmp_path / name)[0]["token_similarity"]["centered"])
        torch.rand(7)  # the global RNG moves on between the calls
    assert runs[0] == runs[1]


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        analyze(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_user_errors_are_one_line_exit_2(run_dirs, tmp_path, capsys, monkeypatch):
    out = ["--output", str(tmp_path / "out")]
    assert "run directory not found: /no/such/run" in error_of(["--run", "/no/such/run", *out], capsys)
    assert "checkpoint not found: /no/ckpt" in error_of(["--run", str(run_dirs[0]), "--checkpoint", "/no/ckpt",
                                                         *out], capsys)
    assert "'vit_nonexistent' is not a timm model" in error_of(["--timm-model", "vit_nonexistent", *out], capsys)
    assert "unknown key 'probe_sise'" in error_of(["--run", str(run_dirs[0]), "--set", "diagnostics.probe_sise=3",
                                                   *out], capsys)
    assert "--checkpoint needs exactly one --run" in error_of(["--timm-model", "m", "--checkpoint", "x", *out], capsys)
    assert "isi_stages: ['block_9']" in error_of(["--run", str(run_dirs[0]), "--set", ALL_METRICS,
                                                  "diagnostics.isi_stages=[block_9]", *out], capsys)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_torch_hub"))
    assert "are not cached locally" in error_of(["--timm-model", "vit_tiny_patch16_224", "--pretrained", *out], capsys)
    assert not (tmp_path / "out").exists()
