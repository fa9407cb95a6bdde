"""Checkpoint files: completeness marker, atomic commit, retention, RNG streams, run-dir protection."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    MANIFEST,
    CheckpointError,
    commit,
    complete_checkpoints,
    is_complete,
    latest_checkpoint,
    load_tensor_file,
    prune,
    remove_incomplete,
    weights_only_torch_loads,
)
from trainer.rng import capture_rng_state, restore_rng_state
from trainer.run_dir import RunDir, RunDirError, prepare_run_dir, recipe_differences


def fake_checkpoint(root, step, tags=("periodic",)):
    tmp = root / f".tmp-step_{step:08d}"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"x" * step)
    commit(tmp, root / f"step_{step:08d}", {"step": step, "epoch": 0, "tags": list(tags)})
    return root / f"step_{step:08d}"


def test_complete_only_with_a_matching_manifest(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 3)
    assert is_complete(ckpt) and not (tmp_path / ".tmp-step_00000003").exists()
    (ckpt / "model.safetensors").write_bytes(b"truncated")  # size no longer matches the manifest
    assert not is_complete(ckpt)
    partial = tmp_path / ".tmp-step_00000009"
    partial.mkdir()
    (partial / MANIFEST).write_text(json.dumps({"step": 9, "files": {}}))
    assert latest_checkpoint(tmp_path) is None  # neither the corrupt one nor a .tmp- directory
    assert remove_incomplete(tmp_path) == [partial] and not partial.exists()


def test_latest_is_by_step_and_prune_keeps_last_k_best_and_newest(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 9, tags=("best",))
    assert latest_checkpoint(tmp_path).name == "step_00000009"
    removed = prune(tmp_path, keep_last=2, protected={"step_00000002"})
    assert sorted(p.name for p in removed) == ["step_00000004"]
    assert [p.name for p in complete_checkpoints(tmp_path)] == [
        "step_00000002", "step_00000006", "step_00000008", "step_00000009"]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_tensor_file(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_arbitrary_pickle_is_refused(tmp_path):
    torch.save({"obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_tensor_file(tmp_path / "evil.pt")


def test_third_party_loads_that_ask_for_pickle_are_restricted_inside_the_guard(tmp_path):
    # DeepSpeed's checkpoint engine calls torch.load(weights_only=False); inside the guard that is refused
    # unless the class is explicitly allowed, and the guard leaves the environment as it found it.
    torch.save({"obj": Path("x")}, tmp_path / "third_party.pt")
    with pytest.raises(CheckpointError, match=r"^ckpt: refused to unpickle pathlib\.\w*Path "):
        with weights_only_torch_loads(Path("ckpt")):
            torch.load(tmp_path / "third_party.pt", weights_only=False)
    with weights_only_torch_loads(Path("ckpt"), [type(Path("x"))]):
        assert torch.load(tmp_path / "third_party.pt", weights_only=False)["obj"] == Path("x")
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert torch.load(tmp_path / "third_party.pt", weights_only=False)["obj"] == Path("x")


def test_recipe_mismatch_names_keys_and_never_overwrites(tmp_path, tiny_recipe):
    run = RunDir(tmp_path / "run")
    a, b = tiny_recipe(), tiny_recipe("optim.lr=0.5", "train.max_steps=3")
    prepare_run_dir(run, a, None, is_main=True)
    saved = run.recipe.read_text()
    assert recipe_differences(a, b) == ["optim.lr: 0.002 -> 0.5"]  # max_steps may change on resume
    with pytest.raises(RunDirError, match="optim.lr"):
        prepare_run_dir(run, b, None, is_main=True)
    assert run.recipe.read_text() == saved
    fake_checkpoint(run.checkpoints, 5)
    with pytest.raises(RunDirError, match="--resume auto"):
        prepare_run_dir(run, a, None, is_main=True)
