"""FSDP, driven directly on CPU over gloo (accelerate builds FSDP only for GPUs): the diagnostics read a
sharded model through an unsharded replica, and per-component gradient norms from the gradient shards,
giving the values of the unsharded model."""

import json
import os
import subprocess
import sys

from ablations.launch import free_port
from tests.conftest import REPO

# 2 ranks: the same tiny ViT (seed 0), FSDP-wrapped one unit per Block with use_orig_params (as
# trainer/accelerator.py configures accelerate); the same batch on both ranks, so FSDP's averaged
# gradients equal one process's. Rank 0 writes what it measured, sharded and unsharded.
SCRIPT = r"""
import copy, json, os, sys
import torch, torch.distributed as dist
from timm.models.vision_transformer import Block
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from diagnostics import load_probe, run_diagnostics
from diagnostics.grad_norms import component_grad_norms
from models import create_vit, rebuild_from_spec, spec_of
from trainer.recipe_schema import DiagnosticsConfig
from trainer.training_diagnostics import gather_full_weights

dist.init_process_group("gloo")
torch.manual_seed(0)
model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                   num_classes=4)
reference = copy.deepcopy(model)
fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu"))
images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
labels = torch.arange(8) % 4
for net in (fsdp, reference):
    torch.nn.functional.cross_entropy(net(images), labels).backward()
sharded, full = component_grad_norms(fsdp, sharded=True), component_grad_norms(reference)

cfg = DiagnosticsConfig(metrics=["token_similarity", "attention", "neural_collapse"], probe_size=24,
                        probe_batch_size=8)
probe_images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(2))
dataset = list(zip(probe_images, [i % 4 for i in range(24)]))
replica = rebuild_from_spec(spec_of(reference)).eval()
gather_full_weights(fsdp, replica, "fsdp")
probe = load_probe(dataset, cfg, dist.get_rank(), dist.get_world_size())
through_replica = run_diagnostics(replica, probe, cfg, 4)["token_similarity"]
dist.destroy_process_group()
if os.environ["RANK"] == "0":
    alone = run_diagnostics(reference, load_probe(dataset, cfg), cfg, 4)["token_similarity"]
    same = all(torch.equal(a, b) for a, b in zip(replica.state_dict().values(), reference.state_dict().values()))
    json.dump({"sharded": sharded, "full": full, "replica": through_replica, "alone": alone, "same_weights": same},
              open(sys.argv[1], "w"), default=float)
"""


def test_fsdp_grad_norms_from_shards_and_diagnostics_through_a_gathered_replica(tmp_path):
    script, out = tmp_path / "fsdp_cpu.py", tmp_path / "out.json"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port()),
                           "--nproc_per_node", "2", str(script),
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_weights"]  # the replica holds every weight, not a shard
    for component in ("LN1", "MHA", "LN2", "FC1", "FC2"):
        for stage, value in result["full"][component].items():
            assert value > 0 and abs(result["sharded"][component][stage] - value) <= 1e-5 * value, (component, stage)
    for stage, values in result["alone"].items():
        for key, value in values.items():
            got = result["replica"][stage][key]
            assert abs(got - value) <= 1e-6 + 1e-5 * abs(value), (stage, key, got, value)
