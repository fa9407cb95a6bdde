"""Everything that only a GPU can show, in one command and one table: a pass/fail line per check.

    python tools/gpu_check.py              # on one H100/H200: about 8 minutes
    python tools/gpu_check.py --tiny       # on CPU: tiny shapes, a few steps (the test suite runs this)

Checks (targets from the issues that asked for them):
  train_eager / train_compile   ViT-B/16 bf16 at batch 256: img/s and MFU against the plain timm loop of
                                tools/benchmark_train.py (MFU >= 45 %, ratio >= 1.0)
  diagnostics_cost              one diagnostics measurement of recipes/vit_b.yaml's settings, as a share of
                                the training time between two measurements at its cadence (<= 2 %)
  device_augment                data.fast_path's device side (augment.device_augment: RandAugment, normalisation,
                                erasing on the uint8 batch) at vit_b.yaml's batch, as a share of a ViT-B step (<= 5 %)
  isi_10k                       ISI on ViT-B over 10,000 images: time, and peak memory against the plan
  fsdp_resume / deepspeed_resume   a few steps stopped and resumed: the same losses (bf16 tolerance),
                                with the diagnostics on (probe through the gathered replica; gradient
                                norms from FSDP's shards and from DeepSpeed's engine) and, for DeepSpeed,
                                compiled
  grouped_fsdp_refused          GroupedMLP under FSDP is refused (its shared MLP would be split)
  tf32                          float32 matmuls with train.tf32 on against off
  memory_<S|B|L>                peak GPU memory of one training step at each recipe's batch: fits or not
With --tiny the same code runs on CPU at tiny sizes; checks that need a GPU backend (FSDP, DeepSpeed,
TF32, CUDA memory) run their single-process form or say why they cannot. Exit code 0 when every line
passes (or is skipped for lack of a GPU), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
              "model.num_heads=2", "model.num_classes=10"]
TINY_DATA = ["data.source=synthetic", "data.synthetic_train_size=64", "data.synthetic_eval_size=16",
             "data.num_workers=0", "data.pin_memory=false", "train.batch_size=8", "eval.batch_size=16",
             "logging.progress_bar=false", "logging.every_steps=1"]


@dataclass
class Line:
    name: str
    measured: str
    target: str
    status: str  # pass | FAIL | skip


def run(command: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def accelerate(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *args]


def train_benchmark(tiny: bool, compile_: bool) -> Line:
    name = "train_compile" if compile_ else "train_eager"
    args = ["--preset", "tiny", "--windows", "1", "--steps", "1", "--warmup", "1"] if tiny else \
        ["--preset", "vit_b", "--windows", "4", "--steps", "10", "--warmup", "5"]
    if compile_:
        args += ["--set", "train.compile=true", *(["train.compile_backend=eager"] if tiny else [])]
    out = run([sys.executable, "tools/benchmark_train.py", *args])
    if out.returncode != 0:
        return Line(name, out.stderr.strip().splitlines()[-1][:80], "runs", "FAIL")
    rate = re.search(r"depthlab\s+([\d.]+) img/s.*?(?:MFU ([\d.]+)%)?$", out.stdout, re.M)
    ratio = float(re.search(r"ratio depthlab / plain: ([\d.]+)", out.stdout).group(1))
    mfu = float(rate.group(2)) if rate.group(2) else None
    measured = f"{float(rate.group(1)):.0f} img/s, ratio {ratio:.3f}" + (f", MFU {mfu:.1f} %" if mfu else "")
    if tiny:
        return Line(name, measured, "runs (targets need a GPU)", "pass")
    ok = ratio >= 1.0 and mfu is not None and mfu >= 45.0
    return Line(name, measured, "MFU >= 45 %, ratio >= 1.0", "pass" if ok else "FAIL")


def diagnostics_cost(tiny: bool, device: torch.device) -> Line:
    """One measurement at the recipe's diagnostics settings against the training steps between two of them."""
    from diagnostics import load_probe, run_diagnostics
    from trainer.loop import UpdateStep, build_criterion
    from trainer.optim import build_optimizer, build_scheduler
    from trainer.recipe import load_recipe
    from trainer.run import build_model

    recipe_path = REPO / "recipes" / ("demo_digits.yaml" if tiny else "vit_b.yaml")
    overrides = [*TINY_MODEL, "train.precision='no'", "diagnostics.probe_size=32", "diagnostics.isi_pca_rank=8",
                 "diagnostics.every_steps=50"] if tiny else ["train.precision=bf16"]
    recipe = load_recipe(recipe_path, overrides)
    cfg = recipe.diagnostics
    cadence = cfg.every_steps or 1251
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=recipe.train.precision)
    model = build_model(recipe).to(accelerator.device)
    optimizer = build_optimizer(model, recipe.optim, recipe.optim.lr)
    scheduler = build_scheduler(optimizer, recipe.schedule, 100)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = UpdateStep(accelerator, model, optimizer, scheduler, None, build_criterion(recipe, mixup=False))
    batch = recipe.train.batch_size if not tiny else 8
    shape = (batch, recipe.model.in_chans, recipe.model.img_size, recipe.model.img_size)
    images, targets = torch.randn(shape), torch.randint(0, recipe.model.num_classes, (batch,))
    for _ in range(2):
        step.micro_batch(images, targets)
        step.finish(0)
    sync(device)
    start, steps = time.perf_counter(), 3 if tiny else 10
    for _ in range(steps):
        step.micro_batch(images, targets)
        step.finish(0)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    size = cfg.probe_size
    dataset = list(zip(torch.randn(size, *shape[1:]), [i % recipe.model.num_classes for i in range(size)]))
    probe = load_probe(dataset, cfg)
    start = time.perf_counter()
    run_diagnostics(accelerator.unwrap_model(model), probe, cfg, recipe.model.num_classes)
    sync(device)
    measure_s = time.perf_counter() - start
    share = measure_s / (measure_s + cadence * step_s)
    measured = f"{measure_s:.1f} s per measurement, {100 * share:.2f} % of {cadence} steps of {step_s * 1e3:.0f} ms"
    if tiny:
        return Line("diagnostics_cost", measured, "runs (target on ViT-B: <= 2 %)", "pass")
    return Line("diagnostics_cost", measured, "<= 2 %", "pass" if share <= 0.02 else "FAIL")


