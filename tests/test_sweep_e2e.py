"""Sweeps for real: the shipped sweep files, a 3-point demo sweep end to end (resume, skip, report),
the Slurm path through submitit's local executor, and a preempted Slurm job requeued into a resume."""

import csv
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from ablations import sweep
from ablations.launch import SlurmTrainJob, still_queued, train_command
from ablations.sweep_spec import expand, load_sweep
from diagnostics.records import final_record
from models import create_vit
from tools import report
from trainer.loop import train
from trainer.optim import apply_trainable_patterns, build_optimizer
from trainer.recipe import flatten_recipe, load_recipe
from trainer.run_dir import read_summary

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_digits.yaml"
# 1,347 training digits at batch 256: 5 updates per epoch, 10 per run.
TINY = ["model.img_size=16", "model.depth=1", "model.embed_dim=16", "model.num_heads=2", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
        "train.batch_size=256", "eval.every_epochs=1", "checkpoint.every_epochs=1", "logging.progress_bar=false",
        "diagnostics.metrics=[token_similarity, attention]", "diagnostics.probe_size=64",
        "diagnostics.tensorboard_images=never"]


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """Tiny models on shared CPU cores: one intra-op thread (here and in launched trainers) avoids
    OpenMP spinning, which slows these runs down several times."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump({"base": str(DEMO), "output": str(path.parent / "out"), "set": TINY, **fields}, sort_keys=False))
    return path


# --- the shipped sweep files -----------------------------------------------------------------------

SHIPPED = {"mlp_reduction": 12, "depth": 5, "scale": 3, "pe_scale": 7, "finetune_components": 72,
           "demo_mlp_reduction": 12, "demo_depth": 4, "demo_scale": 3, "demo_pe_scale": 7,
           "demo_finetune_components": 12}


@pytest.mark.parametrize("name, count", SHIPPED.items())
def test_shipped_sweep_files_expand_and_state_their_commands(name, count):
    path = ROOT / "ablations" / f"{name}.yaml"
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"python ablations/sweep.py ablations/{name}.yaml" in header and "python tools/report.py" in header
    points = expand(load_sweep(path), ["model.checkpoint=weights.safetensors"])
    assert len(points) == count and len({p.name for p in points}) == count
    if name.endswith("pe_scale"):
        assert [p.recipe.eval.pe_scale for p in points] == [0, 0.25, 0.5, 0.75, 1, 1.5, 2]


def test_finetune_sweep_follows_p3_protocol_and_selects_exact_modules():
    points = expand(load_sweep(ROOT / "ablations" / "finetune_components.yaml"))
    r = points[0].recipe
    assert (r.optim.name, r.optim.momentum, r.optim.weight_decay, r.optim.clip_grad_norm) == ("sgd", 0.9, 0.0, 1.0)
    assert (r.schedule.kind, r.schedule.warmup_steps, r.train.ema_decay, r.augment.mixup, r.augment.auto_augment) \
        == ("cosine", 2000, None, 0.0, None)
    assert r.train.batch_size * 8 == r.optim.lr_reference_batch == 512  # 8 GPUs x 64, P3's batch
    assert sorted({p.recipe.optim.lr for p in points}) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert sorted({p.recipe.train.seed for p in points}) == [0, 1, 2]
    def tiny_vit_b():  # timm's ViT-B module paths at a toy size
        return create_vit("vit_base_patch16_224", img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2,
                          num_classes=100)

    names = [n for n, _ in tiny_vit_b().named_parameters()]
    per_block = {"LN1": "norm1", "MHA": "attn", "LN2": "norm2", "FC1": "mlp.fc1", "FC2": "mlp.fc2"}
    for point in points:
        component, model = point.labels["optim.trainable"], tiny_vit_b()
        trainable = apply_trainable_patterns(model, point.recipe.optim.trainable)
        if component == "full":
            expected = set(names)
        else:  # brute force: the component in every block, the final norm and the head; nothing else
            expected = {n for n in names if n.startswith(("norm.", "head.")) or
                        any(n.startswith(f"blocks.{i}.{per_block[component]}.") for i in range(3))}
        assert set(trainable) == expected, component
        optimizer = build_optimizer(model, point.recipe.optim, 0.01)
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(expected)
        assert all(p.requires_grad for g in optimizer.param_groups for p in g["params"])


def test_launched_points_run_the_recipe_the_sweep_expanded(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(f"base: {DEMO}\nmodel:\n  depth: 3\n")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "output": str(tmp_path / "out"), "grid": {"optim.lr": [0.01]}}))
    spec = load_sweep(path)
    [point] = expand(spec)
    [job] = sweep.launch_jobs(spec, [sweep.PointState(point, tmp_path / "out" / "runs" / point.name, "new")])
    base.write_text(f"base: {DEMO}\nmodel:\n  depth: 5\n")  # edited while the sweep runs
    recipe = Path(job.command[job.command.index("--recipe") + 1])
    assert recipe == (tmp_path / "out" / "recipes" / "lr0.01.yaml").absolute() and "--set" not in job.command
    assert flatten_recipe(load_recipe(recipe)) == flatten_recipe(point.recipe)
    assert load_recipe(recipe).model.depth == 3


# --- a real demo sweep -----------------------------------------------------------------------------

def test_demo_sweep_runs_resumes_skips_and_reports(tmp_path, capsys, fresh_accelerate):
    path = write_sweep(tmp_path / "s.yaml", name="demo3", seeds=[0, 1, 2])
    out = tmp_path / "out"
    points = {p.name: p for p in expand(load_sweep(path))}
    # seed1 was interrupted after its first epoch (5 of 10 updates); the sweep must resume it.
    interrupted = train(load_recipe(DEMO, [*points["seed1"].overrides, "train.max_steps=5"]), out / "runs" / "seed1")
    assert interrupted.status == "max_steps"
    capsys.readouterr()

    assert sweep.main([str(path), "--dry-run"]) == 0
    assert "seed1                            [resume]  train.seed=1" in capsys.readouterr().out
    start = time.perf_counter()
    assert sweep.main([str(path), "--max-parallel", "2"]) == 0
    wall = time.perf_counter() - start
    printed = capsys.readouterr().out
    progress = [line for line in printed.splitlines() if line.startswith("[sweep demo3]")]
    assert progress[0].startswith("[sweep demo3] 0/3 done, 0 running, 0 failed, 3 pending")
    assert progress[-1].startswith("[sweep demo3] 3/3 done, 0 running, 0 failed, 0 pending")
    assert max(int(line.split(", ")[1].split()[0]) for line in progress) == 2  # --max-parallel 2
    summaries = {name: read_summary(out / "runs" / name) for name in points}
    assert all(s["status"] == "finished" and s["step"] == 10 for s in summaries.values())
    resumed_log = (out / "logs" / "seed1.log").read_text()
    assert "epoch 2/2" in resumed_log and "epoch 1/2" not in resumed_log  # continued, not restarted
    evals = [json.loads(line) for line in (out / "runs" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [5, 10]
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["done"] * 3

    logs = {p: (out / "logs" / f"{p}.log").read_text() for p in points}
    assert sweep.main([str(path)]) == 0  # everything finished: nothing is launched again
    assert "[sweep demo3] 3/3 done, 0 running, 0 failed, 0 pending" in capsys.readouterr().out
    assert logs == {p: (out / "logs" / f"{p}.log").read_text() for p in points}

    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "report" / "report.csv")))
    assert len(rows) == 1 and rows[0]["variant"] == "demo3" and rows[0]["runs"] == "3"
    for key, section in (("top1_final", "raw"), ("ema_top1_final", "ema"), ("top1_best", "raw")):
        values = [s[section][key.removeprefix("ema_")] for s in summaries.values()]
        assert float(rows[0][key]) == pytest.approx(statistics.fmean(values)), key
        assert float(rows[0][f"{key}_std"]) == pytest.approx(statistics.stdev(values)), key
    top1 = [s["raw"]["top1_final"] for s in summaries.values()]
    assert f"| demo3 | 3 | {summaries['seed0']['params'] / 1e3:.2f}K |" in printed
    assert f"{statistics.fmean(top1):.2f} ± {statistics.stdev(top1):.2f} (n=3)" in printed
    # diagnostics columns from the callback's real records: the final record of each run
    finals = [final_record(out / "runs" / name) for name in points]
    assert all(r["step"] == 10 and r["stages"][-2] == "block_1" for r in finals)
    centrality = [r["attention"]["cls_centrality"][-2] for r in finals]  # block_1, the last block
    assert float(rows[0]["cls_centrality_last"]) == pytest.approx(statistics.fmean(centrality))
    assert rows[0]["cliff_end"] == "/".join(dict.fromkeys(r["phases"]["cliff_end"] for r in finals))
    assert rows[0]["isi_last_n"] == "0"  # ISI not enabled: shown as "–"
    assert (tmp_path / "report" / "plots" / "accuracy_curves.png").is_file()
    print(f"3-point demo sweep wall time: {wall:.1f} s")


def test_failed_point_is_summarised_with_its_log(tmp_path, capsys, monkeypatch):
    # The launched command is stubbed: what is tested is the runner's bookkeeping of a failure.
    failing = [sys.executable, "-c", "print('error: data.root: /data/imagenet/train not found'); raise SystemExit(2)"]
    monkeypatch.setattr(sweep, "train_command", lambda *args, **kwargs: failing)
    path = write_sweep(tmp_path / "s.yaml", name="broken", grid={"model.depth": [1, 2]})
    assert sweep.main([str(path), "--max-parallel", "2"]) == 1
    captured = capsys.readouterr()
    log = tmp_path / "out" / "logs" / "depth2.log"
    assert "[sweep broken] 0/2 done, 0 running, 2 failed, 0 pending" in captured.out
    assert "2 of 2 launched runs did not finish" in captured.err and f"  depth2: failed, log {log}" in captured.err
    assert "error: data.root: /data/imagenet/train not found" in log.read_text()
    assert [p["status"] for p in json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]] == ["failed"] * 2


# --- Slurm through submitit ------------------------------------------------------------------------

def test_slurm_launcher_through_submitits_local_executor(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", name="slurm1", seeds=[0],
                       launcher={"slurm": {"timeout_min": 10, "slurm_partition": "ignored-locally"}})
    assert sweep.main([str(path), "--launcher", "slurm", "--submitit-cluster", "local"]) == 0
    out = tmp_path / "out"
    assert read_summary(out / "runs" / "seed0")["status"] == "finished"
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert list(jobs) == ["seed0"] and jobs["seed0"]["cluster"] == "local"
    assert "submitted seed0: job" in capsys.readouterr().out
    assert still_queued(out / "slurm") == {}  # local jobs ended with the command that ran them


def test_still_queued_counts_live_and_unknown_slurm_jobs(tmp_path):
    (tmp_path / "jobs.json").write_text(json.dumps({p: {"job_id": str(i), "cluster": "slurm"} for i, p in
                                                    enumerate(["a", "b", "c", "d"])}))
    states = {"0": "RUNNING", "1": "COMPLETED", "2": "UNKNOWN", "3": "PREEMPTED"}
    assert still_queued(tmp_path, lambda folder, job_id: states[job_id]) == {"a": "job 0 RUNNING",
                                                                            "c": "job 2 UNKNOWN"}


def wait_for(condition, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_preempted_slurm_job_saves_then_requeues_into_a_resumed_run(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["data.source=synthetic", "data.synthetic_train_size=64", "data.synthetic_eval_size=16",
                 "model.img_size=16", "model.depth=1", "model.embed_dim=16", "model.num_heads=2",
                 "train.batch_size=8", "schedule.epochs=40", "schedule.warmup_epochs=1", "eval.every_epochs=40",
                 "checkpoint.every_steps=20", "checkpoint.every_epochs=null", "logging.every_steps=100",
                 "logging.progress_bar=false", "diagnostics.enabled=false"]
    command = train_command(DEMO, overrides, run_dir)
    job = SlurmTrainJob(command, tmp_path / "job.log")
    results = []
    thread = threading.Thread(target=lambda: results.append(job()))
    thread.start()
    wait_for(lambda: (run_dir / "checkpoints" / "last").exists())
    requeued = job.checkpoint()  # what submitit calls on preemption / time-out
    thread.join(timeout=120)
    assert results == [0]
    stopped = read_summary(run_dir)
    assert stopped["status"] == "preempted" and 0 < stopped["step"] < 320
    assert isinstance(requeued.function, SlurmTrainJob) and requeued.function.command == command
    assert requeued.function() == 0  # the requeued job: --resume auto continues the run
    finished = read_summary(run_dir)
    assert finished["status"] == "finished" and finished["step"] == 320
    assert finished["images_seen"] == 320 * 8  # no update done twice
