"""The papers' protocols as their released code ran them (science.md §5, §6): P2's recipes against P2's
stated values, P2's per-epoch LR trace against timm's own scheduler built as P2's train.py builds it, P2's
EMA against timm's ModelEmaV3, P3's warm-up-then-cosine schedule, P3's inputs and head-less backbone."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3

from models import create_vit
from models.weights import load_initial_weights
from tests.conftest import REPO, TINY_OVERRIDES
from trainer.loop import train
from trainer.optim import ParameterEma, build_scheduler
from trainer.recipe import load_recipe
from trainer.recipe_schema import ScheduleConfig

P2_RECIPES = ("vit_b.yaml", "vit_b_grouped_mlp.yaml", "vit_b_shallow_mlp.yaml", "vit_b_thin_mlp.yaml")
# P2's README command plus the defaults of its fork of timm's train.py (science.md §5)
P2_STATED = {
    "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05, "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8, "schedule.kind": "cosine", "schedule.epochs": 300, "schedule.warmup_epochs": 5,
    "schedule.warmup_lr": 1e-5, "schedule.min_lr": 0.0, "schedule.step_on": "epoch",
    "schedule.warmup_prefix": False, "model.drop_path_rate": 0.1, "model.img_size": 224,
    "augment.auto_augment": "rand-m9-mstd0.5-inc1", "augment.mixup": 0.8, "augment.cutmix": 1.0,
    "augment.reprob": 0.25, "augment.remode": "pixel", "augment.label_smoothing": 0.1, "augment.repeated_aug": 3,
    "augment.train_interpolation": "random", "augment.eval_interpolation": "bicubic", "augment.crop_pct": 0.9,
    "augment.mean": [0.5, 0.5, 0.5], "augment.std": [0.5, 0.5, 0.5], "augment.scale": [0.08, 1.0],
    "augment.hflip": 0.5, "train.precision": "fp16", "train.ema_decay": 0.9998, "train.ema_walk": "state_dict",
}
P2_GLOBAL_BATCH = 1024  # 2 GPUs x 256 x 2 accumulation steps in P2; the recipes say 8 x 128


def value(recipe, key: str):
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


@pytest.mark.parametrize("name", P2_RECIPES)
def test_p2_recipes_state_p2s_protocol(name):
    recipe = load_recipe(REPO / "recipes" / name)
    assert {key: value(recipe, key) for key in P2_STATED} == P2_STATED
    assert recipe.train.batch_size * 8 == recipe.optim.lr_reference_batch == P2_GLOBAL_BATCH  # lr 1e-3 at 1024
    header = (REPO / "recipes" / name).read_text().split("\n\n")[0]
    assert "P2" in header


def p2_lr_trace(epochs: int, warmup_epochs: int, updates_per_epoch: int, lr: float) -> list[float]:
    """The LR after every update of timm's train.py as P2 ran it: create_scheduler_v2 from its argparse
    defaults (no --sched-on-updates), step_update(num_updates) per update, step(epoch + 1) per epoch."""
    args = Namespace(sched="cosine", epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=1e-5, min_lr=0.0,
                     sched_on_updates=False, decay_epochs=90, cooldown_epochs=0, warmup_prefix=False)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    trace, num_updates = [], 0
    for epoch in range(epochs):
        for update in range(updates_per_epoch):
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            if update == updates_per_epoch - 1:
                scheduler.step(epoch + 1)
            trace.append(optimizer.param_groups[0]["lr"])
    return trace


def test_a_shrunk_p2_recipe_follows_timms_own_per_epoch_schedule(tmp_path, fresh_accelerate):
    # 64 synthetic images / 8 = 8 updates per epoch, 6 epochs, 2 of warm-up; fp32 on CPU (fp16 needs a GPU)
    shrink = [*TINY_OVERRIDES, "schedule.epochs=6", "schedule.warmup_epochs=2", "train.precision='no'",
              "schedule.warmup_lr=1e-5", "optim.lr_reference_batch=null", "optim.lr=1e-3", "augment.mixup=0",
              "augment.cutmix=0",
              "augment.repeated_aug=1", "eval.every_epochs=6", "checkpoint.every_epochs=6"]
    recipe = load_recipe(REPO / "recipes" / "vit_b.yaml", shrink)
    assert recipe.schedule.step_on == "epoch" and recipe.schedule.warmup_lr == 1e-5 and recipe.schedule.min_lr == 0
    train(recipe, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ours = [r["lr"] for r in records if r["kind"] == "train"]
    expected = p2_lr_trace(6, 2, 8, 1e-3)
    assert len(ours) == len(expected) == 48
    assert ours == pytest.approx(expected, rel=1e-5, abs=1e-12)
    # stairs: the LR (logged after each update, so the epoch's last one shows the next epoch's) is constant
    assert len(set(ours[:7])) == 1 and ours[6] != ours[7] == ours[8] == ours[14] != ours[15]


def grouped_model():
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", {"kind": "grouped_mlp", "group_size": 2}, img_size=16, patch_size=4,
                      embed_dim=16, depth=4, num_heads=2, num_classes=3)


def test_p2s_ema_is_timms_model_ema_v3_and_the_default_averages_a_shared_tensor_once():
    model, decay = grouped_model(), 0.9
    ours, timms, fixed = ParameterEma(model, decay, walk="state_dict"), ModelEmaV3(model, decay=decay), \
        ParameterEma(model, decay)
    shared, single = "blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.weight"  # tied to blocks.1.mlp / not tied
    # by hand: the default averages every tensor once per update; timm's walk visits a GroupedMLP tensor
    # under blocks.0.mlp and blocks.1.mlp (twice), and its first update (step 1, decay 0) copies the weights
    expected_fixed = {name: model.state_dict()[name].detach().clone() for name in (shared, single)}
    expected_ours: dict[str, torch.Tensor] = {}
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
        for ema in (ours, timms, fixed):
            ema.update(model, step=step)
        for name, tensor in timms.module.state_dict().items():
            torch.testing.assert_close(ours.module.state_dict()[name], tensor, rtol=0, atol=1e-7, msg=name)
        for name, visits in ((shared, 2), (single, 1)):
            expected_fixed[name] = decay * expected_fixed[name] + (1 - decay) * weights[name]
            expected = weights[name] if step == 1 else expected_ours[name]
            for _ in range(visits if step > 1 else 0):
                expected = decay * expected + (1 - decay) * weights[name]
            expected_ours[name] = expected
            torch.testing.assert_close(ours.module.state_dict()[name], expected, rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(fixed.module.state_dict()[name], expected_fixed[name], rtol=0, atol=1e-6)


def test_p3s_schedule_warms_up_first_then_runs_the_cosine_over_the_remaining_steps():
    """P3's released code (vitef/optim.py lr_cosine): lr(step) = step / warmup below `warmup`, then
    0.5 (1 + cos(pi (step - warmup) / (n - warmup))); depthlab's default overwrites the cosine's start."""
    n, warmup, lr = 10_000, 2_000, 0.01

    def trace(prefix: bool) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler = build_scheduler(optimizer, ScheduleConfig(epochs=1, warmup_steps=warmup, warmup_lr=0.0,
                                                              min_lr=0.0, warmup_prefix=prefix), n)
        values = []
        for step in range(n):
            values.append(optimizer.param_groups[0]["lr"])
            scheduler.step_update(step + 1)
        return values

    p3 = [lr * (s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (n - warmup))))
          for s in range(n)]
    prefix, overwrite = trace(True), trace(False)
    assert prefix == pytest.approx(p3, rel=1e-9, abs=1e-15)
    assert 1 - sum(overwrite) / sum(prefix) == pytest.approx(0.187, abs=0.001)  # 18.7 % less LR in all
    assert overwrite[warmup] / lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)), abs=1e-6)  # ~10 % drop


def test_p3s_recipe_and_a_backbone_without_a_head(tmp_path, caplog):
    recipe = load_recipe(REPO / "recipes" / "vit_b_finetune.yaml")
    assert (recipe.augment.mean, recipe.augment.std) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert recipe.train.precision == "no" and recipe.schedule.warmup_prefix and recipe.schedule.warmup_steps == 2000
    assert (recipe.optim.name, recipe.optim.momentum, recipe.optim.weight_decay, recipe.optim.clip_grad_norm) == \
        ("sgd", 0.9, 0.0, 1.0)
    # orig_in21k: Google's ViT-B/16 weights come without a classifier
    source = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                        num_classes=0)
    backbone = {k: v for k, v in source.state_dict().items()}
    assert not any(k.startswith("head.") for k in backbone)
    save_file(backbone, tmp_path / "backbone.safetensors")
    torch.manual_seed(1)
    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                       num_classes=5)
    fresh_head = model.head.weight.detach().clone()
    info = load_initial_weights(model, Path(tmp_path / "backbone.safetensors"))
    assert sorted(info.reinitialised) == ["head.bias", "head.weight"]
    assert "has no classifier: head.bias, head.weight initialised fresh" in caplog.text
    torch.testing.assert_close(model.head.weight, fresh_head)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_p3s_per_seed_validation_split_picks_the_checkpoint_and_the_reported_test_accuracy(tmp_path,
                                                                                        fresh_accelerate):
    from trainer.data import hold_out
    from trainer.data.sources import load_split
    from trainer.run_dir import accuracy_summary

    recipe = load_recipe(REPO / "recipes" / "demo_digits.yaml", [*TINY_OVERRIDES, "data.val_fraction=0.25"])
    raw = load_split(recipe, "train")
    (train_a, val_a), (_, val_b) = hold_out(raw, 0.25, seed=0), hold_out(raw, 0.25, seed=1)
    assert len(val_a.dataset) == 16 and len(train_a.dataset) == 48
    assert not set(val_a.dataset.indices) & set(train_a.dataset.indices)
    assert set(val_a.dataset.indices) != set(val_b.dataset.indices)  # drawn anew per seed
    assert hold_out(raw, 0.25, seed=0)[1].dataset.indices == val_a.dataset.indices

    # 48 images train: 6 updates per epoch; evaluate (validation and test) every epoch
    result = train(load_recipe(REPO / "recipes" / "demo_digits.yaml",
                               [*TINY_OVERRIDES, "data.val_fraction=0.25", "schedule.epochs=3",
                                "eval.every_epochs=1", "checkpoint.every_epochs=null", "train.ema_decay=null",
                                "checkpoint.best_on=raw"]), tmp_path / "run")
    evals = result.state.evals
    assert len(evals) == 3 and all({"val_top1", "val_top5", "top1", "top5"} <= set(e) for e in evals)
    best = max(evals, key=lambda e: e["val_top1"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["raw"]
    assert summary["val_top1_best"] == best["val_top1"] and summary["top1_at_best_val"] == best["top1"]
    assert (tmp_path / "run" / "checkpoints" / "best").resolve().name == f"step_{best['step']:08d}"
    # the earliest of equal validation bests, its own test accuracy (not the best test accuracy)
    picked = accuracy_summary([{"step": 1, "epoch": 1, "val_top1": 50.0, "top1": 40.0},
                               {"step": 2, "epoch": 2, "val_top1": 50.0, "top1": 45.0},
                               {"step": 3, "epoch": 3, "val_top1": 40.0, "top1": 60.0}])
    assert (picked["top1_at_best_val"], picked["best_val_step"], picked["top1_best"]) == (40.0, 1, 60.0)
