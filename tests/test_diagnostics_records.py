"""Records (diagnostics.jsonl), TensorBoard naming, figures, the suite's probe sharding and the streaming protocol."""

import json
import math
import re
from dataclasses import replace
from functools import partial

import pytest
import torch

from diagnostics.capture import Stage
from diagnostics.plots import analysis_figures, figure_to_rgb, stage_step_heatmap
from diagnostics.records import (
    DiagnosticsRecordError,
    build_record,
    final_record,
    phase_indices,
    read_diagnostics,
    stage_step_matrix,
)
from diagnostics.streaming import ProbeBatch, StreamingMetric, _reduce_buckets, run_probe, update_metrics
from diagnostics.suite import DiagnosticsSetupError, DiagnosticsWarning, check_config, load_probe
from diagnostics.tensorboard_logging import (
    STAGE_REGEX,
    quantity_name,
    summary_scalars,
)
from diagnostics.token_similarity import TokenSimilarity
from tests import conftest
from trainer.recipe_schema import DiagnosticsConfig

STAGES = ["embed", "pe", "block_1", "block_2", "norm"]


def fake_results(centered=(0.02, -0.004, -0.003, 0.01, 0.05)):
    per_stage = {s: {"raw": 0.1 * i, "centered": c} for i, (s, c) in enumerate(zip(STAGES, centered))}
    return {
        "token_similarity": per_stage,
        "pe_dominance": {"pe": {"pe_dominance": 0.25}},
        "phases": {"cliff_end": "pe", "cliff_size": 0.024, "tau": 0.005, "plateau_start": "pe",
                   "plateau_end": "block_1", "plateau_length": 2, "plateau_median": -0.0035, "climb_start": "block_2",
                   "tau_sensitivity": []},
        "isi": {s: {"isi": 0.001 * i, "r2_self": 1.0, "r2_all": 1.0 + 0.001 * i, "variant": "nested"}
                for i, s in enumerate(STAGES)},
        "attention": {"block_1": {"consensus": 0.5, "cls_centrality": float("nan")}, "block_2": {"consensus": 0.6}},
        "probe_accuracy": {"norm": {"top1": 87.5, "num_images": 8}},
    }


def test_record_arrays_are_aligned_with_stages_and_plain_json():
    grad = {"MHA": {"block_1": 0.5, "block_2": 0.25}, "FC1": {"block_1": 1.0}, "mlp_groups": {}}
    record = build_record(fake_results(), STAGES, step=10, epoch=0.5, model="raw", trigger="checkpoint",
                          probe_size=8, num_processes=2, elapsed_s=1.23456, grad_norms=grad)
    assert list(record)[:8] == ["step", "epoch", "model", "trigger", "probe_size", "num_processes", "elapsed_s",
                                "stages"]
    assert record["token_similarity"]["centered"] == [0.02, -0.004, -0.003, 0.01, 0.05]
    assert record["isi"]["r2_all"] == [1.0, 1.001, 1.002, 1.003, 1.004] and "variant" not in record["isi"]
    assert record["attention"]["consensus"] == [None, None, 0.5, 0.6, None]
    assert record["attention"]["cls_centrality"] == [None] * 5  # NaN is not JSON: null
    assert record["grad_norms"]["FC1"] == [None, None, 1.0, None, None] and record["grad_norms"]["LN1"] == [None] * 5
    assert "neural_collapse" not in record and "plasticity" not in record  # not enabled: absent
    assert record["pe_dominance"] == 0.25 and record["probe_top1"] == 87.5 and record["elapsed_s"] == 1.235
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert phase_indices(record) == {"cliff_end": 1, "plateau_start": 1, "plateau_end": 2, "climb_start": 3}


def test_read_and_final_record_round_trip(tmp_path):
    records = [build_record(fake_results(), STAGES, step=step, epoch=step / 10, model=model, trigger="checkpoint",
                            probe_size=8, num_processes=1, elapsed_s=0.1)
               for step, model in ((10, "raw"), (10, "ema"), (20, "raw"), (20, "ema"))]
    path = tmp_path / "diagnostics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 30, "mod')  # cut-off append
    assert read_diagnostics(tmp_path) == records == read_diagnostics(path)
    assert final_record(tmp_path)["step"] == 20 and final_record(tmp_path, "ema") == records[3]
    assert final_record(tmp_path, "other") is None
    (tmp_path / "run_without_diagnostics").mkdir()
    assert read_diagnostics(tmp_path / "run_without_diagnostics") == []
    with pytest.raises(FileNotFoundError):
        read_diagnostics(tmp_path / "missing")
    path.write_text(json.dumps(records[0]) + "\nnot json\n" + json.dumps(records[1]) + "\n")
    with pytest.raises(DiagnosticsRecordError, match="diagnostics.jsonl:2: not a JSON record"):
        read_diagnostics(tmp_path)
    stages, steps, matrix = stage_step_matrix(records[::2], "isi", "isi")
    assert stages == STAGES and steps == [10, 20] and matrix[3] == [0.003, 0.003]


