"""Launching one sweep point: the `accelerate launch` command, run locally or as a Slurm job.

Every launch is `accelerate launch <accelerate_args> trainer/train.py --recipe BASE --set ...
--output RUN_DIR --resume auto`, so re-launching a point resumes it from its newest complete
checkpoint, and a finished point is never started twice (the sweep runner skips it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "trainer" / "train.py"
DEFAULT_ACCELERATE_ARGS = ("--num_processes", "1")
# Seconds a preempted Slurm job gives the trainer to finish its step and save before requeueing.
PREEMPT_SAVE_TIMEOUT_S = 600


@dataclass
class LaunchJob:
    name: str
    command: list[str]
    run_dir: Path
    log_path: Path


def accelerate_command(accelerate_args: Iterable[str], script: Path, script_args: Iterable[str]) -> list[str]:
    # `python -m accelerate.commands.launch` rather than the `accelerate` script: the same
    # interpreter (and virtual environment) as the sweep runner, whatever PATH says.
    return [sys.executable, "-m", "accelerate.commands.launch", *accelerate_args, str(script), *script_args]


def train_command(base_recipe: Path, overrides: list[str], run_dir: Path,
                  accelerate_args: Iterable[str] = DEFAULT_ACCELERATE_ARGS, extra_args: Iterable[str] = ()) -> list[str]:
    args = ["--recipe", str(base_recipe)]
    if overrides:
        args += ["--set", *overrides]
    args += ["--output", str(run_dir), "--resume", "auto", *extra_args]
    return accelerate_command(accelerate_args, TRAIN_SCRIPT, args)


def _run_logged(command: list[str], log_path: Path, on_start: Callable[[subprocess.Popen], None] | None = None) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        if on_start is not None:
            on_start(proc)
        return proc.wait()


def run_local(jobs: list[LaunchJob], max_parallel: int = 1,
              on_event: Callable[[str, LaunchJob, int | None], None] = lambda *_: None) -> dict[str, int]:
    """Run jobs `max_parallel` at a time; returns each job's exit code. `on_event("start"|"end", job, rc)`."""
    results: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool:
        def run(job: LaunchJob) -> int:
            on_event("start", job, None)
            return _run_logged(job.command, job.log_path)

        futures = {pool.submit(run, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            results[job.name] = future.result()
            on_event("end", job, results[job.name])
    return results


class SlurmTrainJob(submitit.helpers.Checkpointable):
    """A submitit job that runs one point and, when preempted or timed out, saves and requeues itself.

    On multi-node jobs (one task per node) it adds accelerate's machine arguments from the
    Slurm environment; `accelerate_args` should then give the total `--num_processes`.
    """

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    def _machine_args(self) -> list[str]:
        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # not inside a submitit job (local executor tests)
            return []
        if env.num_nodes <= 1:
            return []
        return ["--num_machines", str(env.num_nodes), "--machine_rank", str(env.node),
                "--main_process_ip", env.hostnames[0], "--main_process_port", os.environ.get("MASTER_PORT", "29500")]

    def __call__(self) -> int:
        launch = self.command.index("accelerate.commands.launch") + 1
        command = [*self.command[:launch], *self._machine_args(), *self.command[launch:]]

        def remember(proc: subprocess.Popen) -> None:
            self._proc = proc

        rc = _run_logged(command, self.log_path, on_start=remember)
        if rc != 0:
            raise RuntimeError(f"training exited with code {rc}; see {self.log_path}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer saves on SIGTERM and exits 0; wait for that, then requeue with --resume auto.
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=PREEMPT_SAVE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return submitit.helpers.DelayedSubmission(SlurmTrainJob(self.command, self.log_path))

    def __getstate__(self) -> dict:
        return {"command": self.command, "log_path": self.log_path, "_proc": None}


def submit_slurm(jobs: list[LaunchJob], folder: Path, slurm: dict[str, Any],
                 cluster: str | None = None) -> list[submitit.Job]:
    """One submitit job per point. `slurm` holds submitit/Slurm parameters (partition, nodes,
    gpus_per_node, cpus_per_task, mem_gb, timeout_min, slurm_* extras). `cluster="local"` runs
    through submitit's local executor (what the tests use)."""
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = dict(slurm)
    params.setdefault("tasks_per_node", 1)  # accelerate spawns the per-GPU processes itself
    if cluster == "local":
        params = {k: v for k, v in params.items() if k in ("timeout_min", "tasks_per_node", "nodes", "gpus_per_node")}
        params["nodes"] = 1
    submitted = []
    for job in jobs:
        executor.update_parameters(name=job.name, **params)
        submitted.append(executor.submit(SlurmTrainJob(job.command, job.log_path)))
    return submitted
