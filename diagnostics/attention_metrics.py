"""Attention hub metrics per block (science.md §3).

A is the post-softmax attention of a block, (B, H, T, T) with T = P + N tokens: P prefix
tokens (CLS first when the model has one, then registers) and N patch tokens in row-major grid
order. `capture.iterate_stages(..., attention=True)` takes it from each block's explicit (non-fused) attention path.
Every quantity is computed per image (averaged over its heads and queries) in float64, then
averaged over images.

- CLS centrality  CCC = mean over heads and patch queries i of A[i, CLS]; reported with
  cls_centrality_ratio = T·CCC, which is 1 for uniform attention ((N+1)·CCC without registers).
  None for models without a CLS token.
- Attention consensus  ACI = mean cosine over ordered pairs i ≠ j of patch queries between their
  rows restricted to patch keys, A[i, patch keys] renormalised to sum 1 (cosine ignores that
  scale), via (‖Σ_i r_i‖² − Σ_i ‖r_i‖²)/(N(N−1)) on unit rows r_i. A row whose patch-key mass
  underflows to 0 (all attention on prefix tokens) counts as a zero row, as in token_similarity.
- Attention entropy  −Σ_k A[q, k] log A[q, k] in nats, mean over heads and ALL T queries; also
  divided by log T (1 = uniform attention).
- Mean attention distance  for patch query i, Σ_j w_ij · d(i, j) over patch keys j, with
  w_i = A[i, patch keys] renormalised to sum 1 and d the Euclidean distance between the two
  patches' grid positions (row, col), in patches (multiply by the patch size for pixels); the
  query's own patch is included at distance 0. Mean over heads and patch queries.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diagnostics.capture import Stage
from diagnostics.streaming import ProbeBatch, StreamingMetric
from diagnostics.token_similarity import mean_pairwise_cosine_of_units, unit_tokens

# Images per float64 chunk are chosen so one (chunk, H, T, T) temporary stays near this many elements: on
# CPU 4 MiB temporaries that stay in cache (the demo's 6 blocks: 0.15 s against 0.24 s with 32 MiB ones, which
# also page-fault afresh on every allocation); on a GPU large ones, which take fewer kernel launches.
DEFAULT_CHUNK_ELEMENTS = 1 << 22
CPU_CHUNK_ELEMENTS = 1 << 19


def _check_attention(attention: torch.Tensor, num_prefix_tokens: int) -> None:
    if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be (B, H, T, T), got {tuple(attention.shape)}")
    if not 0 <= num_prefix_tokens <= attention.shape[-1] - 2:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} leaves fewer than 2 patch tokens "
                         f"of T={attention.shape[-1]}")


def cls_centrality(attention: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Per-image mean over heads and patch queries of A[i, CLS] (CLS = token 0) -> (B,) float64."""
    _check_attention(attention, num_prefix_tokens)
    if num_prefix_tokens < 1:
        raise ValueError("CLS centrality needs a CLS token (num_prefix_tokens >= 1)")
    return attention[:, :, num_prefix_tokens:, 0].to(torch.float64).mean(dim=(1, 2))


def attention_consensus(attention: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Per-image ACI (patch-query rows over patch keys, mean cosine over i ≠ j, mean over heads) -> (B,)."""
    _check_attention(attention, num_prefix_tokens)
    rows = attention[:, :, num_prefix_tokens:, num_prefix_tokens:].to(torch.float64)
    return mean_pairwise_cosine_of_units(unit_tokens(rows)).mean(dim=1)


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Per-image mean over heads and all queries of −Σ_k A log A, in nats -> (B,) float64."""
    probs = attention.to(torch.float64)
    # A·log max(A, tiny) is xlogy's 0·log 0 = 0 to the last bit that matters, and vectorises (xlogy: 5x slower)
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1).mean(dim=(1, 2))


