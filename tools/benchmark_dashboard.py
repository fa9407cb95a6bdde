"""How fast the Depth dashboard draws a sweep, measured in a real browser.

Writes a synthetic sweep of TensorBoard event files with depthlab's own logging functions (the
trainer's: `depth_summary`, `dashboard_scalars`, `write_summary` through a SummaryWriter), one run
per point as `<sweep>/runs/<point>/tb`, serves it with `tensorboard --logdir <sweep>`, opens the
Depth tab in headless Chromium and prints the time from the page load (navigation start of the
TensorBoard page) to each of the three views drawn (heatmap, depth profile, phase timeline), the
median over `--repeats` page loads:

    python tools/benchmark_dashboard.py                       # 20 runs x 15 stages x 100 evaluations
    python tools/benchmark_dashboard.py --runs 5 --keep /tmp/sweep

The synthetic records follow the diagnostics.jsonl layout: S_c with a Cliff at `pe`, a Plateau and a
Climb that forms over training (phases detected by diagnostics.phases, as in training), ISI growing
with depth, attention and NC curves, for a ViT with 12 blocks (15 stages).
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

import numpy as np

from diagnostics.capture import block_stage
from diagnostics.phases import detect_phases
from diagnostics.records import build_record
from diagnostics.tensorboard_logging import dashboard_scalars, depth_summary, write_summary


def synthetic_results(stages: list[str], progress: float, rng: np.random.Generator) -> dict:
    """`run_diagnostics`-shaped results of one evaluation at training progress 0..1."""
    n = len(stages)
    depth = np.linspace(0, 1, n)
    climb = np.clip((depth - 0.7) / 0.3, 0, None) ** 2 * 0.06 * progress
    centered = -0.004 + 0.002 * depth + climb + rng.normal(0, 4e-4, n)
    centered[0] = 0.02 + 0.005 * (1 - progress)
    raw = 0.1 + 0.3 * depth * progress + rng.normal(0, 0.005, n)
    isi = np.clip(0.012 * depth * progress + rng.normal(0, 3e-4, n), -0.001, None)
    isi[0] = 0.0
    blocks = [s.startswith("block_") for s in stages]
    attention = {s: {"cls_centrality": 0.02 + 0.01 * d, "cls_centrality_ratio": 1.3 - 0.8 * d * progress,
                     "consensus": 0.4 + 0.4 * d, "entropy": 3.0 - d, "entropy_normalized": 0.8 - 0.3 * d,
                     "mean_distance": 2.0 + 2 * d}
                 for s, d, b in zip(stages, depth, blocks) if b}
    nc = {s: {"nc1": float(10 ** (1.5 - 2.5 * d * (0.2 + progress)))} for s, d in zip(stages, depth)}
    values = {"centered": centered, "raw": raw}
    curve_stages = stages[:-1]  # phases without the final norm (the trainer's default)
    phases = detect_phases(curve_stages, [float(v) for v in centered[:-1]]).to_dict()
    return {"token_similarity": {s: {k: float(v[i]) for k, v in values.items()} for i, s in enumerate(stages)},
            "pe_dominance": {"pe": {"pe_dominance": 0.3}}, "phases": phases,
            "isi": {s: {"isi": float(isi[i]), "r2_self": 0.9, "r2_all": 0.9 + float(isi[i])} for i, s in enumerate(stages)},
            "attention": attention, "neural_collapse": nc, "probe_accuracy": {"norm": {"top1": 50 + 45 * progress}}}


def write_synthetic_run(tb_dir: Path, *, blocks: int = 12, evaluations: int = 100, every: int = 50,
                        seed: int = 0) -> list[dict]:
    """A run's event files (and its records, returned) as the trainer would write them."""
    from torch.utils.tensorboard import SummaryWriter

    stages = ["embed", "pe", *(block_stage(i) for i in range(blocks)), "norm"]
    rng = np.random.default_rng(seed)
    writer = SummaryWriter(str(tb_dir))
    records = []
    for k in range(1, evaluations + 1):
        step = k * every
        record = build_record(synthetic_results(stages, k / evaluations, rng), stages, step=step, epoch=k,
                              model="raw", trigger="every_steps", probe_size=512, num_processes=1, elapsed_s=0.1)
        write_summary(writer, depth_summary(record), step)
        for tag, value in dashboard_scalars(record).items():
            writer.add_scalar(tag, value, step)
        writer.add_scalar("train/loss", 2.3 * (1 - 0.8 * k / evaluations), step)
        records.append(record)
    writer.close()
    return records


def write_sweep(root: Path, runs: int, blocks: int, evaluations: int) -> None:
    for i in range(runs):
        write_synthetic_run(root / "runs" / f"point{i:02d}" / "tb", blocks=blocks, evaluations=evaluations, seed=i)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--blocks", type=int, default=12, help="blocks per model: stages = blocks + 3")
    p.add_argument("--evaluations", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="page loads (the median is printed)")
    p.add_argument("--keep", metavar="DIR", help="write the sweep here (a new folder) instead of a temporary one")
    return p.parse_args(argv)


def measure(url: str, driver) -> dict[str, float]:
    """One page load: seconds from the TensorBoard page's navigation start to each view drawn."""
    from diagnostics.tensorboard_plugin.browser import VIEWS, depth_frame, wait_for_views

    driver.get("about:blank")
    driver.get(f"{url}/#depth")
    top_origin = driver.execute_script("return performance.timeOrigin")
    driver.switch_to.frame(depth_frame(driver))
    state = wait_for_views(driver, timeout=120)
    driver.switch_to.default_content()
    return {view: (state["timeOrigin"] + state["timings"][view] - top_origin) / 1000 for view in VIEWS} | {
        "plugin": (state["timings"]["timeline"] - state["timings"]["start"]) / 1000}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from diagnostics.tensorboard_plugin.browser import chromium, serve_tensorboard

    with tempfile.TemporaryDirectory(prefix="depthlab-dashboard-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "sweep"
        if root.exists() and any(root.iterdir()):
            raise SystemExit(f"error: --keep {root}: it exists and is not empty")
        start = time.perf_counter()
        write_sweep(root, args.runs, args.blocks, args.evaluations)
        stages = args.blocks + 3
        print(f"sweep: {args.runs} runs x {stages} stages x {args.evaluations} evaluations written in "
              f"{time.perf_counter() - start:.1f} s ({root})")
        with serve_tensorboard(root, timeout=120) as url, chromium() as driver:
            measure(url, driver)  # warm-up: TensorBoard's first reads, the browser's caches
            loads = [measure(url, driver) for _ in range(args.repeats)]
        for view in ("heatmap", "profile", "timeline", "plugin"):
            values = [load[view] for load in loads]
            what = "its own start to the three views" if view == "plugin" else f"page load to the {view} drawn"
            print(f"  {what:40s} median {statistics.median(values):.2f} s  [{min(values):.2f}, {max(values):.2f}]")
        print(f"page load to all three views drawn: {statistics.median(load['timeline'] for load in loads):.2f} s "
              f"(median of {args.repeats} loads; target < 2 s)")


if __name__ == "__main__":
    main()
