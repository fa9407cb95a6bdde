"""TensorBoard tags, scalars, custom-scalars layout and images of diagnostics records.

Tags (P = `depth` for the raw weights, `depth_ema` for the EMA weights):

    P/<quantity>/<stage>       one scalar per stage: embed, pe, block_01 .. block_L, norm (block numbers
                               zero-padded to at least two digits, so they sort)
    P/<family>/<summary>       per-evaluation summaries (see `summary_scalars`)
    P/heatmap/<quantity>       image: stage x training step, rebuilt from all records so far
    P/phase_curve              image: the current S_c curve with the detected boundaries

A quantity is `<family>_<key>`, without repeating a family the key already starts with:

    token_sim_raw  token_sim_centered  isi  isi_r2_self  isi_r2_all  attn_cls_centrality
    attn_cls_centrality_ratio  attn_consensus  attn_entropy  attn_entropy_normalized
    attn_mean_distance  nc1  nc2_etf_gap  nc2_equinorm_cv  nc3_self_duality  nc4_ncc_mismatch
    nc_logit_margin  plasticity_{LN1,MHA,LN2,FC1,FC2}  grad_norm_{LN1,MHA,LN2,FC1,FC2}

(grad_norm_* are training-time gradients of the raw weights, always under `depth/`.) The
custom-scalars layout puts every quantity's stages in one multi-line chart. Families, heatmaps and
summaries are declared per metric in diagnostics/registry.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from diagnostics.records import phase_indices, quantity
from diagnostics.registry import METRICS, PER_STAGE_KEYS, Summary

GRAD_NORMS = METRICS["grad_norms"]
PHASE_SUMMARIES = ("plateau_length", "cliff_size", "tau", "plateau_median")
STAGE_REGEX = r"(embed|pe|block_\d+|norm)$"  # per-stage tags only (`depth/isi/max` is a summary)


def tag_prefix(model: str) -> str:
    return "depth" if model == "raw" else f"depth_{model}"


def quantity_name(metric: str, key: str) -> str:
    return METRICS[metric].quantity(key)


def stage_tag(stage: str, num_blocks: int) -> str:
    """`block_7` -> `block_07` (width max(2, digits of the depth)); other stages unchanged."""
    if not stage.startswith("block_"):
        return stage
    return f"block_{int(stage[6:]):0{max(2, len(str(num_blocks)))}d}"


def _num_blocks(stages: Sequence[str]) -> int:
    return sum(stage.startswith("block_") for stage in stages)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stage_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """`P/<quantity>/<stage>` for every recorded per-stage value (grad norms excluded)."""
    prefix, stages = tag_prefix(record["model"]), record["stages"]
    blocks = _num_blocks(stages)
    scalars = {}
    for metric, keys in PER_STAGE_KEYS.items():
        for key in keys:
            values = quantity(record, metric, key) or []
            for stage, value in zip(stages, values):
                if _finite(value):
                    scalars[f"{prefix}/{quantity_name(metric, key)}/{stage_tag(stage, blocks)}"] = float(value)
    return scalars


def _reduce(record: Mapping[str, Any], metric: str, summary: Summary) -> float | None:
    """A declared summary of one per-stage key (None when undefined)."""
    values = quantity(record, metric, summary.key)
    if not values:
        return None
    if summary.reduce == "final":
        return values[-1]
    if summary.reduce in ("last_block", "block_mean"):
        blocks = [v for stage, v in zip(record["stages"], values) if stage.startswith("block_") and _finite(v)]
        if not blocks:
            return None
        return blocks[-1] if summary.reduce == "last_block" else sum(blocks) / len(blocks)
    finite = [(i, v) for i, v in enumerate(values) if _finite(v)]
    if not finite:
        return None
    if summary.reduce == "mean":
        return sum(v for _, v in finite) / len(finite)
    argmax, maximum = max(finite, key=lambda item: item[1])
    return maximum if summary.reduce == "max" else argmax


def summary_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Per-evaluation summaries; stage positions are indices into `stages` (0 = embed, 1 = pe, k+1 = block_k).

    P/phase/{cliff_end, plateau_start, plateau_end, climb_start, plateau_length, cliff_size, tau,
    plateau_median}, P/token_sim/pe_dominance, P/isi/{max, argmax, mean}, P/attn/{cls_centrality_ratio,
    consensus}_last (last block), P/nc/<key>_final (at norm), P/plasticity/<component>_mean (over
    blocks), P/probe/top1, P/cost/elapsed_s. A value that is undefined (e.g. no climb) is not logged.
    """
    prefix = tag_prefix(record["model"])
    out: dict[str, Any] = {}
    if "phases" in record:
        out.update({f"phase/{name}": index for name, index in phase_indices(record).items()})
        out.update({f"phase/{name}": record["phases"].get(name) for name in PHASE_SUMMARIES})
    if "pe_dominance" in record:
        out["token_sim/pe_dominance"] = record["pe_dominance"]
    for metric, spec in METRICS.items():
        for summary in spec.summaries:
            out[f"{spec.family}/{summary.name}"] = _reduce(record, metric, summary)
    out["probe/top1"] = record.get("probe_top1")
    out["cost/elapsed_s"] = record.get("elapsed_s")
    return {f"{prefix}/{name}": float(value) for name, value in out.items() if _finite(value)}


