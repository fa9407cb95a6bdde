"""Depth-dynamics diagnostics of timm Vision Transformers (science.md §1–4, §6).

Metrics stream a probe set stage by stage (`diagnostics.streaming`) and work on any timm
VisionTransformer; `run_diagnostics` runs the set a recipe's `diagnostics:` section asks for;
records (`diagnostics.jsonl`, analysis.json) are read with `read_diagnostics` / `final_record`.
The training callback lives in `diagnostics.callback`, its TensorBoard images in `diagnostics.raster`,
offline figures in `diagnostics.plots` (imported on demand: they pull in the trainer and matplotlib).
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
from diagnostics.suite import ProbeData, build_metrics, check_config, load_probe, run_diagnostics
from diagnostics.token_similarity import PositionEmbeddingDominance, TokenSimilarity

__all__ = [
    "AttentionMetrics", "NeuralCollapse", "Phases", "Plasticity", "PositionEmbeddingDominance", "ProbeBatch",
    "ProbeData", "ScramblingIndex", "StreamingMetric", "TokenSimilarity", "build_metrics", "build_record",
    "capture", "check_config", "component_grad_norms", "compute_metrics", "detect_phases", "final_record",
    "iterate_stages", "load_probe", "phases_from_similarity", "plasticity", "read_diagnostics", "run_diagnostics",
    "run_probe", "scaled_position_embedding", "stage_names", "update_metrics",
]
