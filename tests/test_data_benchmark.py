"""tools/benchmark_data.py runs end to end at a tiny size and prints what the README quotes (no timings asserted)."""

import re

import pytest

from tools import benchmark_data

pytestmark = pytest.mark.usefixtures("single_thread")


def test_benchmark_data_builds_its_set_once_and_prints_both_sides_and_their_ratio(tmp_path, capsys):
    root = tmp_path / "set"
    args = ["--root", str(root), "--images", "12", "--windows", "2", "--batch-size", "4",
            "--recipe", "recipes/vit_s.yaml", "--set", "model.img_size=64"]
    benchmark_data.main(args)
    out = capsys.readouterr().out
    assert "12 JPEGs, mean" in out
    assert re.search(r"depthlab\s+[0-9.]+ img/s/core", out) and re.search(r"timm fast path\s+[0-9.]+ img/s/core", out)
    assert float(re.search(r"ratio depthlab / timm: ([0-9.]+)", out).group(1)) > 0
    assert re.search(r"cores to feed 8 GPUs x 4,000 img/s: depthlab\s+[0-9]+", out)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    benchmark_data.main(args)  # cached: not rebuilt
    assert (root / "manifest.json").stat().st_mtime_ns == stamp


def test_the_benchmark_set_looks_like_imagenet(tmp_path):
    root = benchmark_data.build_image_folder(tmp_path, images=150, classes=3, eval_images=3)
    described = benchmark_data.describe_set(root)
    width, height = map(int, re.search(r"mean (\d+) x (\d+) px", described).groups())
    assert 330 < width < 500 and 290 < height < 430
    assert 15 < int(re.search(r"mean (\d+) KB", described).group(1)) < 90
