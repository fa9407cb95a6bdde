"""The multi-GPU paths as the first 8-GPU user meets them, checked on CPU: which backend wins, FSDP's stated
numerics, each process's own CUDA RNG stream, peak-memory accounting, the MFU table, and one run dir that
every process sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ablations.launch import free_port
from tests.conftest import DEMO_RECIPE, REPO, TINY_OVERRIDES
from tools.benchmark_train import peak_tflops_of
from trainer import rng, tracking
from trainer.accelerator import DistributedSetupError, _fsdp_plugin, describe_fsdp, effective_strategy


@pytest.mark.parametrize("strategy,launched,expected", [
    ("auto", None, "auto"), ("auto", "deepspeed", "deepspeed"), ("auto", "fsdp", "fsdp"),
    ("deepspeed", "deepspeed", "deepspeed"), ("ddp", "deepspeed", None), ("ddp", "fsdp", None),
    ("fsdp", "deepspeed", None), ("deepspeed", None, "deepspeed"),
])
def test_an_explicit_strategy_wins_and_a_contradicting_launch_is_refused(strategy, launched, expected, tiny_recipe,
                                                                        monkeypatch):
    for variable in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(variable, raising=False)
    if launched:
        monkeypatch.setenv(f"ACCELERATE_USE_{launched.upper()}", "true")
    recipe = tiny_recipe(f"distributed.strategy={strategy}")
    if expected is None:
        with pytest.raises(DistributedSetupError, match=rf"strategy = '{strategy}', but the launch asks for {launched}"):
            effective_strategy(recipe)
    else:
        assert effective_strategy(recipe) == expected


def test_fsdp_reduces_gradients_in_float32_as_ddp_does_and_prefetches(tiny_recipe):
    from torch.distributed.fsdp import BackwardPrefetch

    plugin = _fsdp_plugin(tiny_recipe("train.precision=bf16"))
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert plugin.backward_prefetch == BackwardPrefetch.BACKWARD_PRE
    low = _fsdp_plugin(tiny_recipe("train.precision=bf16", "distributed.fsdp_reduce_dtype=param"))
    assert low.mixed_precision_policy.reduce_dtype == torch.bfloat16
    assert describe_fsdp(tiny_recipe("train.precision=bf16")) == (
        "FSDP: full_shard, one unit per Block, parameters in bfloat16, gradients reduced in float32, "
        "backward prefetch BACKWARD_PRE")


class FakeCuda:
    """torch.cuda as 4 visible devices, this process on `device`."""

    def __init__(self, device: int, devices: int = 4):
        self.device, self.states = device, {d: torch.tensor([d], dtype=torch.uint8) for d in range(devices)}
        self.restored: dict[int, torch.Tensor] = {}

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device=None: self.states[device])
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: list(self.states.values()))
        monkeypatch.setattr(cuda, "set_rng_state", lambda state, device=None: self.restored.__setitem__(device, state))


def test_each_process_saves_and_restores_its_own_cuda_rng_stream(monkeypatch):
    saver = FakeCuda(device=2)
    saver.install(monkeypatch)
    state = rng.capture_rng_state()
    assert state["cuda"].tolist() == [2]  # its own device's stream, not a list of every visible device's
    resumer = FakeCuda(device=0, devices=1)  # resumed with one visible device per process
    resumer.install(monkeypatch)
    rng.restore_rng_state(state)
    assert list(resumer.restored) == [0] and resumer.restored[0].tolist() == [2]
    # a checkpoint written before: every device's stream; the process takes its own, or warns when it has none
    old = {**state, "cuda": [torch.tensor([d], dtype=torch.uint8) for d in range(4)]}
    on_device_3 = FakeCuda(device=3)
    on_device_3.install(monkeypatch)
    rng.restore_rng_state(old)
    assert on_device_3.restored[3].tolist() == [3]
    on_device_5 = FakeCuda(device=5, devices=8)
    on_device_5.install(monkeypatch)
    with pytest.warns(UserWarning, match="holds CUDA RNG streams of 4 devices and this process uses device 5"):
        rng.restore_rng_state(old)
    assert on_device_5.restored == {}


def test_logged_peak_gpu_memory_is_reset_so_a_probe_peak_does_not_stay(monkeypatch):
    peaks, resets = iter([9 * 2**30, 3 * 2**30]), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    first, second = tracking.peak_memory_gib(), tracking.peak_memory_gib()
    assert (first["train/peak_gpu_mem_gib"], second["train/peak_gpu_mem_gib"]) == (9.0, 3.0) and len(resets) == 2


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", None), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla V100-SXM2-16GB", None),
])
def test_the_mfu_table_matches_whole_device_names_not_substrings(name, peak):
    assert peak_tflops_of(name) == peak


NODE_LOCAL_SCRIPT = """
import json, os, sys
from pathlib import Path
from trainer.cli import exit_on_user_error
from trainer.loop import train
from trainer.recipe import load_recipe

# each rank its own folder under the same name: what node-local disks look like from the processes
base, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
exit_on_user_error(lambda: train(load_recipe(sys.argv[3], overrides), base / f"node{os.environ['RANK']}" / "run"))()
"""


def test_processes_that_do_not_see_one_run_dir_stop_at_once_with_one_line(tmp_path):
    script = tmp_path / "node_local.py"
    script.write_text(NODE_LOCAL_SCRIPT)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
                           "--main_process_port", str(free_port()), "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(script), str(tmp_path), json.dumps(TINY_OVERRIDES),
                           str(DEMO_RECIPE)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and errors == [
        f"error: run dir {tmp_path / 'node0' / 'run'}: process 1 cannot see what process 0 writes there (a disk "
        "local to its node?); put --output on a filesystem every node mounts"], proc.stderr[-2000:]
    assert not (tmp_path / "node0" / "run" / "recipe.yaml").exists()  # nothing was started
