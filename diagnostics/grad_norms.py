"""Per-component gradient norms of a ViT during training (science.md §6, P3's mechanism).

`component_grad_norms(model)` after `backward()` returns, for every block and each component
type, the L2 norm of the gradients of that component's parameters (weights and biases together):

    LN1 = norm1, MHA = attn (qkv, proj, q/k norms), LN2 = norm2, FC1 = mlp.fc1, FC2 = mlp.fc2

Other block parameters (LayerScale gammas, an MLP-internal norm) are not part of the five.
Every parameter is counted once: a module or tensor shared by several blocks (GroupedMLP's MLP,
`group_size` blocks long) is reported once, under the first block that uses it, and the
following blocks of its group have no FC1/FC2 entry; `mlp_groups` lists which blocks share.
A component whose parameters have no gradient (frozen, as in P3's component finetuning) is null.

Call it where the full, unscaled gradients exist: after `accelerator.backward`, and with fp16
loss scaling after `accelerator.clip_grad_norm_` / `unscale_gradients` (else the norms carry the
loss scale). Under DDP gradients are already averaged over ranks; under FSDP each rank holds a shard
(`sharded=True` sums the shards' squares); under DeepSpeed the engine holds them between its backward
and its step (`grad_of=deepspeed.utils.safe_get_full_grad`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diagnostics.capture import block_stage, unwrap_model
from diagnostics.distributed import all_reduce_sum
from diagnostics.registry import COMPONENTS

GRAD_COMPONENTS = COMPONENTS


def block_components(block: nn.Module) -> dict[str, nn.Module]:
    """The five P3 components of a timm pre-norm Block."""
    try:
        return {"LN1": block.norm1, "MHA": block.attn, "LN2": block.norm2,
                "FC1": block.mlp.fc1, "FC2": block.mlp.fc2}
    except AttributeError as error:
        raise TypeError(f"{type(block).__name__} is not a timm pre-norm Block with an Mlp "
                        f"({error})") from None


def mlp_groups(model: nn.Module) -> dict[str, list[str]]:
    """{first block: [blocks sharing its MLP]} for every MLP module (one entry per block without sharing)."""
    groups: dict[int, list[str]] = {}
    for index, block in enumerate(unwrap_model(model).blocks):
        groups.setdefault(id(block.mlp), []).append(block_stage(index))
    return {members[0]: members for members in groups.values()}


@torch.no_grad()
def component_grad_norms(model: nn.Module, grad_of: Callable[[nn.Parameter], torch.Tensor | None] | None = None,
                         sharded: bool = False) -> dict[str, Any]:
    """`{"LN1": {"block_1": norm, ...}, ..., "mlp_groups": {...}}` of the current gradients.

    `grad_of(param)` reads a parameter's gradient (default `param.grad`; DeepSpeed ZeRO keeps gradients in
    its engine: pass `deepspeed.utils.safe_get_full_grad`, a collective). `sharded=True`: each process holds
    a shard of every gradient (FSDP with use_orig_params), so the squared norms are summed over the
    processes (a collective) before the square root; a process without a shard of a parameter adds 0.
    """
    grad_of = grad_of or (lambda param: param.grad)
    entries: list[tuple[str, str, list[torch.Tensor] | None]] = []
    seen: set[int] = set()
    for index, block in enumerate(unwrap_model(model).blocks):
        for component, module in block_components(block).items():
            params = [p for p in module.parameters() if id(p) not in seen]
            if not params:
                continue  # shared with an earlier block: already reported there
            seen.update(id(p) for p in params)
            grads = [g for g in (grad_of(p) for p in params if p.requires_grad) if g is not None]
            frozen = not any(p.requires_grad for p in params)
            entries.append((component, block_stage(index), None if frozen or not (grads or sharded) else grads))
    device = next(unwrap_model(model).parameters()).device
    squares = torch.stack([torch.stack([g.float().square().sum() for g in grads]).sum().to(device) if grads
                           else torch.zeros((), device=device) for _, _, grads in entries if grads is not None]
                          or [torch.zeros((), device=device)])
    if sharded:
        all_reduce_sum(squares)
    norms = iter(squares.sqrt().tolist())
    result: dict[str, Any] = {component: {} for component in GRAD_COMPONENTS}
    for component, stage, grads in entries:
        result[component][stage] = next(norms) if grads is not None else None
    result["mlp_groups"] = mlp_groups(model)
    return result
