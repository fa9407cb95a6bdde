"""One forward pass of a timm VisionTransformer, stage by stage.

Stages, in order (science.md notation):
    embed      patch_embed output, before the position embedding       (B, N, D)   patch tokens only
    pe         after prefix tokens and pos_embed are added              (B, P+N, D)
    block_1 .. block_L   residual stream after each block               (B, P+N, D)
    norm       final norm                                               (B, P+N, D)
P = model.num_prefix_tokens (CLS and registers come first), N = patches.

The model is run through its own modules in eval mode and is left as it was. When attention is
asked for, each block runs timm's explicit attention path instead of the fused kernel (its own
`fused_attn = False` branch, for the duration of that block's call: the same values to float
rounding), and the post-softmax probabilities are read where that path hands them to `attn_drop`
(the identity in eval mode): formed once, by the block itself, rather than recomputed beside it.
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


def pe_is_embed_plus_fixed_vectors(model: nn.Module) -> bool:
    """Whether stage `pe`'s patch tokens are stage `embed`'s plus one fixed vector per position: timm's own
    `_pos_embed` (pos_embed added, or none; its dropout is the identity in eval mode, where stages are taken)."""
    from timm.models.vision_transformer import VisionTransformer

    model = unwrap_model(model)
    return isinstance(model, VisionTransformer) and getattr(model._pos_embed, "__func__", None) is VisionTransformer._pos_embed


def patch_tokens(tokens: torch.Tensor, stage: str, num_prefix_tokens: int) -> torch.Tensor:
    """The N patch tokens of a stage (the `embed` stage has no prefix tokens)."""
    return tokens if stage == EMBED else tokens[:, num_prefix_tokens:]


def block_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A timm block's output on x (B, T, D) and its post-softmax attention (B, H, T, T) float32, from
    timm's explicit attention path (the input of `attn_drop`); the module's `fused_attn` is restored after."""
    attn = getattr(block, "attn", None)
    if not (hasattr(attn, "fused_attn") and isinstance(getattr(attn, "attn_drop", None), nn.Module)):
        raise TypeError(f"{type(attn).__name__} is not a timm Attention (no `fused_attn` and `attn_drop`)")
    captured: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        x = block(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    if len(captured) != 1:
        raise TypeError(f"{type(attn).__name__} passed {len(captured)} tensors through attn_drop in one call, "
                        "not its attention probabilities once")
    return x, captured[0].float()


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
            probs = None
            if attention:
                x, probs = block_with_attention(block, x)
            else:
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