def grad_norm_scalars(norms: Mapping[str, Mapping[str, float | None]], num_blocks: int) -> dict[str, float]:
    """`depth/grad_norm_<component>/<block>` from `component_grad_norms` output."""
    return {f"depth/{GRAD_NORMS.quantity(component)}/{stage_tag(stage, num_blocks)}": float(value)
            for component in GRAD_NORMS.keys for stage, value in norms.get(component, {}).items()
            if _finite(value)}


def custom_scalars_layout(metrics: Iterable[str], models: Iterable[str]) -> dict[str, dict[str, list]]:
    """{category: {chart: ["Multiline", [tag regex]]}} for `SummaryWriter.add_custom_scalars`."""
    metrics = set(metrics)
    layout: dict[str, dict[str, list]] = {}
    for model in models:
        prefix = tag_prefix(model)
        charts = {}
        for metric, keys in PER_STAGE_KEYS.items():
            if metric in metrics:
                for key in keys:
                    name = quantity_name(metric, key)
                    charts[name] = ["Multiline", [f"{prefix}/{name}/{STAGE_REGEX}"]]
        if "token_similarity" in metrics:
            charts["phase boundaries (stage index)"] = [
                "Multiline", [f"{prefix}/phase/(cliff_end|plateau_start|plateau_end|climb_start)$"]]
        layout[f"{prefix}: per stage ({model} weights)"] = charts
    if "grad_norms" in metrics:
        layout["depth: gradient norms per block"] = {
            GRAD_NORMS.quantity(component): ["Multiline", [f"depth/{GRAD_NORMS.quantity(component)}/{STAGE_REGEX}"]]
            for component in GRAD_NORMS.keys}
    return layout


def log_images(writer: Any, records: Sequence[Mapping[str, Any]], step: int, model: str) -> list[str]:
    """Heatmaps of every main quantity over `records` (one model's, oldest first) and the latest phase
    curve, as images at `step`; returns the tags written. Drawn by diagnostics/raster.py (milliseconds,
    no matplotlib in the training process)."""
    from diagnostics.raster import phase_curve_image, stage_step_heatmap_image

    prefix, written = tag_prefix(model), []
    for metric, spec in METRICS.items():
        for heatmap in spec.heatmaps:
            name = spec.quantity(heatmap.key)
            image = stage_step_heatmap_image(records, metric, heatmap.key, f"{name} ({model} weights)",
                                             log=heatmap.log)
            if image is None:
                continue
            writer.add_image(f"{prefix}/heatmap/{name}", image, step, dataformats="HWC")
            written.append(f"{prefix}/heatmap/{name}")
    if records and "token_similarity" in records[-1]:
        writer.add_image(f"{prefix}/phase_curve", phase_curve_image(records[-1], f"step {step}"), step,
                         dataformats="HWC")
        written.append(f"{prefix}/phase_curve")
    return written
