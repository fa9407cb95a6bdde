"""Optimizer groups, trainable masks, LR scaling and the per-update schedule."""

import math

import pytest
import torch

from models import create_vit
from trainer.optim import (
    apply_trainable_patterns,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    scaled_lr,
)
from trainer.recipe import RecipeError
from trainer.recipe_schema import OptimConfig, ScheduleConfig

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def grouped_vit():
    return create_vit("vit_tiny_patch16_224", {"kind": "grouped_mlp", "group_size": 2}, **TINY)


@pytest.mark.parametrize("variant", ["none", "grouped_mlp", "shallow_mlp"])
def test_every_trainable_parameter_in_exactly_one_group(variant):
    model = create_vit("vit_tiny_patch16_224", {"kind": variant}, **TINY)
    groups = build_param_groups(model, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    unique = {id(p) for p in model.parameters()}  # parameters() de-duplicates shared tensors
    assert len(ids) == len(set(ids)) == len(unique)
    assert set(ids) == unique


def test_shared_mlp_tensor_appears_once_and_decay_rules():
    model = grouped_vit()
    groups = build_param_groups(model, weight_decay=0.05)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    shared = model.blocks[0].mlp.fc1.weight
    assert shared is model.blocks[1].mlp.fc1.weight
    assert sum(p is shared for g in groups for p in g["params"]) == 1
    # Brute force: the rule by name over every registered (possibly duplicated) parameter name.
    for name, p in model.named_parameters(remove_duplicate=False):
        expect_decay = not (p.ndim <= 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"))
        assert (id(p) in decay) == expect_decay, name


def test_trainable_patterns_freeze_the_rest_and_optimizer_sees_only_trainable():
    model = grouped_vit()
    names = apply_trainable_patterns(model, ["blocks.*.attn.*", "head.*"])
    assert names and all(n.startswith("head.") or ".attn." in n for n in names)
    opt = build_optimizer(model, OptimConfig(fused=False), lr=1e-3)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert not model.blocks[0].mlp.fc1.weight.requires_grad


def test_trainable_pattern_matching_nothing_is_a_user_error():
    with pytest.raises(RecipeError, match="blocks.\\*.atn"):
        apply_trainable_patterns(grouped_vit(), ["blocks.*.atn.*"])


def test_lr_scales_linearly_with_global_batch():
    assert scaled_lr(1e-3, 4096, 1024) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 64, None) == 1e-3


def test_schedule_warmup_then_cosine_per_update():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    cfg = ScheduleConfig(epochs=10, warmup_epochs=2, warmup_lr=0.1, min_lr=0.01)
    sched = build_scheduler(opt, cfg, updates_per_epoch=5)
    total, warmup = 50, 10
    for t in range(total + 3):
        sched.step_update(t)
        if t < warmup:  # linear from warmup_lr towards the peak
            expected = 0.1 + t * (1.0 - 0.1) / warmup
        elif t < total:  # DeiT/timm: the cosine spans all updates, warm-up replaces its start
            expected = 0.01 + 0.5 * (1.0 - 0.01) * (1 + math.cos(math.pi * t / total))
        else:
            expected = 0.01
        assert opt.param_groups[0]["lr"] == pytest.approx(expected), t


def test_warmup_longer_than_run_is_refused():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    with pytest.raises(RecipeError, match="warm-up"):
        build_scheduler(opt, ScheduleConfig(epochs=1, warmup_epochs=2), updates_per_epoch=5)


def test_empty_trainable_patterns_train_everything_again():
    model = create_vit("vit_tiny_patch16_224", **TINY)
    apply_trainable_patterns(model, ["head.*"])
    assert not model.blocks[0].attn.qkv.weight.requires_grad
    names = apply_trainable_patterns(model, [])
    assert all(p.requires_grad for p in model.parameters())
    assert names == [n for n, _ in model.named_parameters()]
