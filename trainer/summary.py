"""summary.json: what a run reached, in the numbers papers quote.

For the raw and the EMA model: final and best top-1/top-5, the epoch of the best, and
peak_to_final = best - final (P2's stability measure; P2 quotes the EMA model's).
"""

from __future__ import annotations

from typing import Any

from models import create_vit_from_recipe, profile_model
from trainer.recipe_schema import Recipe
from trainer.state import TrainState


def accuracy_summary(evals: list[dict], suffix: str = "") -> dict[str, Any] | None:
    """Final/best/peak_to_final of top1 and top5 over the evaluations (keys `top1{suffix}`, `top5{suffix}`)."""
    out: dict[str, Any] = {}
    for metric in ("top1", "top5"):
        key = f"{metric}{suffix}"
        history = [e for e in evals if e.get(key) is not None]
        if not history:
            continue
        final = history[-1][key]
        best = max(history, key=lambda e: e[key])  # earliest of equal bests
        prefix = "" if metric == "top1" else "top5_"
        out[f"{metric}_final"] = final
        out[f"{metric}_best"] = best[key]
        out[f"{prefix}best_epoch"] = best["epoch"]
        out[f"{prefix}best_step"] = best["step"]
        out[f"{prefix}peak_to_final"] = round(best[key] - final, 6)
    return out or None


def model_cost(recipe: Recipe) -> dict[str, int]:
    """Unique parameters and MACs per image, counted on a meta-device copy (no weights allocated)."""
    profile = profile_model(create_vit_from_recipe(recipe, device="meta", pretrained=False))
    return {"params": profile.params, "macs_linear": profile.macs_linear, "macs_total": profile.macs_total}


def build_summary(state: TrainState, recipe: Recipe, cost: dict[str, int], *, status: str, num_processes: int,
                  global_batch: int) -> dict[str, Any]:
    throughput = state.images_seen / state.train_time_s if state.train_time_s > 0 else None
    return {
        "status": status,
        "model": recipe.model.name,
        "variant": recipe.variant.kind,
        "step": state.step,
        "epoch": state.epoch,
        "epochs": recipe.schedule.epochs,
        "raw": accuracy_summary(state.evals),
        "ema": accuracy_summary(state.evals, "_ema"),
        **cost,
        "train_throughput_img_s": round(throughput, 2) if throughput else None,
        "train_time_s": round(state.train_time_s, 2),
        "wall_time_s": round(state.wall_time_s, 2),
        "images_seen": state.images_seen,
        "num_processes": num_processes,
        "global_batch": global_batch,
        "nonfinite_skips": state.nonfinite_skips,
        "best_checkpoint": state.best_checkpoint,
    }
