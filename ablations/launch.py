"""Launching one sweep point: the `accelerate launch` command, run locally or as a Slurm job.

Every launch is `accelerate launch <accelerate_args> trainer/train.py --recipe RECIPE --output
RUN_DIR --resume auto [--eval-only]` (RECIPE: the point's resolved recipe, written by the sweep
runner), so re-launching a point resumes it from its newest complete checkpoint, and a finished
point is never started twice (the sweep runner skips it).

- Local: `run_local` runs N commands at a time, each logging to its own file.
- Slurm: `submit_slurm` submits one submitit job per point (`SlurmTrainJob`). On preemption or
  time-out submitit calls its `checkpoint()`: the trainers get SIGTERM, save a checkpoint and
  exit, and the job is requeued with the same command, which resumes. Job ids are kept in
  `<sweep output>/slurm/jobs.json` so that re-running the sweep command does not submit a point
  whose job is still queued or running (`still_queued`).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # an accelerate dependency
import submitit

from ablations.sweep_spec import SweepError

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "trainer" / "train.py"
# --quiet: a failed run shows its own one-line error, not the launcher's CalledProcessError traceback
DEFAULT_ACCELERATE_ARGS = ("--quiet", "--num_processes", "1")
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


def free_port() -> int:
    """A TCP port nobody listens on now (for a local multi-process run's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def is_multi_process(accelerate_args: Iterable[str]) -> bool:
    args = list(accelerate_args)
    if "--multi_gpu" in args:
        return True
    for flag in ("--num_processes", "--num-processes"):
        if flag in args and args.index(flag) + 1 < len(args):
            return int(args[args.index(flag) + 1]) > 1
    return any(a.startswith(("--num_processes=", "--num-processes=")) and int(a.split("=", 1)[1]) > 1
               for a in args)


def _run_logged(command: list[str], log_path: Path, on_start: Callable[[subprocess.Popen], None] | None = None,
                preexec_fn: Callable[[], None] | None = None, env: dict[str, str] | None = None) -> int:
    """Run `command` in the caller's working directory (relative paths in overrides mean what the user
    typed), appending its output to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)
        if on_start is not None:
            on_start(proc)
        return proc.wait()


def run_local(jobs: list[LaunchJob], max_parallel: int = 1,
              on_event: Callable[[str, LaunchJob, int | None], None] = lambda *_: None) -> dict[str, int]:
    """Run jobs `max_parallel` at a time; returns each job's exit code.

    `on_event("start"|"end", job, rc)` is called under a lock, "end" before the worker takes its
    next job, so a progress line never shows more than `max_parallel` running. Unless the caller set
    OMP_NUM_THREADS, concurrent jobs get cpu_count // max_parallel threads each. On Ctrl-C (which
    the running trainers also receive: they save and stop) no further job starts; the running
    ones are waited for and KeyboardInterrupt is re-raised.
    """
    results: dict[str, int] = {}
    lock = threading.Lock()
    stopping = threading.Event()
    env = {}
    if max_parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Concurrent runs share the cores (as torchrun does for its processes): oversubscribed
        # OpenMP threads spin and slow every run down several times.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max_parallel))

    def run(job: LaunchJob) -> None:
        if stopping.is_set():
            return
        with lock:
            on_event("start", job, None)
        rc = _run_logged(job.command, job.log_path, env=env)
        with lock:
            results[job.name] = rc
            on_event("end", job, rc)

    pool = ThreadPoolExecutor(max_workers=max(1, max_parallel))
    futures = [pool.submit(run, job) for job in jobs]
    try:
        for future in futures:
            future.result()
    except KeyboardInterrupt:
        stopping.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _ignore_timeout_warning_signal() -> None:
    # Slurm's `--signal=USR2@90` (submitit's time-limit warning) reaches every process of the job
    # step, and SIGUSR2 terminates Python by default. Only the submitit process should act on it;
    # an ignored disposition survives exec, so the launcher and trainers inherit it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def stop_trainers(launcher: subprocess.Popen, timeout_s: float = PREEMPT_SAVE_TIMEOUT_S) -> None:
    """Ask the training processes under `launcher` to save and stop (SIGTERM), and wait for the launcher.

    The trainers, not the launcher, get the signal: accelerate's single-process launcher does not
    forward it (the trainer would live on, orphaned, next to its requeued successor) and torchrun
    gives its workers only a short grace period before killing them mid-save.
    """
    if launcher.poll() is not None:
        return
    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    script = TRAIN_SCRIPT.name
    trainers = [p for p in children if _cmdline_has(p, script)] or [psutil.Process(launcher.pid)]
    for process in trainers:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    try:
        launcher.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for process in [*children, psutil.Process(launcher.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        launcher.wait()


def _cmdline_has(process: psutil.Process, needle: str) -> bool:
    try:
        return any(needle in part for part in process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


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

        rc = _run_logged(command, self.log_path, on_start=remember, preexec_fn=_ignore_timeout_warning_signal)
        if rc != 0:
            raise RuntimeError(f"training exited with code {rc}; see {self.log_path}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer saves on SIGTERM and exits 0; wait for that, then requeue with --resume auto.
        if self._proc is not None:
            stop_trainers(self._proc)
        return submitit.helpers.DelayedSubmission(SlurmTrainJob(self.command, self.log_path))

    def __getstate__(self) -> dict:
        return {"command": self.command, "log_path": self.log_path, "_proc": None}


def submit_slurm(jobs: list[LaunchJob], folder: Path, slurm: dict[str, Any],
                 cluster: str | None = None) -> list[submitit.Job]:
    """One submitit job per point. `slurm` holds submitit's parameters: the generic ones (nodes,
    gpus_per_node, cpus_per_task, mem_gb, timeout_min, tasks_per_node) and Slurm's with a `slurm_`
    prefix (slurm_partition, slurm_account, slurm_qos, ...). `cluster="local"` runs through
    submitit's local executor (what the tests use). The job ids are recorded in
    `folder/jobs.json`, so a later invocation does not submit a point that is still queued."""
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = dict(slurm)
    params.setdefault("tasks_per_node", 1)  # accelerate spawns the per-GPU processes itself
    if cluster == "local":
        params = {k: v for k, v in params.items() if k in ("timeout_min", "tasks_per_node", "nodes", "gpus_per_node")}
        params["nodes"] = 1
    submitted = []
    for job in jobs:
        try:
            executor.update_parameters(name=job.name, **params)
        except (NameError, ValueError, TypeError) as e:
            raise SweepError(f"launcher.slurm: {str(e).splitlines()[0]}") from None
        submitted.append(executor.submit(SlurmTrainJob(job.command, job.log_path)))
        _record_job(folder, job.name, submitted[-1].job_id, cluster or "slurm")
    return submitted


JOBS_FILE = "jobs.json"
# sacct states after which a job will not run again by itself (everything else may still run).
FINAL_SLURM_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                      "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


def _record_job(folder: Path, name: str, job_id: str, cluster: str) -> None:
    path = folder / JOBS_FILE
    jobs = json.loads(path.read_text()) if path.is_file() else {}
    jobs[name] = {"job_id": str(job_id), "cluster": cluster}
    tmp = path.with_name(f".tmp-{JOBS_FILE}")
    tmp.write_text(json.dumps(jobs, indent=2))
    tmp.replace(path)


def slurm_state(folder: Path, job_id: str) -> str:
    """The job's Slurm state (sacct through submitit), e.g. PENDING, RUNNING, COMPLETED, UNKNOWN."""
    return submitit.SlurmJob(folder=folder, job_id=job_id).state.split()[0].rstrip("+")


def still_queued(folder: Path, state_of: Callable[[Path, str], str] = slurm_state) -> dict[str, str]:
    """Points whose recorded Slurm job may still run: {point name: "job <id> <STATE>"}.

    A state sacct cannot tell (UNKNOWN) counts as queued: submitting a second job into the same
    run dir is worse than waiting; delete the entry from jobs.json to force a resubmission.
    """
    path = folder / JOBS_FILE
    if not path.is_file():
        return {}
    queued = {}
    for name, job in json.loads(path.read_text()).items():
        if job.get("cluster") != "slurm":
            continue  # the local executor's jobs ended with the command that started them
        state = state_of(folder, job["job_id"])
        if state not in FINAL_SLURM_STATES:
            queued[name] = f"job {job['job_id']} {state}"
    return queued
