"""Damaged checkpoints, NaN weights, a full disk, a failed start: each ends in one `error:` line naming the
file and the problem (exit 2; 3 for a full disk; 1 for a diverged run), `--resume auto` falls back to the
newest checkpoint that verifies and says what it skipped, a run is never silently started over, and
nothing written before is lost."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainer.checkpoint
import trainer.save_restore
from models import create_vit, save_model_file
from tests.conftest import DEMO_RECIPE, TINY_OVERRIDES
from trainer.checkpoint import MANIFEST, _files_under, complete_checkpoints, read_manifest, verify_checkpoint
from trainer.run_dir import DiskFullError, append_jsonl
from trainer.train import main

# 8 updates per epoch, 2 epochs; a checkpoint every 2 updates, all of them kept
ARGS = ["--recipe", str(DEMO_RECIPE), "--set", *TINY_OVERRIDES, "train.ema_decay=0.9", "checkpoint.every_steps=2",
        "checkpoint.every_epochs=null", "checkpoint.keep_last=20", "checkpoint.save_best=false",
        "logging.tensorboard=false", "train.max_steps=6"]


def run_main(run: Path, *extra: str, resume: str | None = "auto", capsys=None) -> tuple[int, str, str]:
    """trainer/train.py's main in this process: (exit code, stdout, stderr)."""
    argv = [*ARGS[:2], "--output", str(run), *ARGS[2:], *extra, *(["--resume", resume] if resume else [])]
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code
    finally:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    out = capsys.readouterr() if capsys is not None else None
    return code, (out.out if out else ""), (out.err if out else "")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run stopped at step 6 with checkpoints at steps 2, 4 and 6."""
    run = tmp_path_factory.mktemp("faults") / "run"
    assert run_main(run, resume=None)[0] == 0
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [
        "step_00000002", "step_00000004", "step_00000006"]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def reseal(checkpoint: Path) -> None:
    """Rewrite the manifest so sizes and hashes match the (damaged) files: damage the hash cannot see."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = _files_under(checkpoint)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def zero_tail(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value))


def edit_state(checkpoint: Path, **changes) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    write_json(checkpoint / "trainer_state.json", {**state, **changes})


def other_model(checkpoint: Path) -> None:
    torch.manual_seed(0)
    other = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                       num_classes=10)
    save_model_file(other, checkpoint / "model.safetensors")


