"""One forward pass of a timm VisionTransformer, stage by stage.

Stages, in order (science.md notation):
    embed      patch_embed output, before the position embedding       (B, N, D)   patch tokens only
    pe         after prefix tokens and pos_embed are added              (B, P+N, D)
    block_1 .. block_L   residual stream after each block               (B, P+N, D)
    norm       final norm                                               (B, P+N, D)
P = model.num_prefix_tokens (CLS and registers come first), N = patches.

The model is run through its own modules in eval mode and is not modified. Attention
probabilities, which timm's fused attention never forms, are recomputed from each block's
qkv projection on its norm1 input (`softmax(q k^T * scale)`, with q/k norms applied), so the
block itself still runs its fused kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

EMBED, PE, NORM = "embed", "pe", "norm"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The timm model inside DDP / accelerate / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def block_stage(index: int) -> str:
    """Stage name of the residual stream after block `index` (0-based): block_1 is the first."""
    return f"block_{index + 1}"


def stage_names(model: nn.Module) -> list[str]:
    model = unwrap_model(model)
    return [EMBED, PE, *(block_stage(i) for i in range(len(model.blocks))), NORM]


def patch_tokens(tokens: torch.Tensor, stage: str, num_prefix_tokens: int) -> torch.Tensor:
    """The N patch tokens of a stage (the `embed` stage has no prefix tokens)."""
    return tokens if stage == EMBED else tokens[:, num_prefix_tokens:]


def attention_probabilities(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention (B, H, T, T) of a timm `Attention` module on its input x (B, T, D)."""
    for name in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm"):
        if not hasattr(attn, name):
            raise TypeError(f"{type(attn).__name__} is not a timm Attention (no `{name}`)")
    B, T, _ = x.shape
    inner = attn.num_heads * attn.head_dim
    if type(attn.qkv) is nn.Linear:  # only q and k: the first two thirds of qkv's output rows
        bias = None if attn.qkv.bias is None else attn.qkv.bias[:2 * inner]
        qk = nn.functional.linear(x, attn.qkv.weight[:2 * inner], bias)
    else:
        qk = attn.qkv(x)[..., :2 * inner]
    qk = qk.reshape(B, T, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@dataclass
class Stage:
    name: str
    tokens: torch.Tensor  # (B, T, D)
    attention: torch.Tensor | None = None  # (B, H, T, T) for block stages when requested


@torch.no_grad()
def iterate_stages(model: nn.Module, images: torch.Tensor, attention: bool = False) -> Iterator[Stage]:
    """Yield every stage of one forward pass; holds only the current residual stream.

    Consumers that stream (metrics accumulators) see each stage once and can drop it,
    so a deep model's activations are never all in memory.
    """
    model = unwrap_model(model)
    with eval_mode(model):
        x = model.patch_embed(images)
        if x.ndim == 4:  # dynamic_img_size models keep NHWC until the position embedding
            yield Stage(EMBED, x.flatten(1, 2))
        else:
            yield Stage(EMBED, x)
        x = model._pos_embed(x)
        yield Stage(PE, x)
        x = model.norm_pre(model.patch_drop(x))
        for index, block in enumerate(model.blocks):
            probs = attention_probabilities(block.attn, block.norm1(x)) if attention else None
            x = block(x)
            yield Stage(block_stage(index), x, probs)
        yield Stage(NORM, model.norm(x))


@dataclass
class CapturedForward:
    stages: dict[str, torch.Tensor]
    attention: dict[str, torch.Tensor]
    logits: torch.Tensor
    num_prefix_tokens: int


@torch.no_grad()
def capture(model: nn.Module, images: torch.Tensor, attention: bool = False) -> CapturedForward:
    """All stages (and optionally attention) of one forward pass, plus the logits, held in memory."""
    inner = unwrap_model(model)
    stages, attn = {}, {}
    for stage in iterate_stages(inner, images, attention=attention):
        stages[stage.name] = stage.tokens
        if stage.attention is not None:
            attn[stage.name] = stage.attention
    with eval_mode(inner):
        logits = inner.forward_head(stages[NORM])
    return CapturedForward(stages, attn, logits, inner.num_prefix_tokens)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


PE_SCALE_ROWS = ("patches", "all")


@contextlib.contextmanager
def scaled_position_embedding(model: nn.Module, alpha: float, rows: str = "patches") -> Iterator[nn.Module]:
    """Evaluate with e_i + alpha * p_i (science.md §1, PE-scale experiment); restored on exit.

    `rows="patches"` scales the rows of the patch positions only, as the experiment is defined; the
    rows of prefix tokens (CLS, registers), when pos_embed has them, stay as trained. `"all"` scales
    every row (what depthlab did before, kept to compare)."""
    model = unwrap_model(model)
    if model.pos_embed is None:
        raise ValueError(f"{type(model).__name__} has no learned pos_embed to scale")
    if rows not in PE_SCALE_ROWS:
        raise ValueError(f"pe_scale rows = {rows!r}: expected one of {', '.join(PE_SCALE_ROWS)}")
    original = model.pos_embed.detach().clone()
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    first = prefix if rows == "patches" else 0
    with torch.no_grad():
        model.pos_embed[:, first:].mul_(alpha)
    try:
        yield model
    finally:
        with torch.no_grad():
            model.pos_embed.copy_(original)