def patch_grid_distances(grid_size: tuple[int, int],
                         device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) Euclidean distances, in patches, between row-major patch positions of a grid."""
    rows, cols = grid_size
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64, device=device),
                          torch.arange(cols, dtype=torch.float64, device=device), indexing="ij")
    positions = torch.stack([r.reshape(-1), c.reshape(-1)], dim=-1)
    return torch.cdist(positions, positions)


def mean_attention_distance(attention: torch.Tensor, num_prefix_tokens: int,
                            grid_size: tuple[int, int]) -> torch.Tensor:
    """Per-image mean over heads and patch queries of the attention-weighted patch distance -> (B,)."""
    _check_attention(attention, num_prefix_tokens)
    weights = attention[:, :, num_prefix_tokens:, num_prefix_tokens:].to(torch.float64)
    num_patches = weights.shape[-1]
    if grid_size[0] * grid_size[1] != num_patches:
        raise ValueError(f"grid {grid_size} has {grid_size[0] * grid_size[1]} patches, "
                         f"attention has {num_patches}")
    mass = weights.sum(dim=-1)
    distance = (weights * patch_grid_distances(grid_size, weights.device)).sum(dim=-1)
    per_query = torch.where(mass > 0, distance / mass.clamp_min(torch.finfo(mass.dtype).tiny), 0.0)
    return per_query.mean(dim=(1, 2))


class AttentionMetrics(StreamingMetric):
    """CLS centrality, consensus, entropy and mean distance of every block's attention.

    compute() -> {block_k: {"cls_centrality", "cls_centrality_ratio", "consensus", "entropy",
                            "entropy_normalized", "mean_distance", "num_tokens"}}
    (cls_centrality and its ratio are None without a CLS token).
    """

    name = "attention"
    needs_attention = True

    def __init__(self, chunk_elements: int | None = None) -> None:
        """chunk_elements: None = CPU_CHUNK_ELEMENTS for attention on the CPU, else DEFAULT_CHUNK_ELEMENTS."""
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.chunk_elements = chunk_elements
        super().__init__()

    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if stage.attention is None:
            return
        attention, prefix = stage.attention, batch.num_prefix_tokens
        heads, tokens = attention.shape[1], attention.shape[-1]
        elements = self.chunk_elements or (
            CPU_CHUNK_ELEMENTS if attention.device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS)
        chunk = max(1, elements // (heads * tokens * tokens))
        for part in attention.split(chunk):
            part = part.to(torch.float64)  # once per chunk; the metric functions then skip their own cast
            if batch.has_class_token:
                self.accumulate(f"{stage.name}/cls_centrality", cls_centrality(part, prefix).sum())
            self.accumulate(f"{stage.name}/consensus", attention_consensus(part, prefix).sum())
            self.accumulate(f"{stage.name}/entropy", attention_entropy(part).sum())
            self.accumulate(f"{stage.name}/mean_distance",
                            mean_attention_distance(part, prefix, batch.grid_size).sum())
        self.accumulate(f"{stage.name}/images", attention.shape[0])
        self.accumulate(f"{stage.name}/tokens", attention.shape[0] * tokens)

    def compute(self) -> dict[str, Any]:
        results = {}
        for stage in self.stages_seen():
            images = self.sum(f"{stage}/images").item()
            if images == 0:
                continue
            tokens = round(self.sum(f"{stage}/tokens").item() / images)
            mean = {key: self.sum(f"{stage}/{key}").item() / images
                    for key in ("consensus", "entropy", "mean_distance")}
            centrality = (self.sum(f"{stage}/cls_centrality").item() / images
                          if f"{stage}/cls_centrality" in self.sums() else None)
            results[stage] = {
                "cls_centrality": centrality,
                "cls_centrality_ratio": None if centrality is None else tokens * centrality,
                "consensus": mean["consensus"],
                "entropy": mean["entropy"],
                "entropy_normalized": mean["entropy"] / math.log(tokens),
                "mean_distance": mean["mean_distance"],
                "num_tokens": tokens,
            }
        return results
