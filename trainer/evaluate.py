"""Top-1/top-5 of the raw and the EMA model in one pass over the evaluation set.

The eval loader gives every example to exactly one process with `valid=True` (padding slots,
which keep the batch counts equal across processes, have `valid=False` and are not counted);
torchmetrics sums the counts over processes in `compute()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from models import parameter_dtype


def _metrics(num_classes: int, device: torch.device) -> dict[str, MulticlassAccuracy]:
    return {f"top{k}": MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro").to(device)
            for k in (1, min(5, num_classes))}


@torch.no_grad()
def evaluate(models: Mapping[str, nn.Module], loader: Iterable, accelerator, num_classes: int) -> dict[str, float]:
    """Accuracies in percent, keyed `top1`, `top5` for models[""] and `top1_ema`, ... for models["_ema"]."""
    device = accelerator.device
    metrics = {suffix: _metrics(num_classes, device) for suffix in models}
    input_dtypes = {suffix: parameter_dtype(m) for suffix, m in models.items()}
    training = {suffix: m.training for suffix, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for images, targets, valid in loader:
            images = images.to(device, non_blocking=True)
            targets, valid = targets.to(device, non_blocking=True), valid.to(device, non_blocking=True)
            for suffix, model in models.items():
                with accelerator.autocast():
                    logits = model(images.to(input_dtypes[suffix]))
                for metric in metrics[suffix].values():
                    metric.update(logits[valid].float(), targets[valid])
    finally:
        for suffix, m in models.items():
            m.train(training[suffix])
    out = {}
    for suffix, per_k in metrics.items():
        for name, metric in per_k.items():
            out[f"{name}{suffix}"] = round(100.0 * metric.compute().item(), 4)
    return out
