"""Training throughput of depthlab's update step against a plain timm + PyTorch loop.

Both train the same model (same init), on the same synthetic batches, at the same precision,
with the same optimizer settings, EMA and schedule, in alternating timed windows of one run
(so machine noise hits both alike). The trainer side is `trainer.loop.UpdateStep` behind
`accelerator.prepare` - exactly what `trainer/train.py` runs per update; the plain side is the
loop a timm user writes: autocast, backward, `optimizer.step()`, `zero_grad`, scheduler, ModelEmaV3.

    python tools/benchmark_train.py                       # CPU: the demo's tiny ViT, fp32
    python tools/benchmark_train.py --preset vit_b        # GPU: ViT-B/16, bf16, batch 256, MFU
    python tools/benchmark_train.py --recipe recipes/vit_s.yaml --set train.batch_size=128 --peak-tflops 989

MFU = img/s x (models.profile_model macs_total x 2 FLOPs/MAC x 3 for forward+backward) / peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from trainer.accelerator import build_accelerator
from trainer.cli import exit_on_user_error
from trainer.host_memory import keep_freed_memory_for_reuse
from trainer.loop import UpdateStep, build_criterion
from trainer.optim import ParameterEma, build_optimizer, build_scheduler
from trainer.recipe import load_recipe
from trainer.run import build_model
from trainer.run_dir import model_cost

REPO = Path(__file__).resolve().parents[1]
BENCH_OVERRIDES = ["data.source=synthetic", "augment.mixup=0", "augment.cutmix=0", "logging.tensorboard=false",
                   "schedule.epochs=100", "schedule.warmup_epochs=1"]
PRESETS = {
    "tiny": (REPO / "recipes" / "demo_digits.yaml", ["train.precision='no'"]),
    "vit_b": (REPO / "recipes" / "vit_b.yaml", ["train.precision=bf16", "train.batch_size=256"]),
}
# Dense bf16 tensor-core peak (TFLOP/s) by device-name fragment; first match wins.
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by the model in the device name and, for H100,
# its form factor. Matched as whole words: "L40" is not "L4", "A10G" is not "A10". A device not listed
# here (A10G, whose bf16 peak NVIDIA does not publish; V100, which has no bf16) needs --peak-tflops.
PEAK_BF16_TFLOPS = {("H100", "PCIe"): 756.0, ("H100", "NVL"): 835.0, ("H100", ""): 989.0, ("H200", ""): 989.0,
                    ("GH200", ""): 989.0, ("B200", ""): 2250.0, ("A100", ""): 312.0, ("L40S", ""): 362.0,
                    ("L40", ""): 181.0, ("L4", ""): 121.0, ("A10", ""): 125.0, ("4090", ""): 165.2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: vit_b on a GPU, tiny on CPU")
    p.add_argument("--recipe", help="benchmark this recipe instead of a preset")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--windows", type=int, default=6, help="timed windows per side (alternating)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per window")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--peak-tflops", type=float, help="peak FLOP/s of the device, for MFU (default: table)")
    return p.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """What a timm user writes by hand."""

    def __init__(self, recipe, model, device, lr, updates_per_epoch):
        self.model = model.to(device).train()
        self.optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=recipe.optim.weight_decay,
                                             betas=tuple(recipe.optim.betas), eps=recipe.optim.eps)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=recipe.schedule.epochs * updates_per_epoch,
                                           lr_min=recipe.schedule.min_lr, warmup_t=updates_per_epoch,
                                           warmup_lr_init=recipe.schedule.warmup_lr, t_in_epochs=False)
        self.ema = ModelEmaV3(model, decay=recipe.train.ema_decay) if recipe.train.ema_decay else None
        self.criterion = build_criterion(recipe, mixup=False)
        self.clip = recipe.optim.clip_grad_norm
        precision = recipe.train.precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.device_type = device.type
        self.updates = 0

    def step(self, images, targets) -> None:
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.criterion(self.model(images), targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.scheduler.step_update(self.updates)
        if self.ema is not None:
            self.ema.update(self.model)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def peak_tflops_of(device_name: str) -> float | None:
    """The table's entry for a CUDA device name such as "NVIDIA H100 80GB HBM3" (None when not listed)."""
    words = device_name.replace("-", " ").split()
    model = next((w for w in words if any(w == m for m, _ in PEAK_BF16_TFLOPS)), None)
    form = next((w for w in words if (model, w) in PEAK_BF16_TFLOPS), "")
    return PEAK_BF16_TFLOPS.get((model, form)) if model else None


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_freed_memory_for_reuse()  # as the trainer does, for both loops alike
    preset = args.preset or ("vit_b" if torch.cuda.is_available() else "tiny")
    recipe_path, preset_overrides = (Path(args.recipe), []) if args.recipe else PRESETS[preset]
    recipe = load_recipe(recipe_path, [*BENCH_OVERRIDES, *preset_overrides, *args.overrides])
    accelerator = build_accelerator(recipe, Path(tempfile.mkdtemp(prefix="depthlab-bench-")))
    device, batch = accelerator.device, recipe.train.batch_size
    updates_per_epoch = 100

    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe)
    plain_model = build_model(recipe)
    plain_model.load_state_dict(model.state_dict())
    if recipe.train.compile:
        plain_model = torch.compile(plain_model, backend=recipe.train.compile_backend)
    plain = PlainLoop(recipe, plain_model, device, recipe.optim.lr, updates_per_epoch)

    model.to(device)
    optimizer = build_optimizer(model, recipe.optim, recipe.optim.lr)
    scheduler = build_scheduler(optimizer, recipe.schedule, updates_per_epoch)
    if recipe.train.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ParameterEma(accelerator.unwrap_model(model, keep_torch_compile=False), recipe.train.ema_decay) \
        if recipe.train.ema_decay else None
    updater = UpdateStep(accelerator, model, optimizer, scheduler, ema, build_criterion(recipe, mixup=False),
                         clip_grad_norm=recipe.optim.clip_grad_norm)
    model.train()

    gen = torch.Generator().manual_seed(0)
    shape = (batch, recipe.model.in_chans, recipe.model.img_size, recipe.model.img_size)
    batches = [(torch.randn(shape, generator=gen).to(device),
                torch.randint(0, recipe.model.num_classes, (batch,), generator=gen).to(device)) for _ in range(4)]
    trainer_updates = 0

    def trainer_step(i: int) -> None:
        nonlocal trainer_updates
        images, targets = batches[i % len(batches)]
        for _ in range(recipe.train.grad_accum_steps):
            if updater.micro_batch(images, targets):
                updater.finish(trainer_updates)
                trainer_updates += 1

    def plain_step(i: int) -> None:
        images, targets = batches[i % len(batches)]
        for _ in range(recipe.train.grad_accum_steps):  # same images per update for both sides
            plain.step(images, targets)

    sides = {"depthlab": trainer_step, "plain timm": plain_step}
    for fn in sides.values():
        for i in range(args.warmup):
            fn(i)
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu_times: dict[str, list[float]] = {name: [] for name in sides}
    for window in range(args.windows):
        order = list(sides) if window % 2 == 0 else list(reversed(sides))
        for name in order:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for i in range(args.steps):
                sides[name](i)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)

    images_per_window = args.steps * batch * recipe.train.grad_accum_steps
    rates = {name: [images_per_window / t for t in ts] for name, ts in times.items()}
    cost = model_cost(recipe)
    flops_per_image = cost["macs_total"] * 2 * 3
    peak = peak_tflops(device, args.peak_tflops)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"model {recipe.model.name} ({cost['params'] / 1e6:.2f}M params, {cost['macs_total'] / 1e9:.3f} GMACs), "
          f"batch {batch}, precision {recipe.train.precision}, compile {recipe.train.compile}, "
          f"device {device_name}, timm {timm.__version__}, torch {torch.__version__}")
    print(f"{args.windows} alternating windows of {args.steps} steps per side (median, [min, max]):")
    for name, values in rates.items():
        median = statistics.median(values)
        mfu = f"  MFU {100 * median * flops_per_image / (peak * 1e12):.1f}%" if peak else ""
        print(f"  {name:<11} {median:10.1f} img/s  [{min(values):.1f}, {max(values):.1f}]{mfu}")
    ratios = [a / b for a, b in zip(rates["depthlab"], rates["plain timm"])]
    print(f"ratio depthlab / plain: {statistics.median(rates['depthlab']) / statistics.median(rates['plain timm']):.3f}"
          f"  (per-window median {statistics.median(ratios):.3f})")
    if device.type == "cpu":  # CPU seconds used by this process: robust when the cores are shared
        cpu_rates = {name: [images_per_window / t for t in ts] for name, ts in cpu_times.items()}
        a, b = statistics.median(cpu_rates["depthlab"]), statistics.median(cpu_rates["plain timm"])
        print(f"per CPU-second of this process: depthlab {a:.1f}, plain {b:.1f} img/CPU-s, ratio {a / b:.3f}")
    if peak is None and device.type == "cuda":
        print("MFU: unknown GPU peak; pass --peak-tflops")


if __name__ == "__main__":
    main()
