"""Run a family of recipes declared in a sweep file.

    python ablations/sweep.py ablations/demo_mlp_reduction.yaml --dry-run
    python ablations/sweep.py ablations/demo_mlp_reduction.yaml --max-parallel 2
    python ablations/sweep.py ablations/mlp_reduction.yaml --launcher slurm --set data.root=/data/imagenet

Idempotent: finished runs are skipped, interrupted ones resume from their newest checkpoint,
and a run dir whose saved recipe differs from the sweep's point is never overwritten.
Afterwards: `python tools/report.py <sweep output dir>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python ablations/sweep.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.launch import LaunchJob, run_local, submit_slurm, train_command
from ablations.sweep_spec import SweepError, SweepPoint, SweepSpec, expand, load_sweep
from trainer.cli import exit_on_user_error, register_user_error
from trainer.recipe import RecipeError, flatten_recipe, load_recipe
from trainer.run_state import run_is_finished

register_user_error(SweepError)

SWEEP_MANIFEST = "sweep.json"
RUNS_SUBDIR = "runs"


@dataclass
class PointState:
    point: SweepPoint
    run_dir: Path
    status: str  # done | resume | new


def recipe_differences(saved_path: Path, point: SweepPoint) -> list[str]:
    try:
        saved = flatten_recipe(load_recipe(saved_path))
    except RecipeError as e:
        return [f"the saved recipe does not load ({e})"]
    wanted = flatten_recipe(point.recipe)
    ignore = {"train.output_dir"}
    return [f"{k}: saved {saved.get(k)!r} != sweep {wanted.get(k)!r}"
            for k in sorted(set(saved) | set(wanted)) if k not in ignore and saved.get(k) != wanted.get(k)]


def point_state(point: SweepPoint, run_dir: Path) -> PointState:
    saved = run_dir / "recipe.yaml"
    if saved.is_file():
        diffs = recipe_differences(saved, point)
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise SweepError(f"run dir {run_dir} holds a different recipe than sweep point '{point.name}' "
                             f"({shown}); refusing to overwrite it: move it away or change the sweep's output")
        return PointState(point, run_dir, "done" if run_is_finished(run_dir) else "resume")
    return PointState(point, run_dir, "new")


def write_manifest(spec: SweepSpec, states: list[PointState], results: dict[str, str]) -> Path:
    """sweep.json: what tools/report.py reads to label the runs of this sweep."""
    path = spec.output / SWEEP_MANIFEST
    manifest = {
        "name": spec.name, "sweep_file": str(spec.path), "base": str(spec.base), "mode": spec.mode,
        "description": spec.description,
        "points": [{"name": s.point.name, "run_dir": str(s.run_dir.relative_to(spec.output)),
                    "labels": s.point.labels, "overrides": s.point.overrides,
                    "status": results.get(s.point.name, s.status)} for s in states],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return path


class Progress:
    """One sweep-level line: done / running / failed / pending."""

    def __init__(self, name: str, states: list[PointState]) -> None:
        self.name = name
        self.counts = {"done": sum(s.status == "done" for s in states), "running": 0, "failed": 0,
                       "pending": sum(s.status != "done" for s in states)}
        self.start = time.monotonic()

    def update(self, event: str, ok: bool | None = None) -> None:
        if event == "start":
            self.counts["pending"] -= 1
            self.counts["running"] += 1
        else:
            self.counts["running"] -= 1
            self.counts["done" if ok else "failed"] += 1
        self.print()

    def print(self) -> None:
        c = self.counts
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self.start))
        print(f"[sweep {self.name}] {c['done']} done, {c['running']} running, {c['failed']} failed, "
              f"{c['pending']} pending  ({elapsed})", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (see ablations/)")
    p.add_argument("--dry-run", action="store_true", help="list the points and their overrides, launch nothing")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--max-parallel", type=int, default=None, help="local: runs at a time (default: sweep file or 1)")
    p.add_argument("--output", help="sweep output dir (default: the sweep file's output)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides applied to every point (e.g. data.root=/data/imagenet)")
    p.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default=None,
                   help=argparse.SUPPRESS)  # submitit's local executor, for tests
    return p.parse_args(argv)


def launch_jobs(spec: SweepSpec, states: list[PointState]) -> list[LaunchJob]:
    accelerate_args = spec.launcher.get("accelerate_args", ["--num_processes", "1"])
    jobs = []
    for s in states:
        if s.status == "done":
            continue
        extra = ["--eval-only"] if spec.mode == "evaluate" else []
        command = train_command(spec.base, s.point.overrides, s.run_dir, accelerate_args, extra)
        jobs.append(LaunchJob(s.point.name, command, s.run_dir, spec.output / "logs" / f"{s.point.name}.log"))
    return jobs


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = load_sweep(args.sweep, args.output)
    points = expand(spec, args.overrides)
    states = [point_state(p, spec.output / RUNS_SUBDIR / p.name) for p in points]

    if args.dry_run:
        print(f"sweep {spec.name}: {len(points)} points from {spec.base} -> {spec.output}")
        for s in states:
            print(f"  {s.point.name:<40} [{s.status}]  " + " ".join(o for o in s.point.overrides
                                                                    if o not in spec.common + args.overrides))
        return 0

    jobs = launch_jobs(spec, states)
    progress = Progress(spec.name, states)
    progress.print()
    results: dict[str, str] = {}
    write_manifest(spec, states, results)
    if args.launcher == "slurm":
        slurm = dict(spec.launcher.get("slurm") or {})
        submitted = submit_slurm(jobs, spec.output / "slurm", slurm, cluster=args.submitit_cluster)
        for job, handle in zip(jobs, submitted):
            print(f"submitted {job.name}: job {handle.job_id}, log {job.log_path}")
        if args.submitit_cluster != "local":
            print(f"{len(submitted)} jobs submitted; re-run this command to see progress and skip finished runs")
            return 0
        for job, handle in zip(jobs, submitted):  # the local executor: wait, as a cluster job would
            try:
                handle.result()
                results[job.name] = "done" if run_is_finished(job.run_dir) else "failed"
            except Exception:  # noqa: BLE001 - submitit re-raises the job's error; it is in the log
                results[job.name] = "failed"
    else:
        max_parallel = args.max_parallel or int(spec.launcher.get("max_parallel", 1))

        def on_event(event: str, job: LaunchJob, rc: int | None) -> None:
            ok = rc == 0 and run_is_finished(job.run_dir)
            if event == "end":
                results[job.name] = "done" if ok else ("interrupted" if rc == 0 else "failed")
                write_manifest(spec, states, results)
            progress.update(event, ok)

        run_local(jobs, max_parallel, on_event)

    write_manifest(spec, states, results)
    failed = [j for j in jobs if results.get(j.name) not in ("done", None)]
    if failed:
        print(f"\n{len(failed)} of {len(jobs)} launched runs did not finish:", file=sys.stderr)
        for job in failed:
            print(f"  {job.name}: {results[job.name]}, log {job.log_path}", file=sys.stderr)
        return 1
    print(f"\nsweep {spec.name} complete: {spec.output}\nreport: python tools/report.py {spec.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
