"""What the diagnostics write to TensorBoard: tensors for the Depth dashboard, a few scalars, images.

Per evaluation and probed model (P = `depth` for the raw weights, `depth_ema` for the EMA weights):

    P/<quantity>               tensor, one float64 value per stage (the Depth tab reads it: heatmap, depth
                               profile); format in diagnostics/tensorboard_plugin/metadata.py
    P/phases                   tensor: cliff end, plateau start/end, climb start (stage indices), cliff size,
                               tau, plateau length and median (the Depth tab's marks and phase timeline)
    P/<family>/<summary>       a few scalars for *Scalars* (`dashboard_scalars`): phase/cliff_size,
                               phase/plateau_length, token_sim/pe_dominance, probe/top1 and the declared
                               summaries of each metric's headline (heatmap) quantities: isi/{max, argmax,
                               mean}, attn/{cls_centrality_ratio, consensus}_last, nc/nc1_final,
                               plasticity/MHA_mean
    P/heatmap/<quantity>       image: stage x training step over all records so far (`log_images`)
    P/phase_curve              image: the current S_c curve with the detected boundaries

and every `grad_norm_every_steps` updates `depth/grad_norm_<component>` (tensor, one value per block).
Per-stage values are tensors, not scalars, so *Scalars* is not flooded with one chart per stage.

A quantity is `<family>_<key>`, without repeating a family the key already starts with:

    token_sim_raw  token_sim_centered  isi  isi_r2_self  isi_r2_all  attn_cls_centrality
    attn_cls_centrality_ratio  attn_consensus  attn_entropy  attn_entropy_normalized
    attn_mean_distance  nc1  nc2_etf_gap  nc2_equinorm_cv  nc3_self_duality  nc4_ncc_mismatch
    nc_logit_margin  plasticity_{LN1,MHA,LN2,FC1,FC2}  grad_norm_{LN1,MHA,LN2,FC1,FC2}

Families, heatmaps and summaries are declared per metric in diagnostics/registry.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from diagnostics.records import phase_indices, quantity
from diagnostics.registry import METRICS, PER_STAGE_KEYS, Summary
from diagnostics.tensorboard_plugin.metadata import PHASE_FIELDS, PHASES_QUANTITY, tag_prefix, tensor_value

GRAD_NORMS = METRICS["grad_norms"]
PHASE_SUMMARIES = ("plateau_length", "cliff_size", "tau", "plateau_median")
# What *Scalars* keeps per evaluation besides each metric's headline summaries (see `dashboard_scalars`).
DASHBOARD_EXTRA_SCALARS = ("phase/cliff_size", "phase/plateau_length", "token_sim/pe_dominance", "probe/top1")
STAGE_REGEX = r"(embed|pe|block_\d+|norm)$"  # a per-stage tag's end (`depth/isi/max` is a summary)


def quantity_name(metric: str, key: str) -> str:
    return METRICS[metric].quantity(key)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


# ---- what the trainer logs: tensors for the Depth tab, a few scalars for Scalars ------------------------

def headline_summaries() -> tuple[str, ...]:
    """`<family>/<summary>` of every declared summary that reduces one of its metric's heatmap quantities
    (the registry's headline quantities), e.g. isi/mean, attn/cls_centrality_ratio_last, nc/nc1_final."""
    return tuple(f"{spec.family}/{summary.name}" for spec in METRICS.values() for summary in spec.summaries
                 if summary.key in {heatmap.key for heatmap in spec.heatmaps})


def dashboard_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars *Scalars* shows per evaluation: `DASHBOARD_EXTRA_SCALARS` and the headline summaries
    (a subset of `summary_scalars`; per-stage values go to the Depth tab as tensors)."""
    prefix = tag_prefix(record["model"])
    kept = {f"{prefix}/{name}" for name in (*DASHBOARD_EXTRA_SCALARS, *headline_summaries())}
    return {tag: value for tag, value in summary_scalars(record).items() if tag in kept}


def _stage_content(metric: str, key: str, model: str, stages: Sequence[str]) -> dict[str, Any]:
    spec = METRICS[metric]
    log = any(heatmap.key == key and heatmap.log for heatmap in spec.heatmaps)
    return {"kind": "stages", "model": model, "metric": metric, "key": key, "quantity": spec.quantity(key),
            "family": spec.family, "log": log, "stages": list(stages)}


def depth_summary(record: Mapping[str, Any]) -> Any:
    """One `Summary` with a `P/<quantity>` tensor per recorded per-stage quantity and `P/phases`
    (the Depth tab's data for this record; format in diagnostics/tensorboard_plugin/metadata.py)."""
    from tensorboard.compat.proto import summary_pb2

    prefix, model, stages = tag_prefix(record["model"]), record["model"], record["stages"]
    values = []
    for metric, keys in PER_STAGE_KEYS.items():
        for key in keys:
            per_stage = quantity(record, metric, key)
            if per_stage is not None:
                values.append(tensor_value(f"{prefix}/{quantity_name(metric, key)}", per_stage,
                                           _stage_content(metric, key, model, stages)))
    if record.get("phases"):
        phases = {**record["phases"], **phase_indices(record)}
        values.append(tensor_value(f"{prefix}/{PHASES_QUANTITY}", [phases.get(name) for name in PHASE_FIELDS],
                                   {"kind": "phases", "model": model, "fields": list(PHASE_FIELDS),
                                    "stages": list(stages)}))
    return summary_pb2.Summary(value=values)


def grad_norm_summary(norms: Mapping[str, Mapping[str, float | None]], stages: Sequence[str]) -> Any:
    """`depth/grad_norm_<component>` tensors (one value per stage, NaN off the blocks) from
    `component_grad_norms` output; `stages` are the model's (`diagnostics.stage_names`)."""
    from tensorboard.compat.proto import summary_pb2

    values = [tensor_value(f"{tag_prefix('raw')}/{GRAD_NORMS.quantity(component)}",
                           [norms.get(component, {}).get(stage) for stage in stages],
                           _stage_content(GRAD_NORMS.name, component, "raw", stages))
              for component in GRAD_NORMS.keys if norms.get(component)]
    return summary_pb2.Summary(value=values)


def write_summary(writer: Any, summary: Any, step: int) -> None:
    """Append a Summary proto to a torch (or tensorboardX) SummaryWriter's event file and flush, so a
    running TensorBoard sees it at its next reload. (Neither writer has a public call for a prebuilt
    Summary; `add_custom_scalars` uses the same file writer.)"""
    if summary.value:
        writer._get_file_writer().add_summary(summary, step)
        writer.flush()
