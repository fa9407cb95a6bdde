"""Token similarity per stage (science.md §1) and position-embedding dominance.

For the tokens x_1..x_N of one image at one stage, with unit vectors u_i = x_i / ‖x_i‖:

    raw      S   = mean cosine over ordered pairs i ≠ j = (‖Σ_i u_i‖² − Σ_i ‖u_i‖²) / (N(N−1))
    centered S_c = the same on c_i = x_i − mean_j x_j (subtract the image's mean token first)

computed in O(N·D) with that identity rather than over the N² pairs, in float64. Both are
averaged over images. Tokens are the N patch tokens; `include_cls=True` adds the CLS token
(never register tokens) at every stage except `embed`, which has no CLS yet.

Zero-norm guard: a token whose norm (after centering, for S_c) is at most
`zero_tol` × the largest raw token norm of its image has no direction. It contributes a zero
unit vector: it stays in the N(N−1) pair count with cosine 0 to every other token (hence the
Σ‖u_i‖² term, which counts the tokens that do have a direction). All-identical tokens
therefore give S_c = 0, and S_c ≥ −K/(N(N−1)) ≥ −1/(N−1) still holds (K = tokens with a
direction), because ‖Σ u_i‖² ≥ 0.

PE dominance: PE-Dom = mean_i ‖p_i‖ / mean_{images, i} ‖e_i‖, with e_i the patch-embed output
(stage `embed`) and p_i the position embedding actually added to patch i, read as
pe_i − e_i. Reading it off the two stages (rather than `model.pos_embed`) covers
`no_embed_class`, resampled (`dynamic_img_size`) and absent position embeddings alike.
"""

from __future__ import annotations

from typing import Any

import torch

from diagnostics.capture import EMBED, PE, Stage, patch_tokens
from diagnostics.streaming import ProbeBatch, StreamingMetric, ordered_stages

DEFAULT_ZERO_TOL = 1e-10


def unit_tokens(tokens: torch.Tensor, reference_norm: torch.Tensor | None = None,
                zero_tol: float = DEFAULT_ZERO_TOL) -> torch.Tensor:
    """tokens / ‖tokens‖ along the last dim, with tokens that have no direction set to 0.

    A token has no direction when its norm is ≤ zero_tol·reference_norm (`reference_norm` of
    shape (..., 1) broadcasting against the token norms, e.g. (B, 1) per image), or is exactly
    0 when no reference is given.
    """
    norms = tokens.norm(dim=-1, keepdim=True)
    threshold = 0.0 if reference_norm is None else zero_tol * reference_norm.unsqueeze(-1)
    return torch.where(norms > threshold, tokens / norms.clamp_min(torch.finfo(tokens.dtype).tiny), 0.0)


def mean_pairwise_cosine_of_units(units: torch.Tensor) -> torch.Tensor:
    """Mean of u_i·u_j over ordered pairs i ≠ j of (..., N, D) unit-or-zero vectors -> (...)."""
    n = units.shape[-2]
    if n < 2:
        raise ValueError(f"pairwise similarity needs at least 2 tokens, got {n}")
    total = units.sum(dim=-2).square().sum(dim=-1)
    diagonal = units.square().sum(dim=(-2, -1))
    return (total - diagonal) / (n * (n - 1))


