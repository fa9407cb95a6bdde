"""Plasticity of each ViT block component (science.md §6, P3).

Plasticity of a component f at block ℓ = mean over image pairs (X, Y) of ‖f(X) − f(Y)‖_F / ‖X − Y‖_F,
norms over the whole (tokens × features) matrix, prefix tokens included. Components:

    mode "paper" (default, P3): every component reads the same input, the embedding output
        (stage `pe`: patch embedding + CLS + position embedding) of each image:
        LN1 = norm1(X), MHA = attn(X) (no pre-norm), LN2 = norm2(X), FC1 = fc1(X),
        FC2 = fc2([X, 0…0]) (X zero-padded to the hidden width, so ‖[X,0] − [Y,0]‖ = ‖X − Y‖).
    mode "in_situ": each component on its real input at that depth (block input x = the
        previous stage, after `norm_pre` for block 1): LN1 on x, MHA on norm1(x), LN2 on the
        post-attention residual x + ls1(attn(norm1(x))), FC1 on norm2 of that, FC2 on the
        activation output norm(act(fc1(·))). Ratios divide by the distance of the component's
        own inputs.

A GroupedMLP's shared fc1/fc2 give identical FC1/FC2 values for the blocks of a group in paper
mode (same module, same input). Pairs whose inputs coincide (duplicate images) are skipped and
not counted.

Two ways in:
- `plasticity(model, images, other_images, num_pairs=, seed=)`: pairs drawn by `draw_pairs`
  from one image set (i ≠ j) or across two (P3 pairs a pretraining image with a downstream one);
  deterministic for a seed, independent of batching.
- `Plasticity`, a `StreamingMetric` on the probe stream: within each batch, image i is paired with
  image (i + u_i) mod B, u_i ∈ [1, B) drawn from (seed, batch number); at most `num_pairs` pairs
  per process. The pairs depend on how the probe set is batched and sharded.
Results `{block_stage: {LN1, MHA, LN2, FC1, FC2, num_pairs}}`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics.capture import PE, Stage, block_stage, unwrap_model
from diagnostics.registry import COMPONENTS
from diagnostics.streaming import ProbeBatch, StreamingMetric, ordered_stages, update_metrics

PLASTICITY_MODES = ("paper", "in_situ")


def draw_pairs(num_images: int, num_other: int | None, num_pairs: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j): i ≠ j within one set (`num_other=None`), or i in the first set, j in the other."""
    rng = np.random.default_rng(seed)
    if num_other is None:
        if num_images < 2:
            raise ValueError(f"pairing one image set needs at least 2 images, got {num_images}")
        first = rng.integers(0, num_images, num_pairs)
        return first, (first + rng.integers(1, num_images, num_pairs)) % num_images
    if num_images < 1 or num_other < 1:
        raise ValueError(f"pairing two image sets needs images in both, got {num_images} and {num_other}")
    return rng.integers(0, num_images, num_pairs), rng.integers(0, num_other, num_pairs)


def _check_block(block: nn.Module, in_situ: bool) -> None:
    names = ["norm1", "attn", "norm2", "mlp", "mlp.fc1", "mlp.fc2"]
    if in_situ:
        names += ["ls1", "drop_path1", "mlp.act", "mlp.drop1", "mlp.norm"]
    for name in names:
        owner = block
        for part in name.split("."):
            owner = getattr(owner, part, None)
        if owner is None:
            raise TypeError(f"plasticity needs timm's pre-norm Block with an Mlp; "
                            f"{type(block).__name__} has no `{name}`")


