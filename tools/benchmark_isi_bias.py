"""Bias of depthlab's ISI against probe size, on ViTs whose true ISI is known.

- **No mixing** (`no_mixing_vit`): every block's attention is masked to the diagonal, so each token
  (CLS too) attends only to itself and its output is the value projection of itself. No token ever
  sees another, and on probe images whose patches are independent (i.i.d. Gaussian pixels) the
  other tokens carry no information about a token's `embed` target: the true ISI is 0 at every
  stage, however nonlinear the per-token maps are (`--gain` scales the weights so that they are).
- **Fixed permutation** (`permute_tokens`): the same model with the patch tokens permuted across
  positions right after `pe` (a fixed derangement, kept at every later stage). Position i then holds
  another token's content: R²_self collapses and the ISI must be large. Probe images for it are
  low-frequency (`smooth_images`), so that the top-r PCA of the token set can carry them.
- **Leaky** (`leak_tokens`, `--leak β`): x_i + β·x_π(i) after `pe`, then no mixing: a small real ISI
  (≈ 0.005 at β = 1 in the demo setting with 8k images), to see how much of it a probe set resolves.

For each setting (a recipe's `diagnostics:` probe knobs, shrunk to CPU size) and probe size it runs
depthlab's nested ISI over `--repeats` probe sets and prints, per probe size, the mean ISI over
repeats at the stage where its magnitude is largest, the largest |ISI| over stages and repeats, the
mean over the stages from block_1 on, and R²_self at the last block. `--estimators joint` is the single-penalty estimator ISI used before
(kept as `isi_nested_fit: joint`), `residual` the default.

    python tools/benchmark_isi_bias.py                               # all settings, both estimators
    python tools/benchmark_isi_bias.py --settings demo --sizes 64 256 --repeats 2
    python tools/benchmark_isi_bias.py --png docs/images/isi_bias_vs_probe_size.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn

from diagnostics.isi import ScramblingIndex
from diagnostics.streaming import run_probe
from models import create_vit


class SelfOnlyAttention(nn.Module):
    """A timm `Attention` masked to the diagonal: token t's output is proj(v_t), so nothing moves between tokens.

    Softmax over a single key is 1, so this is exactly attention with every off-diagonal logit at −∞.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.inner = attn

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        attn = self.inner
        batch, tokens, dim = x.shape
        v = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)[:, :, 2]
        v = attn.norm(v.reshape(batch, tokens, dim))
        return attn.proj_drop(attn.proj(v))


class TokenPermutation(nn.Module):
    """Permutes the patch tokens across positions (prefix tokens stay); sits in `norm_pre`, right after `pe`."""

    def __init__(self, order: torch.Tensor, num_prefix_tokens: int) -> None:
        super().__init__()
        self.register_buffer("order", order)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        return torch.cat([x[:, :p], x[:, p:][:, self.order]], 1)


class TokenLeak(nn.Module):
    """Adds `beta` times a fixed derangement of the patch tokens to them (x_i + β·x_π(i)); sits in `norm_pre`.

    A little of each token's content lands at one other position: a small, real ISI.
    """

    def __init__(self, order: torch.Tensor, beta: float, num_prefix_tokens: int) -> None:
        super().__init__()
        self.register_buffer("order", order)
        self.beta, self.num_prefix_tokens = beta, num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        patches = x[:, p:]
        return torch.cat([x[:, :p], patches + self.beta * patches[:, self.order]], 1)


def no_mixing_vit(*, img_size: int = 16, patch_size: int = 4, embed_dim: int = 64, depth: int = 6,
                  num_heads: int = 4, gain: float = 1.0, seed: int = 0) -> nn.Module:
    """A ViT-Ti-layout model (CLS token, learned pos_embed) whose attention never mixes tokens (eval mode).

    Linear weights are redrawn with std gain/√fan_in and biases with std 0.1·gain (LayerNorm affines
    with ±10% noise), so each block is a clearly nonlinear per-token map (R²_self well below 1 at
    depth) instead of timm's near-identity initialisation.
    """
    torch.manual_seed(seed)
    model = create_vit("vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                       depth=depth, num_heads=num_heads, num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, gain / module.in_features ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1 * gain)
            elif isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        model.pos_embed.normal_(0.0, 0.5)
        model.cls_token.normal_(0.0, 0.5)
    for block in model.blocks:
        block.attn = SelfOnlyAttention(block.attn)
    return model.eval()


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(n) with no fixed point (n >= 2)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator)
        if n < 2 or not (order == torch.arange(n)).any():
            return order