def _largest_token_norm(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.norm(dim=-1).amax(dim=-1, keepdim=True)


def token_similarity_raw(tokens: torch.Tensor, zero_tol: float = DEFAULT_ZERO_TOL) -> torch.Tensor:
    """Per-image raw similarity S of (B, N, D) tokens -> (B,) float64."""
    tokens = tokens.to(torch.float64)
    return mean_pairwise_cosine_of_units(unit_tokens(tokens, _largest_token_norm(tokens), zero_tol))


def token_similarity_centered(tokens: torch.Tensor, zero_tol: float = DEFAULT_ZERO_TOL) -> torch.Tensor:
    """Per-image centered similarity S_c of (B, N, D) tokens -> (B,) float64; S_c ≥ −1/(N−1)."""
    tokens = tokens.to(torch.float64)
    centered = tokens - tokens.mean(dim=-2, keepdim=True)
    return mean_pairwise_cosine_of_units(unit_tokens(centered, _largest_token_norm(tokens), zero_tol))


def similarity_tokens(stage: Stage, batch: ProbeBatch, include_cls: bool = False) -> torch.Tensor:
    """The tokens whose similarity is measured: patch tokens, plus CLS (token 0) if asked and present."""
    patches = patch_tokens(stage.tokens, stage.name, batch.num_prefix_tokens)
    if not include_cls or stage.name == EMBED:
        return patches
    if not batch.has_class_token:
        raise ValueError("include_cls=True but the model has no CLS token (class_token=False)")
    return torch.cat([stage.tokens[:, :1], patches], dim=1)


class TokenSimilarity(StreamingMetric):
    """Raw and centered token similarity at every stage, averaged over probe images.

    compute() -> {stage: {"raw": S, "centered": S_c, "num_tokens": N,
                          "centered_lower_bound": -1/(N-1)}}
    """

    name = "token_similarity"

    def __init__(self, include_cls: bool = False, zero_tol: float = DEFAULT_ZERO_TOL) -> None:
        if zero_tol < 0:
            raise ValueError(f"zero_tol must be >= 0, got {zero_tol}")
        self.include_cls = include_cls
        self.zero_tol = zero_tol
        super().__init__()

    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        tokens = similarity_tokens(stage, batch, self.include_cls)
        self.accumulate(f"{stage.name}/raw", token_similarity_raw(tokens, self.zero_tol).sum())
        self.accumulate(f"{stage.name}/centered", token_similarity_centered(tokens, self.zero_tol).sum())
        self.accumulate(f"{stage.name}/images", tokens.shape[0])
        self.accumulate(f"{stage.name}/tokens", tokens.shape[0] * tokens.shape[1])

    def compute(self) -> dict[str, Any]:
        results = {}
        for stage in self.stages_seen():
            images = self.sum(f"{stage}/images").item()
            if images == 0:
                continue
            num_tokens = round(self.sum(f"{stage}/tokens").item() / images)
            results[stage] = {
                "raw": self.sum(f"{stage}/raw").item() / images,
                "centered": self.sum(f"{stage}/centered").item() / images,
                "num_tokens": num_tokens,
                "centered_lower_bound": -1.0 / (num_tokens - 1),
            }
        return results


class PositionEmbeddingDominance(StreamingMetric):
    """PE-Dom = mean ‖p_i‖ / mean ‖e_i‖ over patch positions (and probe images).

    compute() -> {"pe": {"pe_dominance": ratio, "pos_embed_norm": mean ‖p_i‖,
                         "patch_embed_norm": mean ‖e_i‖}}
    """

    name = "pe_dominance"

    def __init__(self) -> None:
        super().__init__()
        self._embed: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self._embed = None

    def update(self, stage: Stage, batch: ProbeBatch) -> None:
        if stage.name == EMBED:
            self._embed = stage.tokens
        elif stage.name == PE:
            if self._embed is None:
                raise RuntimeError("PositionEmbeddingDominance saw stage `pe` before `embed`")
            embed = self._embed.to(torch.float64)
            position = patch_tokens(stage.tokens, PE, batch.num_prefix_tokens).to(torch.float64) - embed
            self.accumulate("pe/pos_embed_norm", position.norm(dim=-1).sum())
            self.accumulate("pe/patch_embed_norm", embed.norm(dim=-1).sum())
            self.accumulate("pe/tokens", embed.shape[0] * embed.shape[1])
            self._embed = None

    def compute(self) -> dict[str, Any]:
        if "pe/tokens" not in self.sums() or self.sum("pe/tokens").item() == 0:
            return {}
        count = self.sum("pe/tokens").item()
        pos_norm = self.sum("pe/pos_embed_norm").item() / count
        embed_norm = self.sum("pe/patch_embed_norm").item() / count
        dominance = pos_norm / embed_norm if embed_norm > 0 else None
        return {"pe": {"pe_dominance": dominance, "pos_embed_norm": pos_norm, "patch_embed_norm": embed_norm}}


def similarity_curve(results: dict[str, Any], key: str = "centered") -> tuple[list[str], list[float]]:
    """(stage names, values) of one similarity in stage order, from `TokenSimilarity.compute()`."""
    stages = ordered_stages(results)
    return stages, [float(results[stage][key]) for stage in stages]