def paper_components(block: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{component: (input, output)}, every component on the embedding output x (B, T, D)."""
    mlp = block.mlp
    components = {"LN1": (x, block.norm1(x)), "MHA": (x, block.attn(x)), "LN2": (x, block.norm2(x)),
                  "FC1": (x, mlp.fc1(x))}
    padding = mlp.fc2.in_features - x.shape[-1]
    if padding >= 0:
        components["FC2"] = (x, mlp.fc2(F.pad(x, (0, padding))))
    return components


def in_situ_components(block: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{component: (input, output)}, each component on its real input inside the block (eval mode)."""
    mlp = block.mlp
    normed = block.norm1(x)
    attended = block.attn(normed)
    residual = x + block.drop_path1(block.ls1(attended))
    normed2 = block.norm2(residual)
    hidden = mlp.fc1(normed2)
    activation = mlp.norm(mlp.drop1(mlp.act(hidden)))
    return {"LN1": (x, normed), "MHA": (normed, attended), "LN2": (residual, normed2),
            "FC1": (normed2, hidden), "FC2": (activation, mlp.fc2(activation))}


def _pair_distance(values: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return (values[first].to(torch.float64) - values[second].to(torch.float64)).flatten(1).norm(dim=1)


class Plasticity(StreamingMetric):
    """Streaming plasticity: within-batch pairs of the probe stream, or explicit pairs via `update_pairs`."""

    name = "plasticity"

    def __init__(self, mode: str = "paper", num_pairs: int | None = None, seed: int = 0) -> None:
        if mode not in PLASTICITY_MODES:
            raise ValueError(f"plasticity mode = {mode!r}: expected one of {', '.join(PLASTICITY_MODES)}")
        if num_pairs is not None and num_pairs < 1:
            raise ValueError(f"plasticity num_pairs = {num_pairs} must be >= 1")
        self.mode, self.num_pairs, self.seed = mode, num_pairs, seed
        super().__init__()

    def reset(self) -> None:
        super().reset()
        self._batches_seen = 0
        self._pairs_used = 0
        self._explicit_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._batch: ProbeBatch | None = None
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warned_fc2 = False

    def update_pairs(self, model: nn.Module, images: torch.Tensor, other_images: torch.Tensor) -> None:
        """Fold in the pairs (images[k], other_images[k]) with one stage-by-stage forward."""
        if images.shape[0] != other_images.shape[0]:
            raise ValueError(f"paired batches differ in size: {images.shape[0]} vs {other_images.shape[0]}")
        count = images.shape[0]
        index = torch.arange(count, device=images.device)
        self._explicit_pairs = (index, index + count)
        try:
            update_metrics(model, torch.cat([images, other_images]), [self])
        finally:
            self._explicit_pairs = None

    def _start_batch(self, stage: Stage, batch: ProbeBatch) -> None:
        self._batch = batch
        device = stage.tokens.device
        if self._explicit_pairs is not None:
            first, second = self._explicit_pairs
        else:
            size = stage.tokens.shape[0]
            budget = size if self.num_pairs is None else min(size, self.num_pairs - self._pairs_used)
            rng = np.random.default_rng([self.seed, self._batches_seen])
            self._batches_seen += 1
            if size < 2 or budget <= 0:
                self._pairs = None
                return
            offsets = torch.from_numpy(rng.integers(1, size, size))[:budget]
            first = torch.arange(budget)
            second = (first + offsets) % size
        self._pairs = (first.to(device), second.to(device))
        self._pairs_used += len(first)

    @torch.no_grad()  # the components run here, outside iterate_stages' no_grad
    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if stage.name == PE:
            self._start_batch(stage, batch)
        if self._batch is not batch or self._pairs is None:
            return
        blocks = batch.model.blocks
        if self.mode == "paper":
            if stage.name != PE:
                return
            for index, block in enumerate(blocks):
                _check_block(block, in_situ=False)
                self._fold(block_stage(index), paper_components(block, stage.tokens))
            return
        if stage.name == PE:
            index, block_input = 0, batch.model.norm_pre(stage.tokens)
        elif stage.name.startswith("block_"):
            index, block_input = int(stage.name.split("_")[1]), stage.tokens
        else:
            return
        if index < len(blocks):
            _check_block(blocks[index], in_situ=True)
            self._fold(block_stage(index), in_situ_components(blocks[index], block_input))

    def _fold(self, block_name: str, components: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        first, second = self._pairs
        if "FC2" not in components and not self._warned_fc2:
            self._warned_fc2 = True
            warnings.warn("paper-mode FC2 plasticity needs an MLP hidden width >= the embedding width "
                          "(to zero-pad X); FC2 is left out", stacklevel=3)
        valid = None
        for component, (inputs, outputs) in components.items():
            denominator = _pair_distance(inputs, first, second)
            valid_here = denominator > 0
            ratio = _pair_distance(outputs, first, second) / denominator.where(valid_here, 1.0)
            self.accumulate(f"{block_name}/{component}/ratio_sum", ratio.where(valid_here, 0.0).sum())
            self.accumulate(f"{block_name}/{component}/pairs", valid_here.sum())
            valid = valid_here if valid is None else valid & valid_here
        self.accumulate(f"{block_name}/pairs", valid.sum())

    def compute(self) -> dict[str, Any]:
        sums = self.sums()
        results = {}
        for stage in ordered_stages(key.split("/", 1)[0] for key in sums):
            result: dict[str, Any] = {}
            for component in COMPONENTS:
                pairs = sums.get(f"{stage}/{component}/pairs")
                if pairs is not None:
                    total = sums[f"{stage}/{component}/ratio_sum"]
                    result[component] = float(total / pairs) if pairs > 0 else None
            result["num_pairs"] = int(sums[f"{stage}/pairs"])
            results[stage] = result
        return results


def plasticity(model: nn.Module, images: torch.Tensor, other_images: torch.Tensor | None = None, *,
               mode: str = "paper", num_pairs: int = 128, seed: int = 0,
               batch_size: int = 64) -> dict[str, Any]:
    """Plasticity per block and component over `num_pairs` seeded pairs (local: no all-reduce).

    Pairs come from `draw_pairs`: within `images` (i ≠ j) or between `images` and `other_images`.
    Images are moved to the model's device in batches of `batch_size` pairs.
    """
    device = next(unwrap_model(model).parameters()).device
    num_other = None if other_images is None else len(other_images)
    first, second = draw_pairs(len(images), num_other, num_pairs, seed)
    partner = images if other_images is None else other_images
    metric = Plasticity(mode=mode)
    for start in range(0, num_pairs, batch_size):
        chunk = slice(start, start + batch_size)
        metric.update_pairs(model, images[torch.from_numpy(first[chunk])].to(device),
                            partner[torch.from_numpy(second[chunk])].to(device))
    return metric.compute()
