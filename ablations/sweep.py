"""Run a family of recipes declared in a sweep file.

    python ablations/sweep.py ablations/demo_mlp_reduction.yaml --dry-run
    python ablations/sweep.py ablations/demo_mlp_reduction.yaml --max-parallel 2
    python ablations/sweep.py ablations/mlp_reduction.yaml --launcher slurm --set data.root=/data/imagenet

Idempotent: finished runs are skipped, interrupted ones resume from their newest checkpoint,
and a run dir whose saved recipe differs from the sweep's point is never overwritten. Each
launched point runs its resolved recipe, written to <output>/recipes/<point>.yaml first.
The output must be a new or empty folder or a sweep's (it holds sweep.json, or only what a sweep
writes: runs/, recipes/, logs/, slurm/), and no snapshot may replace the sweep file or the base recipe.
Afterwards: `python tools/report.py <sweep output dir>`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python ablations/sweep.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.launch import (
    DEFAULT_ACCELERATE_ARGS,
    LaunchJob,
    free_port,
    is_multi_process,
    run_local,
    still_queued,
    submit_slurm,
    train_command,
)
from ablations.outputs import OutputError, check_output, read_head, read_json
from ablations.sweep_spec import SweepError, SweepPoint, SweepSpec, expand, load_sweep
from trainer.cli import exit_on_user_error
from trainer.recipe import RecipeError, save_recipe
from trainer.run_dir import (
    RunDir,
    load_saved_recipe,
    recipe_differences,
    resolve_weights_file,
    run_is_finished,
)

SWEEP_MANIFEST = "sweep.json"
RUNS_SUBDIR = "runs"
RECIPES_SUBDIR = "recipes"
# Everything a sweep writes into its output folder (a folder holding only these is a sweep's).
SWEEP_LAYOUT = {SWEEP_MANIFEST, f"{SWEEP_MANIFEST}.tmp", RUNS_SUBDIR, RECIPES_SUBDIR, "logs", "slurm"}
SNAPSHOT_HEADER = "# sweep "


@dataclass
class PointState:
    point: SweepPoint
    run_dir: Path
    status: str  # done | resume | new | queued (a Slurm job of an earlier invocation may still run it)


def point_state(point: SweepPoint, run_dir: Path) -> PointState:
    saved = RunDir(run_dir).recipe
    if saved.is_file():
        try:
            diffs = recipe_differences(load_saved_recipe(saved), point.recipe)
        except RecipeError as e:
            diffs = [f"the saved recipe does not load ({e})"]
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise SweepError(f"run dir {run_dir} holds a different recipe than sweep point '{point.name}' "
                             f"(saved -> sweep: {shown}); refusing to overwrite it: move it away or change "
                             "the sweep's output")
        return PointState(point, run_dir, "done" if run_is_finished(run_dir) else "resume")
    return PointState(point, run_dir, "new")


def missing_weights(spec: SweepSpec, points: list[SweepPoint]) -> list[str]:
    """Problems with the weights points start from: `mode: evaluate` needs model.checkpoint, and
    every model.checkpoint given must exist (caught here, before anything is launched)."""
    problems: dict[str, None] = {}
    for point in points:
        checkpoint = point.recipe.model.checkpoint
        if spec.mode == "evaluate" and not checkpoint:
            raise SweepError(f"{spec.path}: mode: evaluate needs model.checkpoint (point '{point.name}'); "
                             "pass --set model.checkpoint=PATH (a .safetensors file, checkpoint or run dir)")
        if checkpoint:
            try:
                resolve_weights_file(checkpoint)
            except RecipeError as e:
                problems[str(e)] = None
    return list(problems)


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
    """One sweep-level line: done / running / failed / pending, and the elapsed time."""

    def __init__(self, name: str, states: list[PointState]) -> None:
        self.name = name
        self.total = len(states)
        self.counts = {"done": sum(s.status == "done" for s in states), "running": 0, "failed": 0,
                       "queued": sum(s.status == "queued" for s in states)}
        self.counts["pending"] = self.total - self.counts["done"] - self.counts["queued"]
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
        queued = f", {c['queued']} queued" if c["queued"] else ""
        print(f"[sweep {self.name}] {c['done']}/{self.total} done, {c['running']} running, {c['failed']} failed, "
              f"{c['pending']} pending{queued}  ({elapsed})", flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (see ablations/)")
    p.add_argument("--dry-run", action="store_true", help="list the points and their overrides, launch nothing")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--max-parallel", type=_positive, default=None,
                   help="local: runs at a time (default: the sweep file's launcher.max_parallel, else 1)")
    p.add_argument("--output", help="sweep output dir (default: the sweep file's output)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides applied to every point (e.g. data.root=/data/imagenet)")
    p.add_argument("--submitit-cluster", choices=("slurm", "local"), default=None,
                   help="with --launcher slurm: local = submitit's local executor, which runs the jobs on this "
                        "machine and waits (try the Slurm path without a cluster)")
    return p.parse_args(argv)


def snapshot_recipe(spec: SweepSpec, point: SweepPoint) -> Path:
    """Where a point's resolved recipe is written before launch: the trainer runs exactly the recipe
    the sweep expanded, even if a base recipe is edited while the sweep runs."""
    return spec.output / RECIPES_SUBDIR / f"{point.name}.yaml"


def launch_jobs(spec: SweepSpec, states: list[PointState], max_parallel: int = 1,
                write_recipes: bool = True) -> list[LaunchJob]:
    accelerate_args = list(spec.launcher.get("accelerate_args", DEFAULT_ACCELERATE_ARGS))
    # Concurrent multi-process runs on one machine would all rendezvous on accelerate's default port.
    own_port = max_parallel > 1 and is_multi_process(accelerate_args) and not any(
        a.startswith("--main_process_port") for a in accelerate_args)
    extra = ["--eval-only"] if spec.mode == "evaluate" else []
    jobs = []
    for s in states:
        if s.status in ("done", "queued"):
            continue
        args = [*accelerate_args, "--main_process_port", str(free_port())] if own_port else accelerate_args
        recipe = snapshot_recipe(spec, s.point)
        if write_recipes:
            recipe.parent.mkdir(parents=True, exist_ok=True)
            save_recipe(s.point.recipe, recipe, header=f"sweep {spec.name}, point {s.point.name}: {spec.base} with "
                                                        f"--set {' '.join(s.point.overrides)}")
        # Absolute paths: the runner and the trainer agree on them whatever their working directories.
        command = train_command(recipe.absolute(), [], s.run_dir.absolute(), args, extra)
        jobs.append(LaunchJob(s.point.name, command, s.run_dir, spec.output / "logs" / f"{s.point.name}.log"))
    return jobs


def is_sweep_folder(folder: Path) -> bool:
    """A sweep output folder: its sweep.json is a manifest (`write_manifest`), or, when it has none, it
    holds nothing but what a sweep writes (a sweep interrupted before its manifest, run dirs put there)."""
    manifest = folder / SWEEP_MANIFEST
    if manifest.exists():
        data = read_json(manifest)
        return isinstance(data, dict) and "name" in data and isinstance(data.get("points"), list)
    return all(entry.name in SWEEP_LAYOUT for entry in folder.iterdir())


def is_snapshot(path: Path) -> bool:
    """A point's recipe as `launch_jobs` writes it: its header names the sweep and the point."""
    head = read_head(path, 4096)
    return head.startswith(SNAPSHOT_HEADER) and ", point " in head.splitlines()[0]