def device_augment(tiny: bool, device: torch.device) -> Line:
    """The fast data path's device side (RandAugment, normalisation, erasing on uint8 batches) against a step."""
    import numpy as np
    import timm
    from PIL import Image

    from trainer.data.fast_transform import FastPathOptions, build_fast_train_transform
    from trainer.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "vit_b.yaml", TINY_MODEL if tiny else [])
    batch = 8 if tiny else recipe.train.batch_size
    transform = build_fast_train_transform(recipe, FastPathOptions(device_augment=True))
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (350, 400, 3), dtype=np.uint8)) for _ in range(batch)]
    batches = [transform.collate([(transform(photo), 0) for photo in photos]) for _ in range(3)]
    model = timm.create_model("vit_base_patch16_224" if not tiny else "vit_tiny_patch16_224",
                              img_size=recipe.model.img_size, num_classes=10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def finish(index: int) -> torch.Tensor:
        return batches[index % len(batches)][0].to(device, non_blocking=True)

    def step(images: torch.Tensor) -> None:
        with autocast:
            loss = model(images).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    images = finish(0)
    for index in range(2):  # warm-up: kernels, allocator
        step(finish(index))
    reps = 2 if tiny else 10
    sync(device)
    start = time.perf_counter()
    for index in range(reps):
        finish(index)
    sync(device)
    finish_s = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for _ in range(reps):
        step(images)
    sync(device)
    step_s = (time.perf_counter() - start) / reps
    share = finish_s / step_s
    measured = f"{finish_s * 1e3:.1f} ms per batch of {batch} = {100 * share:.1f} % of a {step_s * 1e3:.0f} ms step"
    if tiny:
        return Line("device_augment", measured, "runs (target on ViT-B: <= 5 % of a step)", "pass")
    return Line("device_augment", measured, "<= 5 % of a step", "pass" if share <= 0.05 else "FAIL")


def isi_10k(tiny: bool) -> Line:
    args = ["--images", "64", "--img-size", "32", "--depth", "2", "--pca-rank", "8", "--budget-gb", "1"] if tiny else \
        ["--model", "vit_base_patch16_224", "--img-size", "224", "--images", "10000", "--budget-gb", "32",
         "--device", "cuda"]
    out = run([sys.executable, "tools/benchmark_isi.py", *args])
    if out.returncode != 0:
        return Line("isi_10k", out.stderr.strip().splitlines()[-1][:80], "runs", "FAIL")
    took = re.search(r"ISI: ([\d.]+) s over (\d+) passes", out.stdout)
    memory = re.search(r"memory: peak .*? ([\d.]+) GiB; planned .*? ([\d.]+) GiB", out.stdout)
    peak, planned = (float(memory.group(1)), float(memory.group(2))) if memory else (math.nan, math.nan)
    measured = f"{float(took.group(1)):.0f} s, {took.group(2)} passes, peak {peak:.2f} GiB (plan {planned:.2f})"
    ok = tiny or peak <= 1.25 * planned + 2.0  # the plan counts the ISI state; the model and batches add ~2 GiB
    return Line("isi_10k", measured, "peak near the plan", "pass" if ok else "FAIL")


def stop_and_resume(tiny: bool, backend: str) -> Line:
    """A few steps straight, and stopped at 2 then resumed: the same per-step losses."""
    name = f"{backend}_resume"
    diagnostics = ["diagnostics.enabled=true", "diagnostics.metrics=[token_similarity,attention,grad_norms]",
                   "diagnostics.every_steps=2", "diagnostics.grad_norm_every_steps=1", "diagnostics.probe_size=16",
                   "diagnostics.tensorboard_images=never", "train.ema_decay=null"]
    common = [*TINY_MODEL, *TINY_DATA, *diagnostics, "schedule.epochs=1", "schedule.warmup_epochs=0.25",
              "eval.every_epochs=null", "checkpoint.every_epochs=null", "checkpoint.every_steps=2",
              "train.precision=" + ("'no'" if tiny else "bf16")]
    if backend == "deepspeed" and not tiny:
        common += ["train.compile=true"]
    if tiny and backend == "deepspeed":
        return Line(name, "needs a GPU: its single-process form is fsdp_resume's", "same losses, diagnostics "
                          "measured", "skip")
    if tiny:
        launcher, strategy, note = [sys.executable], "auto", " (tiny: one process, no FSDP/DeepSpeed on CPU)"
    else:
        flag = "--use_fsdp" if backend == "fsdp" else "--use_deepspeed"
        launcher, strategy, note = accelerate(flag, "--num_processes", "1"), backend, ""
    with tempfile.TemporaryDirectory() as root:
        losses = {}
        for label, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
            out = run([*launcher, "trainer/train.py", "--recipe", str(REPO / "recipes" / "demo_digits.yaml"),
                       "--output", f"{root}/{label}", "--resume", "auto", "--set", *common,
                       f"distributed.strategy={strategy}", f"train.max_steps={steps}"])
            if out.returncode != 0:
                return Line(name, (out.stderr.strip().splitlines() or ["failed"])[-1][:80] + note, "runs", "FAIL")
            lines = Path(root, label, "metrics.jsonl").read_text().splitlines()
            losses[label] = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
        records = [json.loads(line) for line in Path(root, "resumed", "diagnostics.jsonl").read_text().splitlines()]
    tolerance = 1e-5 if tiny else 5e-3
    same = len(losses["straight"]) == len(losses["resumed"]) == 4 and all(
        abs(a - b) <= tolerance for a, b in zip(losses["straight"], losses["resumed"]))
    measured_norms = all(any(v for v in record["grad_norms"]["MHA"] if v) for record in records)
    ok = same and measured_norms and len(records) == 2
    return Line(name, f"losses equal to {tolerance:g}: {same}, diagnostics with gradient norms: "
                      f"{measured_norms}{note}", "same losses, diagnostics measured", "pass" if ok else "FAIL")


def grouped_fsdp_refused(tiny: bool) -> Line:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from trainer.accelerator import DistributedSetupError, check_backend
    from trainer.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "vit_b_grouped_mlp.yaml", ["train.ema_decay=null"])
    if tiny:  # the check itself, on a stand-in FSDP accelerator
        accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace())
        try:
            check_backend(recipe, accelerator)
        except DistributedSetupError as error:
            return Line("grouped_fsdp_refused", str(error)[:60] + "...", "refused", "pass")
        return Line("grouped_fsdp_refused", "accepted", "refused", "FAIL")
    out = run([*accelerate("--use_fsdp", "--num_processes", "1"), "trainer/train.py", "--recipe",
               str(REPO / "recipes" / "vit_b_grouped_mlp.yaml"), "--output", tempfile.mkdtemp(), "--set",
               *TINY_DATA, "train.ema_decay=null", "distributed.strategy=fsdp", "train.max_steps=1"])
    refused = out.returncode != 0 and "grouped_mlp' under FSDP" in out.stderr
    return Line("grouped_fsdp_refused", "refused" if refused else f"exit {out.returncode}", "refused",
                "pass" if refused else "FAIL")


