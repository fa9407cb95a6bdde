"""train.compile does not change what a run computes: a compiled run stopped and resumed gives the compiled
straight run's losses, the diagnostics read the same values compiled or eager, and a model that fails to
compile trains eager with one line saying why. (The eager backend traces and wraps exactly as inductor does,
without generating code; tools/benchmark_train.py and tools/gpu_check.py time inductor.)"""

import json
from pathlib import Path

import pytest
import torch

from diagnostics.records import read_diagnostics
from trainer.loop import train

COMPILED = ["train.compile=true", "train.compile_backend=eager"]
DIAGNOSTICS = ["diagnostics.enabled=true", "diagnostics.metrics=[token_similarity,attention]",
               "diagnostics.every_steps=2", "diagnostics.probe_size=16", "diagnostics.tensorboard_images=never",
               "model.drop_path_rate=0.1", "train.ema_decay=0.9", "checkpoint.every_steps=2",
               "checkpoint.every_epochs=null"]


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_a_compiled_run_resumes_exactly_and_its_diagnostics_equal_the_eager_ones(tmp_path, tiny_recipe,
                                                                                  fresh_accelerate):
    def run(name, *extra, resume=None):
        result = train(tiny_recipe(*DIAGNOSTICS, *extra), tmp_path / name, resume=resume)
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
        return result

    run("straight", *COMPILED, "train.max_steps=6")
    run("resumed", *COMPILED, "train.max_steps=2")
    run("resumed", *COMPILED, "train.max_steps=6", resume="auto")
    run("eager", "train.max_steps=6")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    assert losses(tmp_path / "eager") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    compiled, eager = read_diagnostics(tmp_path / "straight"), read_diagnostics(tmp_path / "eager")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [2, 4, 6]
    for a, b in zip(compiled, eager):
        for metric in ("token_similarity", "attention"):
            for key, values in b[metric].items():
                assert [v is None for v in a[metric][key]] == [v is None for v in values], (metric, key)
                assert [v for v in a[metric][key] if v is not None] == pytest.approx(
                    [v for v in values if v is not None], rel=1e-5, abs=1e-7), (metric, key)


def test_a_model_that_fails_to_compile_trains_eager_with_one_line(tmp_path, tiny_recipe, fresh_accelerate, capsys,
                                                                  monkeypatch):
    from torch._dynamo.eval_frame import OptimizedModule

    def fail(self, *args, **kwargs):
        raise RuntimeError("backend 'inductor' failed: no C++ compiler\nlong trace ...")

    monkeypatch.setattr(OptimizedModule, "__call__", fail)
    result = train(tiny_recipe(*COMPILED, "train.max_steps=3"), tmp_path / "run")
    assert result.status == "max_steps" and result.state.step == 3
    lines = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert lines == ["warning: torch.compile failed (RuntimeError: backend 'inductor' failed: no C++ compiler); "
                     "training eager"]
    assert all(torch.isfinite(torch.tensor(losses(tmp_path / "run"))))
