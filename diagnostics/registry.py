"""Every diagnostic metric, declared once: its recipe name, record keys, TensorBoard family,
heatmaps, summary scalars, figure and the streaming metrics that compute it.

Everything else is derived from `METRICS`: the recipe's `diagnostics.metrics` choices
(trainer/recipe_schema.py), the per-stage record layout (records.py), the TensorBoard tags,
summaries, heatmaps and the Depth tab's tensor metadata (tensorboard_logging.py), the analysis figures
(plots.py) and the metrics a probe run builds (suite.py). To add a metric: write its
`StreamingMetric` (see streaming.py), declare it here, and give it a figure in plots.py.

This module imports nothing heavy (builders import their metric classes when called), so the
recipe schema can read the names without loading torch's metric code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

COMPONENTS = ("LN1", "MHA", "LN2", "FC1", "FC2")  # P3's component types of a pre-norm block (science.md §6)

Reduction = Literal["max", "argmax", "mean", "last_block", "final", "block_mean"]


@dataclass(frozen=True)
class Summary:
    """One scalar per evaluation, `<prefix>/<family>/<name>`, reduced from a per-stage key."""

    name: str
    key: str
    reduce: Reduction  # over finite values: all stages (max, argmax = stage index, mean), the last block,
    #                    the last stage (final = norm), or the mean over blocks


@dataclass(frozen=True)
class Heatmap:
    """A stage x training-step image of one key (TensorBoard `<prefix>/heatmap/<quantity>`)."""

    key: str
    log: bool = False


@dataclass(frozen=True)
class Figure:
    """An offline figure: `diagnostics.plots.<function>(series)` saved as `<file>.png` by tools/analyze.py."""

    file: str
    function: str


@dataclass(frozen=True)
class MetricSpec:
    name: str  # an item of diagnostics.metrics, and the metric's key in a record
    family: str  # TensorBoard quantity prefix: `<family>_<key>` (unless the key starts with it)
    keys: tuple[str, ...]  # per-stage keys of a record, in this order
    runs_on: Literal["probe", "pairs", "gradients"]  # probe images / image pairs / training-time gradients
    build: Callable[[Any, Any, int], list[Any]] | None = None  # (model, cfg, num_classes) -> StreamingMetrics
    heatmaps: tuple[Heatmap, ...] = ()
    summaries: tuple[Summary, ...] = ()
    figure: Figure | None = None

    @property
    def on_probe(self) -> bool:
        """Measured on the probe set at checkpoints (not during the training step)."""
        return self.runs_on != "gradients"

    def quantity(self, key: str) -> str:
        return key if key.startswith(self.family) else f"{self.family}_{key}"


def _token_similarity(model: Any, cfg: Any, num_classes: int) -> list[Any]:
    from diagnostics.token_similarity import PositionEmbeddingDominance, TokenSimilarity

    return [TokenSimilarity(include_cls=cfg.include_cls), PositionEmbeddingDominance()]


def _isi(model: Any, cfg: Any, num_classes: int) -> list[Any]:
    from diagnostics.isi import ScramblingIndex

    return [ScramblingIndex.from_config(model, cfg)]


def _attention(model: Any, cfg: Any, num_classes: int) -> list[Any]:
    from diagnostics.attention_metrics import AttentionMetrics

    return [AttentionMetrics()]


def _neural_collapse(model: Any, cfg: Any, num_classes: int) -> list[Any]:
    from diagnostics.neural_collapse import NeuralCollapse

    return [NeuralCollapse(model, num_classes, all_stages=cfg.nc_all_stages)]


NC_KEYS = ("nc1", "nc2_etf_gap", "nc2_equinorm_cv", "nc3_self_duality", "nc4_ncc_mismatch", "logit_margin")

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in (
    MetricSpec("token_similarity", "token_sim", ("raw", "centered"), "probe", _token_similarity,
               heatmaps=(Heatmap("centered"),), figure=Figure("phase_curves", "phase_curve_figure")),
    MetricSpec("isi", "isi", ("isi", "r2_self", "r2_all"), "probe", _isi,
               heatmaps=(Heatmap("isi"),),
               summaries=(Summary("max", "isi", "max"), Summary("argmax", "isi", "argmax"),
                          Summary("mean", "isi", "mean")),
               figure=Figure("isi", "isi_figure")),
    MetricSpec("attention", "attn", ("cls_centrality", "cls_centrality_ratio", "consensus", "entropy",
                                     "entropy_normalized", "mean_distance"), "probe", _attention,
               heatmaps=(Heatmap("cls_centrality_ratio"), Heatmap("consensus")),
               summaries=(Summary("cls_centrality_ratio_last", "cls_centrality_ratio", "last_block"),
                          Summary("consensus_last", "consensus", "last_block")),
               figure=Figure("attention", "attention_figure")),
    MetricSpec("neural_collapse", "nc", NC_KEYS, "probe", _neural_collapse,
               heatmaps=(Heatmap("nc1", log=True),),
               summaries=tuple(Summary(f"{key}_final", key, "final") for key in NC_KEYS),
               figure=Figure("neural_collapse", "neural_collapse_figure")),
    MetricSpec("plasticity", "plasticity", COMPONENTS, "pairs",
               heatmaps=(Heatmap("MHA"),),
               summaries=tuple(Summary(f"{key}_mean", key, "block_mean") for key in COMPONENTS),
               figure=Figure("plasticity", "plasticity_figure")),
    MetricSpec("grad_norms", "grad_norm", COMPONENTS, "gradients"),
)}

METRIC_NAMES = tuple(METRICS)  # the recipe's diagnostics.metrics choices, in this order
PROBE_METRICS = tuple(name for name, spec in METRICS.items() if spec.on_probe)
# metric -> the per-stage keys a record keeps (gradient norms are recorded apart, see records.py)
PER_STAGE_KEYS: dict[str, tuple[str, ...]] = {name: spec.keys for name, spec in METRICS.items() if spec.on_probe}
