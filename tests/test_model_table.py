"""tools/model_table.py: P2's table from timm names and recipes, JSON output, measured throughput."""

import json
import subprocess
import sys
from pathlib import Path

from tools import model_table

ROOT = Path(__file__).resolve().parents[1]


def test_table_reproduces_p2_from_names_and_recipes(tmp_path, capsys):
    out = tmp_path / "table.json"
    model_table.main(["vit_base_patch16_224", str(ROOT / "recipes" / "vit_b_grouped_mlp.yaml"),
                      "vit_base_patch16_224_shallow_mlp", "--no-throughput", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads(out.read_text())["models"]}
    base, grouped = rows["vit_base_patch16_224"], rows["vit_b_grouped_mlp"]
    shallow = rows["vit_base_patch16_224_shallow_mlp"]
    assert (base["params"], base["mlp_params"], base["unique_mlps"]) == (86_567_656, 56_669_184, 12)
    assert (grouped["params"], grouped["unique_mlps"]) == (58_233_064, 6)
    assert (shallow["params"], shallow["unique_mlps"]) == (58_237_672, 12)
    line = next(line for line in printed.splitlines() if line.startswith("vit_base_patch16_224 "))
    assert line.split() == ["vit_base_patch16_224", "86.6M", "56.7M", "12", "16.85", "G", "17.56", "G"]
    shallow_line = next(line for line in printed.splitlines() if line.startswith("vit_base_patch16_224_shallow"))
    assert "11.27 G" in shallow_line and "58.2M" in shallow_line


def test_throughput_is_measured_and_the_setting_printed(tmp_path):
    out = tmp_path / "t.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "model_table.py"), "vit_tiny_patch16_224", "--batch-size", "2",
         "--iters", "1", "--device", "cpu", "--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["models"][0]["throughput_img_s"] > 0
    assert data["setting"]["batch_size"] == 2 and data["setting"]["precision"] == "fp32"
    assert "throughput: inference, batch 2, fp32, cpu" in result.stdout


def test_bad_recipe_in_the_table_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variant:\n  kind: grouped\n")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "model_table.py"), str(bad), "--no-throughput"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "variant.kind = 'grouped' is not a valid choice" in result.stderr and "Traceback" not in result.stderr
