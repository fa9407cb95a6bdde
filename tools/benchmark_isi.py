"""Time and memory of the streaming Information Scrambling Index, against the formula it plans by.

Runs nested ISI over every stage of a timm ViT on random probe images (batches of --batch-size,
the same images in every pass) and prints: wall time, the passes taken, the time of one plain
forward pass over the same images (ISI / forward ratio), peak memory measured against the
planned bytes (`diagnostics.isi.isi_stage_bytes` per stage, grouped by the memory budget).

    python tools/benchmark_isi.py                                       # CPU: ViT-Ti/16 at 64 px, 1,024 images
    python tools/benchmark_isi.py --model vit_base_patch16_224 --images 10000 --img-size 224 \\
        --budget-gb 32 --device cuda                                    # the ViT-B / 10k-image case

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (everything: model, activations, sums);
on CPU the growth of the process's peak resident set over the run (an upper bound on the ISI
state, which shares the heap with the model and the batches).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from diagnostics.capture import stage_names
from diagnostics.isi import ScramblingIndex
from diagnostics.streaming import run_probe
from models import create_vit
from trainer.cli import exit_on_user_error
from trainer.host_memory import keep_freed_memory_for_reuse
from trainer.recipe import RecipeError

GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (random init)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--depth", type=int, help="override the model's number of blocks (a quick check)")
    p.add_argument("--images", type=int, default=1024, help="probe images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pca-rank", type=int, default=256)
    p.add_argument("--budget-gb", type=float, default=None, help="isi_memory_budget_gb (default: all stages at once)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep_freed_memory_for_reuse()  # as the trainer does
    device = torch.device(args.device)
    torch.manual_seed(0)
    sizes = {"depth": args.depth} if args.depth else {}
    model = create_vit(args.model, pretrained=False, img_size=args.img_size, **sizes).to(device).eval()
    images = torch.randn(args.images, 3, args.img_size, args.img_size)
    batches = [(chunk, None, torch.arange(start, start + len(chunk)))
               for start, chunk in zip(range(0, args.images, args.batch_size), images.split(args.batch_size))]
    num_patches, dim = model.patch_embed.num_patches, model.embed_dim
    stages = stage_names(model)
    budget = None if args.budget_gb is None else int(args.budget_gb * GIB)
    try:
        isi = ScramblingIndex(model, pca_rank=args.pca_rank, memory_budget_bytes=budget)
    except ValueError as error:
        raise RecipeError(f"--budget-gb {args.budget_gb}: {error}") from None
    groups, stage_bytes = isi.stage_groups, isi.stage_bytes
    copied = ", ".join(f"{stage} = {source}" for stage, source in isi.copied_stages.items())
    print(f"{args.model} at {args.img_size} px (N = {num_patches} patches, D = {dim}), {args.images} random images, "
          f"batch {args.batch_size}, r = {args.pca_rank}, device {device}")
    print(f"plan: {stage_bytes / GIB:.3f} GiB per stage, {sum(map(len, groups))} of {len(stages)} stages fitted "
          f"in {len(groups)} group(s) of <= {max(map(len, groups))}" + (f" ({copied}, copied)" if copied else ""))

    with torch.no_grad():
        start = time.perf_counter()
        for chunk, _, _ in batches:
            model(chunk.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_s = time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = peak_rss_bytes()
    start = time.perf_counter()
    results = run_probe(model, batches, [isi])["isi"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = peak_rss_bytes() - before
    isi_s = time.perf_counter() - start

    planned = max(len(group) for group in groups) * stage_bytes
    print(f"ISI: {isi_s:.1f} s over {isi.num_passes} passes; one plain forward pass {forward_s:.2f} s "
          f"-> ISI / forward = {isi_s / forward_s:.1f}x")
    print(f"memory: peak {'allocated' if device.type == 'cuda' else 'RSS growth'} {peak / GIB:.3f} GiB; planned "
          f"regression sums of the largest group {planned / GIB:.3f} GiB -> measured / planned = {peak / planned:.2f}")
    values = [results[stage]["isi"] for stage in stages if results.get(stage, {}).get("isi") is not None]
    print(f"ISI per stage (random init, random images: expect ~0): min {min(values):+.4f}, max {max(values):+.4f}")


if __name__ == "__main__":
    main()