def permute_tokens(model: nn.Module, seed: int = 0) -> nn.Module:
    """Install a fixed derangement of the patch tokens after `pe` (in place; returns the model)."""
    model.norm_pre = TokenPermutation(derangement(int(model.patch_embed.num_patches), seed),
                                      int(model.num_prefix_tokens))
    return model


def leak_tokens(model: nn.Module, beta: float, seed: int = 0) -> nn.Module:
    """Install x_i + β·x_π(i) after `pe` (a fixed derangement π; in place; returns the model)."""
    model.norm_pre = TokenLeak(derangement(int(model.patch_embed.num_patches), seed), beta,
                               int(model.num_prefix_tokens))
    return model


def iid_images(count: int, size: int, seed: int) -> torch.Tensor:
    """I.i.d. Gaussian pixels: patches (hence `embed` tokens) of one image are independent."""
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def smooth_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Low-frequency images (upsampled 2×2 fields + noise), as in tests/test_isi.py."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 2, 2, generator=generator)
    fields = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fields + 0.3 * torch.randn(count, 3, size, size, generator=generator)


@dataclass(frozen=True)
class Setting:
    """A recipe's probe knobs shrunk to CPU size (model width, PCA rank and probe size scaled together)."""

    name: str
    source: str
    img_size: int
    embed_dim: int
    num_heads: int
    depth: int
    pca_rank: int
    pca_oversample: int
    pca_power_iterations: int
    probe_size: int  # the recipe's (shrunk) probe size
    holdout_fraction: float = 0.2
    validation_fraction: float = 0.2
    patch_size: int = 4

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def isi_kwargs(self) -> dict:
        return dict(pca_rank=self.pca_rank, pca_oversample=self.pca_oversample,
                    pca_power_iterations=self.pca_power_iterations, holdout_fraction=self.holdout_fraction,
                    validation_fraction=self.validation_fraction)