def tf32(tiny: bool, device: torch.device) -> Line:
    if device.type != "cuda":
        return Line("tf32", "needs a CUDA device", "faster with train.tf32", "skip")
    a, b = torch.randn(8192, 8192, device=device), torch.randn(8192, 8192, device=device)
    times = {}
    for allowed in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = allowed
        a @ b
        sync(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        times[allowed] = time.perf_counter() - start
    torch.backends.cuda.matmul.allow_tf32 = False
    speedup = times[False] / times[True]
    return Line("tf32", f"{speedup:.1f}x faster fp32 matmuls", "> 1.5x", "pass" if speedup > 1.5 else "FAIL")


def peak_memory(tiny: bool, device: torch.device, recipe_name: str) -> Line:
    from trainer.recipe import load_recipe
    from trainer.run import build_model

    name = f"memory_{recipe_name.removesuffix('.yaml')}"
    if device.type != "cuda":
        return Line(name, "needs a CUDA device", "fits at the recipe's batch", "skip")
    recipe = load_recipe(REPO / "recipes" / recipe_name, ["train.precision=bf16"])
    model = build_model(recipe).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = recipe.train.batch_size
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(2):
            images = torch.randn(batch, 3, recipe.model.img_size, recipe.model.img_size, device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(images).float().logsumexp(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return Line(name, f"{peak:.1f} of {total:.0f} GiB at batch {batch}", "fits", "pass")
    except torch.OutOfMemoryError:
        return Line(name, f"out of memory at batch {batch}", "fits (else grad_checkpointing/accumulation)", "FAIL")
    finally:
        del model, optimizer
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (what the test suite runs)")
    p.add_argument("--only", nargs="+", metavar="CHECK", help="run these checks only (names as in the table)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        print("error: no CUDA device; run with --tiny on CPU", file=sys.stderr)
        return 2
    checks: dict[str, Callable[[], Line]] = {
        "train_eager": lambda: train_benchmark(args.tiny, compile_=False),
        "train_compile": lambda: train_benchmark(args.tiny, compile_=True),
        "diagnostics_cost": lambda: diagnostics_cost(args.tiny, device),
        "device_augment": lambda: device_augment(args.tiny, device),
        "isi_10k": lambda: isi_10k(args.tiny),
        "fsdp_resume": lambda: stop_and_resume(args.tiny, "fsdp"),
        "deepspeed_resume": lambda: stop_and_resume(args.tiny, "deepspeed"),
        "grouped_fsdp_refused": lambda: grouped_fsdp_refused(args.tiny),
        "tf32": lambda: tf32(args.tiny, device),
        **{f"memory_{name}": (lambda name=name: peak_memory(args.tiny, device, f"{name}.yaml"))
           for name in ("vit_s", "vit_b", "vit_l")},
    }
    unknown = sorted(set(args.only or []) - set(checks))
    if unknown:
        print(f"error: --only: unknown checks {unknown}; checks are {', '.join(checks)}", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {device_name}, torch {torch.__version__}{' (tiny)' if args.tiny else ''}")
    lines = []
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            line = check()
        except Exception as error:  # one failing check must not hide the others
            line = Line(name, f"{type(error).__name__}: {str(error).splitlines()[0][:70] if str(error) else ''}",
                        "runs", "FAIL")
        lines.append(line)
        print(f"{line.status:<5} {line.name:<22} {line.measured}  [target: {line.target}; "
              f"{time.perf_counter() - start:.0f} s]", flush=True)
    failed = [line.name for line in lines if line.status == "FAIL"]
    print(f"{len(lines) - len(failed)}/{len(lines)} passed or skipped" + (f"; failed: {', '.join(failed)}"
                                                                          if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
