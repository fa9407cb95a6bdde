"""Parameters, MACs and measured inference throughput of ViTs and their variants.

    python tools/model_table.py                                 # P2's table: S/B/L x base/grouped/shallow
    python tools/model_table.py recipes/vit_b_grouped_mlp.yaml vit_large_patch16_224_thin_mlp
    python tools/model_table.py --json table.json --no-throughput

--json refuses (exit 2) to overwrite a file that is not a table it wrote, or one of the recipes given.

Counts come from a meta-device model (no weights allocated); throughput is measured on the
current device with real weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python tools/model_table.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch

import models  # noqa: F401  (registers the variants with timm)
from ablations.outputs import check_output, read_json
from models import create_vit, create_vit_from_recipe, profile_model
from trainer.cli import exit_on_user_error
from trainer.recipe import load_recipe

DEFAULT_MODELS = [f"vit_{size}_patch16_224{suffix}" for size in ("small", "base", "large")
                  for suffix in ("", "_grouped_mlp", "_shallow_mlp")]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _is_recipe(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml")) or Path(entry).is_file()


def is_table_json(path: Path) -> bool:
    """A JSON table this tool wrote: {"setting": {...}, "models": [...]}."""
    data = read_json(path)
    return isinstance(data, dict) and set(data) == {"setting", "models"} and \
        isinstance(data["setting"], dict) and isinstance(data["models"], list)


def _build(entry: str, device: str | torch.device) -> tuple[str, torch.nn.Module, int]:
    """(display name, model, image size) for a recipe path or a timm model name."""
    if _is_recipe(entry):
        recipe = load_recipe(entry)
        return Path(entry).stem, create_vit_from_recipe(recipe, device=device, pretrained=False), recipe.model.img_size
    with torch.device(device):
        model = create_vit(entry)
    return entry, model, model.patch_embed.img_size[0]


def measure_throughput(model: torch.nn.Module, img_size: int, batch_size: int, precision: str,
                       device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Inference images per second (eval mode, no grad, autocast for bf16/fp16)."""
    model = model.to(device).eval()
    x = torch.randn(batch_size, model.patch_embed.proj.in_channels, img_size, img_size, device=device)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            model(x)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
    return batch_size * iters / (time.perf_counter() - start)


def format_table(rows: list[dict], with_throughput: bool) -> str:
    headers = ["model", "params", "MLP params", "unique MLPs", "MACs lin+embed", "MACs total"]
    if with_throughput:
        headers.append("img/s")
    lines = []
    for r in rows:
        cells = [r["name"], f"{r['params'] / 1e6:.1f}M", f"{r['mlp_params'] / 1e6:.1f}M", str(r["unique_mlps"]),
                 f"{r['macs_linear'] / 1e9:.2f} G", f"{r['macs_total'] / 1e9:.2f} G"]
        if with_throughput:
            cells.append(f"{r['throughput_img_s']:.1f}")
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="recipe files or timm model names (default: P2's table)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    p.add_argument("--batch-size", type=int, default=None, help="throughput batch (default 256 GPU, 8 CPU)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                   help="throughput precision (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per model")
    p.add_argument("--device", default=None, help="throughput device (default cuda if available)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.json:
        check_output(args.json, "--json", inputs=[e for e in args.models if _is_recipe(e)], own=is_table_json,
                     own_what="a JSON table written by tools/model_table.py")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or (256 if device.type == "cuda" else 8)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    with_throughput = not args.no_throughput
    rows = []
    for entry in args.models or DEFAULT_MODELS:
        name, meta_model, img_size = _build(entry, "meta")
        row = profile_model(meta_model, name, img_size).as_dict()
        if with_throughput:
            _, model, _ = _build(entry, device)
            row["throughput_img_s"] = measure_throughput(model, img_size, batch_size, precision, device,
                                                         iters=args.iters)
            del model
        rows.append(row)
    print(format_table(rows, with_throughput))
    setting = {"device": str(device), "device_name": _device_name(device), "batch_size": batch_size,
               "precision": precision, "timm": timm.__version__, "torch": torch.__version__}
    if with_throughput:
        print(f"\nthroughput: inference, batch {batch_size}, {precision}, {setting['device_name']}")
    print("MACs per image: 'lin+embed' counts linear layers and the patch embedding (P2's convention); "
          "'total' adds the attention matmuls.")
    if args.json:
        Path(args.json).write_text(json.dumps({"setting": setting, "models": rows}, indent=2))
        print(f"wrote {args.json}")
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"



if __name__ == "__main__":
    main()