def check_sweep_output(spec: SweepSpec, points: list[SweepPoint], option: str) -> None:
    """The sweep's output folder and the files a launch writes in it may be written (ablations/outputs.py)."""
    inputs = [spec.path, spec.base]
    check_output(spec.output, option, inputs=inputs, folder=True, own=is_sweep_folder,
                 own_what="a sweep's output folder (with its sweep.json)")
    check_output(spec.output / SWEEP_MANIFEST, option, inputs=inputs, own=lambda _: True)  # own folder, own file
    for point in points:
        check_output(snapshot_recipe(spec, point), option, inputs=inputs, own=is_snapshot,
                     own_what=f"a recipe snapshot written by a sweep (a '{SNAPSHOT_HEADER}...' header)")


def print_dry_run(spec: SweepSpec, states: list[PointState], common: list[str], jobs: list[LaunchJob]) -> None:
    print(f"sweep {spec.name} ({spec.mode}): {len(states)} points from {spec.base} -> {spec.output}")
    for s in states:
        varying = " ".join(o for o in s.point.overrides if o not in common)
        print(f"  {s.point.name:<32} [{s.status}]  {varying}")
    if jobs:
        print(f"command of '{jobs[0].name}':\n  {shlex.join(jobs[0].command)}")


def run_slurm(args: argparse.Namespace, spec: SweepSpec, jobs: list[LaunchJob], results: dict[str, str]) -> bool:
    """Submit one job per point; True when the jobs ran here (local executor) and `results` is filled."""
    folder = spec.output / "slurm"
    submitted = submit_slurm(jobs, folder, dict(spec.launcher.get("slurm") or {}), cluster=args.submitit_cluster)
    for job, handle in zip(jobs, submitted):
        print(f"submitted {job.name}: job {handle.job_id}, log {job.log_path}")
    if args.submitit_cluster != "local":
        print(f"{len(submitted)} jobs submitted; re-run this command to see progress (queued and finished "
              "points are skipped, interrupted ones resubmitted)")
        return False
    for job, handle in zip(jobs, submitted):  # the local executor: wait, as a cluster job would
        try:
            handle.result()
            results[job.name] = "done" if run_is_finished(job.run_dir) else "interrupted"
        except Exception:  # noqa: BLE001 - submitit re-raises the job's error; it is in the log
            results[job.name] = "failed"
    return True


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = load_sweep(args.sweep, args.output)
    points = expand(spec, args.overrides)
    problems = missing_weights(spec, points)
    if problems and not args.dry_run:
        raise SweepError(f"{spec.path}: {'; '.join(problems)}")
    try:
        check_sweep_output(spec, points, "--output" if args.output else "output")
    except OutputError as e:
        if not args.dry_run:
            raise
        problems.append(str(e))  # a dry run writes nothing: it says what the real run would refuse
    states = [point_state(p, spec.output / RUNS_SUBDIR / p.name) for p in points]
    if args.launcher == "slurm" and args.submitit_cluster in (None, "slurm"):
        queued = still_queued(spec.output / "slurm")
        for s in states:
            if s.status != "done" and s.point.name in queued:
                s.status = "queued"
                print(f"{s.point.name}: {queued[s.point.name]}, not submitted again")
    max_parallel = args.max_parallel or int(spec.launcher.get("max_parallel", 1))
    jobs = launch_jobs(spec, states, max_parallel if args.launcher == "local" else 1, write_recipes=not args.dry_run)

    if args.dry_run:
        print_dry_run(spec, states, spec.common + args.overrides, jobs)
        for problem in problems:
            print(f"warning: {problem}")
        return 0

    progress = Progress(spec.name, states)
    progress.print()
    results: dict[str, str] = {}
    write_manifest(spec, states, results)
    if args.launcher == "slurm":
        if not run_slurm(args, spec, jobs, results):
            write_manifest(spec, states, {j.name: "submitted" for j in jobs})
            return 0
    else:
        def on_event(event: str, job: LaunchJob, rc: int | None) -> None:
            ok = rc == 0 and run_is_finished(job.run_dir)
            if event == "end":
                results[job.name] = "done" if ok else ("interrupted" if rc == 0 else "failed")
                write_manifest(spec, states, results)
            progress.update(event, ok)

        try:
            run_local(jobs, max_parallel, on_event)
        except KeyboardInterrupt:
            write_manifest(spec, states, results)
            print(f"\ninterrupted: running points were asked to save a checkpoint; re-run the same command "
                  f"to resume ({spec.path})", file=sys.stderr)
            return 130

    write_manifest(spec, states, results)
    failed = [j for j in jobs if results.get(j.name) not in ("done", None)]
    if failed:
        print(f"\n{len(failed)} of {len(jobs)} launched runs did not finish (fix what the log says; re-running "
              "the same command resumes them and skips finished runs):", file=sys.stderr)
        for job in failed:
            print(f"  {job.name}: {results[job.name]}, log {job.log_path}", file=sys.stderr)
        return 1
    print(f"\nsweep {spec.name} complete: {spec.output}\nreport: python tools/report.py {spec.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