def recipe_setting(name: str, recipe: str | Path, *, tokens: int, shrink: int = 1,
                   probe_size: int | None = None) -> Setting:
    """A recipe's model width/depth and `diagnostics:` probe knobs, at `tokens` patch tokens (4-px patches).

    `shrink` divides the width D, the PCA rank r and the probe size together, which keeps the training
    images per nested input, n_train / (D + r), of the recipe (heads are kept, so head width shrinks).
    """
    from trainer.recipe import load_recipe

    cfg = load_recipe(Path(recipe))
    with torch.device("meta"):
        base = create_vit(cfg.model.name, **{k: v for k, v in (("embed_dim", cfg.model.embed_dim),
                                                                ("depth", cfg.model.depth),
                                                                ("num_heads", cfg.model.num_heads))
                                              if v is not None})
    dim, heads = int(base.embed_dim) // shrink, int(base.blocks[0].attn.num_heads)
    if dim % heads:
        raise ValueError(f"{recipe}: width {dim} after shrinking by {shrink} is not a multiple of {heads} heads")
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise ValueError(f"tokens = {tokens} is not a square")
    d = cfg.diagnostics
    return Setting(name, str(recipe), img_size=4 * side, embed_dim=dim,
                   num_heads=heads, depth=len(base.blocks), pca_rank=max(1, d.isi_pca_rank // shrink),
                   pca_oversample=d.isi_pca_oversample, pca_power_iterations=d.isi_pca_power_iterations,
                   probe_size=probe_size or d.probe_size // shrink, holdout_fraction=d.isi_holdout_fraction,
                   validation_fraction=d.isi_validation_fraction)


REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE, VIT_S_RECIPE = REPO / "recipes" / "demo_digits.yaml", REPO / "recipes" / "vit_s.yaml"


def recipe_settings() -> dict[str, Setting]:
    """The settings measured, read from the recipes: the demo's width, depth and ISI knobs with its probe
    size, and ViT-S's (D = 384, r = 256, probe 4096) shrunk 8x (D = 48, r = 32, probe 512), each at
    16 and 64 patch tokens (the demo's 16- and 32-px layouts)."""
    return {
        "demo": recipe_setting("demo", DEMO_RECIPE, tokens=16),
        "demo64": recipe_setting("demo64", DEMO_RECIPE, tokens=64),
        "vit_s": recipe_setting("vit_s", VIT_S_RECIPE, tokens=16, shrink=8),
        "vit_s64": recipe_setting("vit_s64", VIT_S_RECIPE, tokens=64, shrink=8),
    }


SETTING_NAMES = ("demo", "demo64", "vit_s", "vit_s64")


def setting_model(setting: Setting, *, permuted: bool = False, leak: float = 0.0, gain: float = 1.0,
                  seed: int = 0) -> nn.Module:
    model = no_mixing_vit(img_size=setting.img_size, patch_size=setting.patch_size, embed_dim=setting.embed_dim,
                          depth=setting.depth, num_heads=setting.num_heads, gain=gain, seed=seed)
    if permuted:
        return permute_tokens(model, seed)
    return leak_tokens(model, leak, seed) if leak else model


def measure(setting: Setting, probe_size: int, *, permuted: bool = False, leak: float = 0.0,
            estimator: str = "residual", repeat: int = 0, gain: float = 1.0, batch_size: int = 256,
            **overrides) -> dict:
    """ISI results `{stage: {...}}` of one probe set (seeded by `repeat`) on the setting's truth-known model
    (no mixing; `permuted`: a fixed derangement after `pe`; `leak` > 0: x_i + leak·x_π(i) after `pe`)."""
    model = setting_model(setting, permuted=permuted, leak=leak, gain=gain)
    make = smooth_images if permuted else iid_images
    images = make(probe_size, setting.img_size, seed=1000 + repeat)
    batches = [(chunk, None, torch.arange(start, start + len(chunk)))
               for start, chunk in zip(range(0, probe_size, batch_size), images.split(batch_size))]
    options = {**setting.isi_kwargs(), **overrides}
    if estimator != "residual":
        options["nested_fit"] = estimator
    metric = ScramblingIndex(model, seed=repeat, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_probe(model, batches, [metric])["isi"]


def summarize(runs: Sequence[dict]) -> dict:
    """Over repeats: mean ISI per stage, the stage whose mean |ISI| is largest, the largest |ISI| anywhere."""
    stages = list(runs[0])
    isi = np.array([[run[s]["isi"] for s in stages] for run in runs])  # (repeats, stages)
    mean = isi.mean(0)
    worst = int(np.argmax(np.abs(mean)))
    last_block = [s for s in stages if s.startswith("block_")][-1]
    return dict(stages=stages, mean=mean.tolist(), worst_stage=stages[worst], worst_mean=float(mean[worst]),
                max_abs=float(np.abs(isi).max()), mean_over_stages=float(mean.mean()),
                mean_after_pe=float(mean[2:].mean()),
                r2_self_last=float(np.mean([run[last_block]["r2_self"] for run in runs])),
                train_images=float(np.mean([run[stages[0]]["num_train_images"] for run in runs])))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTING_NAMES), choices=list(SETTING_NAMES))
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--estimators", nargs="+", default=["joint", "residual"], choices=["joint", "residual"])
    p.add_argument("--repeats", type=int, default=3, help="probe sets (images and split seed) per size")
    p.add_argument("--gain", type=float, default=1.0, help="weight scale of the no-mixing model")
    p.add_argument("--permuted", action="store_true", help="also measure the fixed-permutation model")
    p.add_argument("--leak", type=float, default=0.0,
                   help="also measure the leaky model x_i + LEAK·x_π(i) after pe (a small real ISI)")
    p.add_argument("--json", type=Path, default=None, help="write every summary here")
    p.add_argument("--png", type=Path, default=None, help="draw bias against probe size here")
    p.add_argument("--replot", type=Path, default=None, help="only redraw --png from a --json file of an earlier run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        draw(json.loads(args.replot.read_text()), args.png or args.replot.with_suffix(".png"), recipe_settings())
        return
    torch.set_num_threads(1)
    rows = []
    models = ["no_mixing"] + ["permuted"] * args.permuted + ["leaky"] * bool(args.leak)
    print(f"{'setting':9} {'model':9} {'estimator':9} {'probe':>5} {'train':>6} {'n/(D+r)':>7} "
          f"{'worst stage':>11} {'mean ISI':>9} {'max|ISI|':>9} {'mean>=b1':>9} {'R2self@L':>8} {'s':>5}")
    settings = recipe_settings()
    for name in args.settings:
        setting = settings[name]
        for kind in models:
            for estimator in args.estimators:
                for size in args.sizes:
                    start = time.perf_counter()
                    runs = []
                    for r in range(args.repeats):
                        try:
                            runs.append(measure(setting, size, permuted=kind == "permuted", estimator=estimator,
                                                leak=args.leak if kind == "leaky" else 0.0, repeat=r,
                                                gain=args.gain))
                        except ValueError as error:  # e.g. a group of fewer than 2 images at 32 probe images
                            print(f"  (skipped repeat {r}: {error})")
                    if not runs:
                        continue
                    summary = summarize(runs)
                    elapsed = time.perf_counter() - start
                    ratio = summary["train_images"] / (setting.embed_dim + setting.pca_rank)
                    rows.append(dict(setting=name, model=kind, estimator=estimator, probe_size=size, **summary))
                    print(f"{name:9} {kind:9} {estimator:9} {size:5d} {summary['train_images']:6.0f} {ratio:7.2f} "
                          f"{summary['worst_stage']:>11} {summary['worst_mean']:+9.4f} {summary['max_abs']:9.4f} "
                          f"{summary['mean_after_pe']:+9.4f} "
                          f"{summary['r2_self_last']:8.3f} {elapsed:5.1f}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.png is not None:
        draw(rows, args.png, settings)


def draw(rows: list[dict], path: Path, settings: dict[str, Setting]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({row["setting"] for row in rows}, key=list(SETTING_NAMES).index)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"joint": "--", "residual": "-"}
    for index, name in enumerate(names):
        for estimator in ("joint", "residual"):
            chosen = [r for r in rows if r["setting"] == name and r["estimator"] == estimator and r["model"] == "no_mixing"]
            if not chosen:
                continue
            sizes = [r["probe_size"] for r in chosen]
            label = f"{name} ({settings[name].num_patches} tok, D+r={settings[name].embed_dim + settings[name].pca_rank}) {estimator}"
            for ax in axes:
                ax.plot(sizes, [r["worst_mean"] for r in chosen], styles[estimator], marker="o", ms=4,
                        color=f"C{index}", label=label)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].set_title("no-mixing ViT, true ISI = 0: mean ISI at its worst stage\n(symlog; dashed joint = before, "
                      "solid residual = now)", fontsize=9)
    axes[1].set_title("zoomed to ±0.01; grey: P1's ViT-B band 0.004–0.009, dotted: ±0.001 target", fontsize=9)
    axes[1].set_ylim(-0.01, 0.01)
    axes[1].axhspan(0.004, 0.009, color="0.88", zorder=0)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["probe_size"] for r in rows if r["probe_size"] & (r["probe_size"] - 1) == 0}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.axhline(0.0, color="k", lw=0.8)
        for y in (-1e-3, 1e-3):
            ax.axhline(y, color="k", lw=0.6, ls=":")
        ax.set_xlabel("probe images (80% train, of which 20% validation)")
        ax.set_ylabel("ISI")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
