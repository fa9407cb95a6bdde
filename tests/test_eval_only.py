"""--eval-only (PE-scale evaluation of a trained checkpoint) and model.checkpoint initialisation."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from models import save_model_file
from models.weights import WeightInitError, load_initial_weights
from tests import conftest
from trainer.loop import train
from trainer.recipe import load_recipe
from trainer.run import build_model
from trainer.run_dir import resolve_weights_file
from trainer.train import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo_digits.yaml"
# A 2-block digits model trained for 3 epochs: accurate enough that the position embedding matters.
SMALL = ["model.img_size=16", "model.depth=2", "model.embed_dim=32", "model.num_heads=2", "schedule.epochs=4", "schedule.warmup_epochs=1",
         "optim.lr=5e-3", "train.batch_size=32", "eval.every_epochs=1", "checkpoint.every_epochs=4",
         "train.ema_decay=null", "logging.progress_bar=false", "diagnostics.enabled=false",
         "diagnostics.probe_size=64", "diagnostics.probe_batch_size=32"]


pytestmark = pytest.mark.usefixtures("single_thread")


tiny_vit = partial(conftest.tiny_vit, seed=None, eval=False, embed_dim=32)


def eval_only(tmp_path, name, *overrides):
    main(["--recipe", str(DEMO), "--set", *SMALL, *overrides, "--eval-only", "--output", str(tmp_path / name)])
    run = tmp_path / name
    records = [json.loads(line) for line in (run / "diagnostics.jsonl").read_text().splitlines()]
    return json.loads((run / "summary.json").read_text()), records


def test_pe_scale_one_reproduces_training_eval_and_zero_removes_the_cliff(tmp_path, fresh_accelerate):
    trained = train(load_recipe(DEMO, SMALL), tmp_path / "trained")
    last_eval = trained.state.evals[-1]
    weights = f"model.checkpoint={tmp_path / 'trained'}"  # a run dir: its checkpoints/last/model.safetensors

    same, [record_1] = eval_only(tmp_path, "alpha1", weights, "eval.pe_scale=1.0")
    assert same["status"] == "finished" and same["mode"] == "evaluate" and same["pe_scale"] == 1.0
    assert same["raw"]["top1_final"] == last_eval["top1"] and same["raw"]["top5_final"] == last_eval["top5"]
    assert same["checkpoint"].endswith("checkpoints/step_00000168/model.safetensors") and same["checkpoint_step"] == 168

    scaled, [record_0] = eval_only(tmp_path, "alpha0", weights, "eval.pe_scale=0.0")
    assert scaled["raw"]["top1_final"] != last_eval["top1"]
    assert scaled["pe_dominance"] == 0.0 < same["pe_dominance"]
    for record in (record_0, record_1):  # the diagnostics.jsonl format, one offline record
        assert record["trigger"] == "offline" and record["model"] == "raw" and record["step"] == 168
        assert record["stages"] == ["embed", "pe", "block_1", "block_2", "norm"]
        assert len(record["token_similarity"]["centered"]) == len(record["stages"])
        centered = dict(zip(record["stages"], record["token_similarity"]["centered"]))
        assert record["phases"]["cliff_size"] == pytest.approx(centered["embed"] - centered[record["phases"]["cliff_end"]])
    # alpha = 0: the patch tokens at `pe` are the patch embeddings themselves
    assert record_0["token_similarity"]["centered"][1] == pytest.approx(record_0["token_similarity"]["centered"][0])
    assert record_1["token_similarity"]["centered"][1] != pytest.approx(record_1["token_similarity"]["centered"][0])
    assert scaled["cliff_size"] == record_0["phases"]["cliff_size"]


def test_eval_only_errors_are_one_line_user_errors(tmp_path, capsys, fresh_accelerate):
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", str(DEMO), "--set", *SMALL, "--eval-only", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "--eval-only needs model.checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", str(DEMO), "--set", *SMALL, "eval.pe_scale=0.5", "--output", str(tmp_path / "y")])
    assert exit_info.value.code == 2 and "add --eval-only" in capsys.readouterr().err
    save_model_file(tiny_vit(), tmp_path / "w.safetensors")
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint has 2 blocks, the recipe 3
        main(["--recipe", str(DEMO), "--set", *SMALL, "model.depth=3", f"model.checkpoint={tmp_path / 'w.safetensors'}",
              "--eval-only", "--output", str(tmp_path / "z")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"model.checkpoint = {tmp_path / 'w.safetensors'} does not match" in err
    assert "missing keys (blocks.2." in err


def test_strict_keys_grouped_mlp_ties_and_head_reinit(tmp_path):
    grouped = tiny_vit(depth=4, variant={"kind": "grouped_mlp"})
    save_model_file(grouped, tmp_path / "g.safetensors")
    fresh = tiny_vit(depth=4, variant={"kind": "grouped_mlp"})
    info = load_initial_weights(fresh, tmp_path / "g.safetensors")
    assert fresh.blocks[0].mlp is fresh.blocks[1].mlp and not info.reinitialised
    for (name, a), b in zip(grouped.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    plain = tiny_vit(depth=4)  # separate MLPs: blocks 1 and 3 are not in the file
    with pytest.raises(WeightInitError, match=r"missing keys \(blocks.1.mlp.fc1.bias"):
        load_initial_weights(plain, tmp_path / "g.safetensors")

    source = tiny_vit()
    save_model_file(source, tmp_path / "s.safetensors")
    new_head = tiny_vit(num_classes=5, img_size=24)  # new label set and a 6x6 patch grid
    head_before = new_head.head.weight.detach().clone()
    info = load_initial_weights(new_head, tmp_path / "s.safetensors")
    assert sorted(info.reinitialised) == ["head.bias", "head.weight"] and info.resampled == ["pos_embed"]
    assert torch.equal(new_head.head.weight, head_before)
    assert torch.equal(new_head.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert new_head.pos_embed.shape == (1, 37, 32)
    with pytest.raises(WeightInitError, match="shapes do not fit"):
        load_initial_weights(tiny_vit(embed_dim=64, num_heads=2), tmp_path / "s.safetensors")


def test_checkpoint_paths_resolve_and_training_starts_from_them(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000007"
    checkpoint.mkdir(parents=True)
    source = tiny_vit()
    save_model_file(source, checkpoint / "model.safetensors")
    (tmp_path / "run" / "checkpoints" / "last").symlink_to(checkpoint.name)
    for given in (tmp_path / "run", checkpoint, checkpoint / "model.safetensors"):
        assert resolve_weights_file(given).resolve() == (checkpoint / "model.safetensors").resolve()
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(WeightInitError, match="expected a .safetensors file"):
        resolve_weights_file(tmp_path / "w.pt")
    with pytest.raises(WeightInitError, match="file not found"):
        resolve_weights_file(tmp_path / "nowhere.safetensors")
    recipe = load_recipe(DEMO, ["model.img_size=16", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
                                f"model.checkpoint={tmp_path / 'run'}"])
    model = build_model(recipe)  # the trainer's model for finetuning
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