def test_tensorboard_quantity_names_and_summaries():
    assert [quantity_name(m, k) for m, k in (("token_similarity", "centered"), ("isi", "isi"), ("isi", "r2_self"),
                                             ("attention", "consensus"), ("neural_collapse", "nc1"),
                                             ("neural_collapse", "logit_margin"), ("plasticity", "MHA"))] == [
        "token_sim_centered", "isi", "isi_r2_self", "attn_consensus", "nc1", "nc_logit_margin", "plasticity_MHA"]
    record = build_record(fake_results(), STAGES, step=1, epoch=0.0, model="ema", trigger="every_steps",
                          probe_size=8, num_processes=1, elapsed_s=0.5)
    summary = summary_scalars(record)
    assert summary["depth_ema/phase/cliff_end"] == 1 and summary["depth_ema/phase/climb_start"] == 3
    assert summary["depth_ema/isi/max"] == 0.004 and summary["depth_ema/isi/argmax"] == 4
    assert summary["depth_ema/attn/consensus_last"] == 0.6 and summary["depth_ema/probe/top1"] == 87.5
    assert not any(math.isnan(v) for v in summary.values()) and "depth_ema/nc/nc1_final" not in summary
    assert not re.compile(f"depth/isi/{STAGE_REGEX}").match("depth/isi/argmax")


def test_figures_overlay_models_of_different_depth():
    shallow = build_record(fake_results(), STAGES, step=1, epoch=0.0, model="raw", trigger="offline",
                           probe_size=8, num_processes=1, elapsed_s=0.1)
    deep_stages = ["embed", "pe", "block_1", "block_2", "block_3", "norm"]
    deep_results = fake_results()
    deep_results["token_similarity"] = {s: {"raw": 0.1, "centered": 0.01 * i} for i, s in enumerate(deep_stages)}
    deep = build_record(deep_results, deep_stages, step=1, epoch=0.0, model="raw", trigger="offline",
                        probe_size=8, num_processes=1, elapsed_s=0.1)
    figures = analysis_figures([("shallow", shallow), ("deep", deep)], dpi=40)
    assert set(figures) == {"phase_curves", "isi", "attention"}
    centered_axes = figures["phase_curves"].axes[0]
    assert [len(line.get_xdata()) for line in centered_axes.get_lines() if line.get_label() in ("shallow", "deep")] \
        == [5, 6]
    assert stage_step_heatmap([], "isi", "isi", "isi") is None
    image = figure_to_rgb(stage_step_heatmap([shallow, shallow], "isi", "isi", "isi", dpi=40))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"


tiny_vit = partial(conftest.tiny_vit, num_classes=4)


def test_check_config_names_the_key():
    model, cfg = tiny_vit(), DiagnosticsConfig(probe_size=400, isi_pca_rank=4)
    check_config(cfg, model)
    with pytest.raises(DiagnosticsSetupError, match="isi_holdout_fraction = 1.0 is out of range: expected < 1"):
        check_config(replace(cfg, isi_holdout_fraction=1.0), model)
    with pytest.raises(DiagnosticsSetupError, match=r"isi_stages: \['block_5'\] are not stages"):
        check_config(replace(cfg, isi_stages=["block_5"]), model)
    with pytest.raises(DiagnosticsSetupError, match="below one stage"):
        check_config(replace(cfg, isi_memory_budget_gb=1e-6), model)
    with pytest.warns(DiagnosticsWarning, match="raise diagnostics.probe_size"):
        check_config(replace(cfg, probe_size=30), model)


class Images(torch.utils.data.Dataset):
    def __init__(self, count):
        self.images = torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        self.indices = list(range(100, 100 + count))  # like trainer.data.ProbeSet: eval-split indices

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 4


