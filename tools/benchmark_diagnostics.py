"""Wall-clock cost of the diagnostics callback on a whole training run (default: the demo recipe).

Trains the recipe as separate processes, alternately without and with diagnostics (everything else
identical, same machine, back to back), `--repeats` pairs, and prints both wall times and the
overhead:

    python tools/benchmark_diagnostics.py                            # recipes/demo_digits.yaml, 2 pairs
    python tools/benchmark_diagnostics.py --repeats 3 --set diagnostics.every_steps=63

Wall time is the run's own `wall_time_s` (summary.json): the training loop with its evaluations,
checkpoints and callbacks — the callback's probe loading, metrics, TensorBoard images and records
included — but not process start-up, which does not depend on diagnostics. Also printed: the
process wall and CPU times, and the callback's own time as the run measures it (the
`diagnostics cost:` line: every hook of the callback — probe loading, evaluations, gradient
norms, images). The difference of two runs is at the mercy of machine noise (a few percent on a
shared machine); the callback's own time is not, so it is the number to quote.

--keep DIR trains into DIR/without_<i> and DIR/with_<i>: each must be new (or empty), since the
benchmark times fresh runs; anything else in DIR is left alone.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.outputs import check_output
from diagnostics.records import read_diagnostics
from trainer.cli import exit_on_user_error
from trainer.recipe import RecipeError, load_recipe
from trainer.run_dir import read_summary

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "recipes" / "demo_digits.yaml"))
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides for both runs (diagnostics.* shape the 'with' run)")
    p.add_argument("--repeats", type=int, default=2, help="pairs of runs (without, with), interleaved")
    p.add_argument("--keep", metavar="DIR", help="keep the run dirs here (default: a temporary dir)")
    return p.parse_args(argv)


RUN_NAMES = ("without", "with")


def check_keep(keep: str, recipe: str, repeats: int) -> None:
    """--keep may hold anything but the run dirs this benchmark trains, which must be new (ablations/outputs.py)."""
    root = check_output(keep, "--keep", inputs=[recipe], folder=True, own=Path.is_dir)  # only adds run dirs
    for repeat in range(repeats):
        for name in RUN_NAMES:
            check_output(root / f"{name}_{repeat}", "--keep", inputs=[recipe], folder=True)


def timed_run(recipe: str, overrides: list[str], output: Path) -> dict:
    """Train one run in its own process; its summary plus the process wall time and diagnostics time."""
    command = [sys.executable, str(REPO / "trainer" / "train.py"), "--recipe", recipe, "--output", str(output),
               "--set", *overrides, "logging.progress_bar=false"]
    start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ,
                                                                                    "PYTHONUNBUFFERED": "1"})
    process_s = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_end.ru_utime + cpu_end.ru_stime) - (cpu_start.ru_utime + cpu_start.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({' '.join(command)}):\n{proc.stderr[-2000:]}")
    summary = read_summary(output)
    records = read_diagnostics(output)
    cost = re.search(r"diagnostics cost: ([0-9.]+) s", proc.stdout + proc.stderr)
    return {"wall_s": summary["wall_time_s"], "process_s": process_s, "cpu_s": cpu_s,
            "top1": summary["raw"]["top1_final"], "evaluations": len(records),
            "diagnostics_s": float(cost.group(1)) if cost else 0.0}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with_diagnostics = load_recipe(args.recipe, [*args.overrides, "diagnostics.enabled=true"]).diagnostics
    if args.repeats < 1:
        raise RecipeError(f"--repeats = {args.repeats} must be >= 1")
    if args.keep:
        check_keep(args.keep, args.recipe, args.repeats)
    print(f"recipe {args.recipe}; diagnostics: metrics {with_diagnostics.metrics}, probe_size "
          f"{with_diagnostics.probe_size}, at_checkpoints {with_diagnostics.at_checkpoints}, every_steps "
          f"{with_diagnostics.every_steps}; {os.cpu_count()} CPUs", flush=True)
    results: dict[str, list[dict]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        for repeat in range(args.repeats):
            for name, switch in zip(RUN_NAMES, ("false", "true")):
                result = timed_run(args.recipe, [*args.overrides, f"diagnostics.enabled={switch}"],
                                   root / f"{name}_{repeat}")
                results[name].append(result)
                print(f"{name:>7} #{repeat + 1}: wall {result['wall_s']:6.1f} s  process {result['process_s']:6.1f} s"
                      f"  CPU {result['cpu_s']:6.1f} s  top1 {result['top1']:6.2f}  diagnostics "
                      f"{result['evaluations']} evaluations, cost {result['diagnostics_s']:5.2f} s", flush=True)
    # Other jobs only ever add time, so the fastest run of each kind is the least disturbed estimate.
    for key, what in (("wall_s", "run wall time"), ("process_s", "process wall time"), ("cpu_s", "process CPU time")):
        for summary in (min, statistics.median):
            without = summary(r[key] for r in results["without"])
            with_ = summary(r[key] for r in results["with"])
            print(f"{summary.__name__:>6} {what}: without {without:.1f} s, with {with_:.1f} s -> overhead "
                  f"{with_ - without:+.2f} s ({100 * (with_ - without) / without:+.1f} %)")
    own = statistics.median(r["diagnostics_s"] for r in results["with"])
    without = statistics.median(r["wall_s"] for r in results["without"])
    print(f"callback's own time (median of its 'diagnostics cost'): {own:.2f} s = {100 * own / without:.1f} % of the "
          "median run wall time without diagnostics")


if __name__ == "__main__":
    main()