NEWEST = "step_00000006"
# (damage, file named in the message, the problem as the message says it); with --resume auto the run
# falls back to step 4, with --resume <newest> it stops with exit 2
DETECTED = {
    "zeroed tail of model.safetensors": (lambda c: zero_tail(c / "model.safetensors"), "model.safetensors",
                                         "content differs"),
    "flipped bytes in optimizer.pt": (lambda c: flip(c / "optimizer.pt", 200), "optimizer.pt", "content differs"),
    "flipped safetensors header": (lambda c: flip(c / "model.safetensors", 12), "model.safetensors",
                                   "content differs"),
    "truncated ema.safetensors": (lambda c: truncate(c / "ema.safetensors"), "ema.safetensors", "truncated"),
    "manifest is a list": (lambda c: write_json(c / MANIFEST, [1, 2]), MANIFEST, "expected a JSON object"),
    "manifest is []": (lambda c: write_json(c / MANIFEST, []), MANIFEST, "expected a JSON object"),
    "manifest lacks step": (lambda c: write_json(c / MANIFEST, {"files": {}}), MANIFEST, "step = None"),
    "manifest has a string step": (lambda c: write_json(c / MANIFEST, {"step": "6", "files": {}}), MANIFEST,
                                   "step = '6'"),
    "garbage trainer_state.json": (lambda c: ((c / "trainer_state.json").write_text("{garbage"), reseal(c)),
                                   "trainer_state.json", "not JSON"),
    "extra key in trainer_state.json": (lambda c: (edit_state(c, surprise=1), reseal(c)), "trainer_state.json",
                                        "unknown keys ['surprise']"),
    "missing rng file": (lambda c: (c / "rng_rank0.pt").unlink(), "rng_rank0.pt", "missing"),
}
# damage that verifies (the manifest was resealed) but does not load: exit 2 naming the file, both ways
UNLOADABLE = {
    "garbage optimizer.pt": (lambda c: ((c / "optimizer.pt").write_bytes(b"\x80garbage" * 50), reseal(c)),
                             "optimizer.pt", "cannot be loaded"),
    "refused pickle in scheduler.pt": (lambda c: (torch.save({"x": Path("p")}, c / "scheduler.pt"), reseal(c)),
                                       "scheduler.pt", "refused to unpickle pathlib"),
    "garbage ema.safetensors": (lambda c: ((c / "ema.safetensors").write_bytes(b"x" * 64), reseal(c)),
                                "ema.safetensors", "cannot be loaded"),
    "another architecture's weights": (lambda c: (other_model(c), reseal(c)), "model.safetensors",
                                       "weights of another model"),
    "batch_in_epoch out of range": (lambda c: (edit_state(c, batch_in_epoch=99), reseal(c)), "trainer_state.json",
                                    "batch_in_epoch = 99 is outside [0, 8)"),
}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("damage", sorted(DETECTED))
def test_damage_is_detected_skipped_by_auto_and_named_when_asked_for(damage, run, capsys):
    apply, file, problem = DETECTED[damage]
    newest = run / "checkpoints" / NEWEST
    apply(newest)
    with pytest.raises(trainer.checkpoint.CheckpointError, match=f"{re.escape(file)}.*{re.escape(problem)}"):
        verify_checkpoint(newest)
    code, _, err = run_main(run, "train.max_steps=8", resume=str(newest), capsys=capsys)
    line = error_line(err)
    assert code == 2 and file in line and problem in line and "step_00000004" in line  # the one that verifies
    code, out, err = run_main(run, "train.max_steps=8", capsys=capsys)
    assert code == 0, err
    assert f"warning: skipping checkpoint {newest}: " in out and file in out
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and read_manifest(run / "checkpoints" / "step_00000008")["step"] == 8
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # steps 5 and 6 logged once, redone from step 4


@pytest.mark.parametrize("damage", sorted(UNLOADABLE))
def test_damage_that_verifies_but_does_not_load_is_one_error_line(damage, run, capsys):
    apply, file, problem = UNLOADABLE[damage]
    newest = run / "checkpoints" / NEWEST
    apply(newest)
    for resume in (str(newest), "auto"):
        code, _, err = run_main(run, "train.max_steps=8", resume=resume, capsys=capsys)
        line = error_line(err)
        assert code == 2 and file in line and problem in line, line
    assert complete_checkpoints(run / "checkpoints")[-1].name == NEWEST  # nothing written over it


def test_damaged_logs_and_recipe_are_named(run, capsys):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines[:2], "{not json", *lines[3:]]) + "\n")
    code, _, err = run_main(run, "train.max_steps=8", capsys=capsys)
    assert code == 2 and "metrics.jsonl:3: not a JSON record" in error_line(err)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "recipe.yaml").write_bytes(b"model: [unclosed\n\x00")
    code, _, err = run_main(run, "train.max_steps=8", capsys=capsys)
    assert code == 2 and "recipe.yaml: not a recipe" in error_line(err)


def test_a_run_whose_every_checkpoint_is_damaged_is_never_started_over(run, capsys):
    for checkpoint in (run / "checkpoints").glob("step_*"):
        truncate(checkpoint / "model.safetensors")
    metrics = (run / "metrics.jsonl").read_text()
    code, out, err = run_main(run, "train.max_steps=8", capsys=capsys)
    line = error_line(err)
    assert code == 2 and "none of its 3 checkpoints verifies" in line and "refusing to start over" in line
    assert out.count("warning: skipping checkpoint") == 3
    assert (run / "metrics.jsonl").read_text() == metrics  # the logs of the run are untouched


def test_nonfinite_weights_are_never_saved_and_the_named_checkpoint_is_good(tmp_path, capsys):
    # lr 1e4: the first updates are finite, then the weights overflow while the loss logged is still finite
    code, _, err = run_main(tmp_path / "run", "optim.lr=1e4", "checkpoint.every_steps=1", "train.max_steps=16",
                            "schedule.warmup_epochs=0", resume=None, capsys=capsys)
    line = error_line(err)
    assert code == 1 and "non-finite" in line and "Last good checkpoint: " in line
    named = Path(line.split("Last good checkpoint: ")[1])
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved and named == saved[-1]
    for checkpoint in saved:  # every checkpoint written holds finite weights and EMA
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(checkpoint / name).values()), checkpoint
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))