def test_probe_shards_partition_the_set_and_pairs_are_global():
    cfg = DiagnosticsConfig(probe_batch_size=4, plasticity_pairs=7)
    whole = load_probe(Images(11), cfg)
    shards = [load_probe(Images(11), cfg, rank, 3) for rank in range(3)]
    assert sorted(i for s in shards for i in s.ids.tolist()) == whole.ids.tolist() == list(range(100, 111))
    assert sum(len(s.pair_first) for s in shards) == len(whole.pair_first) == 7
    torch.testing.assert_close(shards[1].pair_second, whole.pair_second[1::3])
    assert [len(b[0]) for b in shards[0].batches(2, torch.device("cpu"))] == [2, 2]
    assert load_probe(Images(3), cfg, rank=5, world_size=8).batches(4, torch.device("cpu")) == []


class GradProbe(StreamingMetric):
    name = "grad_probe"

    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if stage.name == "norm":
            self.accumulate("norm/requires_grad", float(batch.model.forward_head(stage.tokens).requires_grad))
            self.accumulate("norm/ids", batch.image_ids.sum())

    def compute(self):
        return {key: value.item() for key, value in self.sums().items()}


def test_streaming_protocol_fixes():
    model = tiny_vit()
    metric = GradProbe()
    update_metrics(model, torch.randn(3, 3, 16, 16), [metric], indices=torch.tensor([4, 5, 6]))
    assert metric.compute() == {"norm/requires_grad": 0.0, "norm/ids": 15.0}  # no_grad; ids reach the batch
    metric.discard(["norm/ids", "unknown"])
    assert list(metric.sums()) == ["norm/requires_grad"]
    with pytest.raises(ValueError, match="two metrics are named 'token_similarity'"):
        run_probe(model, [torch.randn(2, 3, 16, 16)], [TokenSimilarity(), TokenSimilarity()])
    renamed = TokenSimilarity()
    renamed.name = "token_similarity_cls"
    assert set(run_probe(model, [torch.randn(2, 3, 16, 16)], [TokenSimilarity(), renamed])) == {
        "token_similarity", "token_similarity_cls"}
    sums = {"a": torch.zeros(100), "b": torch.zeros(100), "c": torch.zeros(300), "d": torch.zeros(10)}
    assert _reduce_buckets(sums, bucket_bytes=8 * 200) == [["a", "b"], ["c"], ["d"]]  # a sum over the limit alone


def _mixed_depth_series():
    def record(depth, plateau_end):
        stages = ["embed", "pe", *[f"block_{i}" for i in range(1, depth + 1)], "norm"]
        centered = [0.02, -0.003, *[0.0] * (depth - 2), 0.03, 0.05, 0.06]
        return {"stages": stages, "token_similarity": {"centered": centered, "raw": [c + 0.1 for c in centered]},
                "phases": {"cliff_end": "pe", "plateau_start": "pe", "plateau_end": plateau_end,
                           "climb_start": f"block_{depth - 1}"}}

    return [("ViT-B", record(12, "block_10")), ("ViT-L", record(24, "block_22")), ("ViT-S", record(12, "block_9"))]


def test_phase_curves_keep_the_legend_off_the_titles_plateaus_apart_and_align_mixed_depths():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from diagnostics.plots import phase_curve_figure

    figure = phase_curve_figure(_mixed_depth_series(), dpi=60)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    (legend,) = figure.legends
    box = legend.get_window_extent(renderer)
    for ax in figure.axes:  # what a reader sees: no legend over a title or inside a panel
        assert not box.overlaps(ax.title.get_window_extent(renderer)) and not box.overlaps(ax.get_window_extent())
    centered = figure.axes[0]
    bars = [line for line in centered.get_lines() if line.get_linewidth() == 4]
    assert len(bars) == 3 and len({line.get_ydata()[0] for line in bars}) == 3  # one row per run, none stacked
    assert all(line.get_alpha() < 1 for line in bars) and not centered.patches  # no translucent bands piling up
    curves = [line for line in centered.get_lines() if line.get_label() in ("ViT-B", "ViT-L")]
    assert [line.get_xdata()[-1] for line in curves] == [1.0, 1.0]  # both end at norm: relative depth
    assert centered.get_xlabel() == "relative depth (0 = embed, 1 = norm)"
    assert {t.get_text() for t in legend.get_texts()} >= {"ViT-B", "ViT-L", "ViT-S", "cliff end", "climb start"}


def test_accuracy_curves_tick_whole_epochs():
    from tools.report_plots import AccuracyCurve, accuracy_figure

    figure = accuracy_figure([AccuracyCurve("a", [0.5, 1.0, 1.5, 2.0, 2.5], [10, 20, 30, 40, 50], None, 0)])
    ticks = figure.axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)
