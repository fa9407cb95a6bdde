"""Depth-dynamics diagnostics of timm Vision Transformers (science.md §1–4, §6).

Metrics stream a probe set stage by stage (`diagnostics.streaming`) and work on any timm
VisionTransformer, without the trainer; each is declared once in `diagnostics.registry`;
`run_diagnostics` runs the set a `diagnostics:` section (any object with its knobs) asks for;
records (`diagnostics.jsonl`, analysis.json) are read with `read_diagnostics` / `final_record`.
TensorBoard: per-stage tensors for the Depth tab (`diagnostics.tensorboard_plugin`), a few scalars and images,
written by `diagnostics.tensorboard_logging` (images drawn by `diagnostics.raster`);
offline figures: `diagnostics.plots` (imported on demand: it pulls in matplotlib). The adapter that
runs all this during training is trainer/training_diagnostics.py.
"""

from diagnostics.attention_metrics import AttentionMetrics
from diagnostics.capture import capture, iterate_stages, scaled_position_embedding, stage_names
from diagnostics.grad_norms import component_grad_norms
from diagnostics.isi import ScramblingIndex
from diagnostics.neural_collapse import NeuralCollapse
from diagnostics.phases import Phases, detect_phases, phases_from_similarity
from diagnostics.plasticity import Plasticity, plasticity
from diagnostics.records import build_record, final_record, read_diagnostics
from diagnostics.streaming import ProbeBatch, StreamingMetric, compute_metrics, run_probe, update_metrics
from diagnostics.suite import (
    DiagnosticsSetupError,
    ProbeData,
    build_metrics,
    check_config,
    load_probe,
    run_diagnostics,
)
from diagnostics.token_similarity import PositionEmbeddingDominance, TokenSimilarity

__all__ = [
    "AttentionMetrics", "DiagnosticsSetupError", "NeuralCollapse", "Phases", "Plasticity", "PositionEmbeddingDominance", "ProbeBatch",
    "ProbeData", "ScramblingIndex", "StreamingMetric", "TokenSimilarity", "build_metrics", "build_record",
    "capture", "check_config", "component_grad_norms", "compute_metrics", "detect_phases", "final_record",
    "iterate_stages", "load_probe", "phases_from_similarity", "plasticity", "read_diagnostics", "run_diagnostics",
    "run_probe", "scaled_position_embedding", "stage_names", "update_metrics",
]