@contextlib.contextmanager
def small_disk(path: Path, size: int, monkeypatch):
    """`path` on a tmpfs of `size` bytes (as root, where mount works); elsewhere the second checkpoint's
    model file raises ENOSPC as a full disk would. Yields a function that frees the space."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    calls = []
    if not mounted:
        real = trainer.save_restore.save_model_file

        def full(module, file, **kwargs):
            calls.append(file)
            if len(calls) == 3:  # model of checkpoint 1, its EMA, then the model of checkpoint 2
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
            return real(module, file, **kwargs)

        monkeypatch.setattr(trainer.save_restore, "save_model_file", full)

    def free() -> None:
        if mounted:
            subprocess.run(["mount", "-o", f"remount,size={100 * size}", str(path)], check=True)
        else:
            monkeypatch.undo()

    try:
        yield free
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_stops_with_exit_3_and_the_run_continues_once_space_is_freed(trained, tmp_path, capsys,
                                                                                 monkeypatch):
    one_checkpoint = sum(p.stat().st_size for p in (trained / "checkpoints" / "step_00000002").rglob("*"))
    disk = tmp_path / "disk"
    with small_disk(disk, int(1.6 * one_checkpoint) + 64 * 1024, monkeypatch) as free:
        run = disk / "run"
        code, _, err = run_main(run, "checkpoint.keep_last=1", resume=None, capsys=capsys)
        line = error_line(err)
        assert code == 3 and "no space left on the device writing " in line and "needs about" in line
        assert "step_00000002) is intact" in line
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
        verify_checkpoint(run / "checkpoints" / "step_00000002")
        free()
        code, _, err = run_main(run, "checkpoint.keep_last=1", capsys=capsys)
        assert code == 0, err
        got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        want = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in got] == [r["step"] for r in want]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)


def test_a_full_disk_while_appending_a_log_line_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": math.nan})
    assert path.read_text() == '{"step": 1, "loss": null}\n'  # strict JSON
    before = path.read_bytes()

    class FullDisk:
        def __init__(self, *args, **kwargs):
            self.file = open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:5])
            self.file.flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        def truncate(self, size):
            return self.file.truncate(size)

    monkeypatch.setattr("trainer.run_dir.open", FullDisk, raising=False)
    with pytest.raises(DiskFullError, match=r"no space left on the device writing .*metrics.jsonl: it needs 12 B"):
        append_jsonl(path, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_a_failed_start_leaves_the_run_dir_free_for_the_corrected_command(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_main(run, "data.source=imagefolder", f"data.root={tmp_path / 'nowhere'}", resume=None,
                            capsys=capsys)
    assert code == 2 and "nowhere" in error_line(err)
    assert not (run / "recipe.yaml").exists()
    code, _, err = run_main(run, resume=None, capsys=capsys)
    assert code == 0, err


def test_output_naming_a_file_or_a_foreign_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code, _, err = run_main(tmp_path / "file", resume=None, capsys=capsys)
    assert code == 2 and "is a file, not a run directory" in error_line(err)
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "metrics.jsonl").write_text("my own notes\n")
    code, _, err = run_main(tmp_path / "folder", resume=None, capsys=capsys)
    assert code == 2 and "holds metrics.jsonl but no recipe.yaml: it is not a depthlab run" in error_line(err)
    assert (tmp_path / "folder" / "metrics.jsonl").read_text() == "my own notes\n"


def test_console_progress_lines_without_a_terminal_and_a_launcher_precision_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    code, out, _ = run_main(tmp_path / "run", "logging.every_steps=2", resume=None, capsys=capsys)
    assert code == 0
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/16", "4/16", "6/16"]
    assert all("loss " in line and " img/s  ETA " in line and "epoch 0." in line for line in progress)
    assert out.count("note: mixed precision no (train.precision); the launcher's 'bf16' does not apply") == 1
