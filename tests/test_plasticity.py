"""Plasticity against explicit per-pair loops (paper mode on the embedding output, in-situ via forward hooks).

The 2-process all-reduce check of this metric runs in tests/test_isi.py (one spawn for all part-B metrics).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.capture import capture
from diagnostics.plasticity import COMPONENTS, Plasticity, draw_pairs, plasticity
from diagnostics.streaming import run_probe
from tests import conftest

pytestmark = pytest.mark.usefixtures("single_thread")


tiny_vit = partial(conftest.tiny_vit, depth=4, num_classes=3)


def images(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def ratio(out_x, out_y, in_x, in_y) -> float:
    return float((out_x.double() - out_y.double()).norm() / (in_x.double() - in_y.double()).norm())


@torch.no_grad()
def brute_force_paper(model, first_images, second_images):
    """Mean over pairs, one pair at a time, of each component applied to the embedding output."""
    sums = {}
    for a, b in zip(first_images, second_images):
        x, y = (capture(model, image[None]).stages["pe"][0] for image in (a, b))
        for index, block in enumerate(model.blocks):
            hidden = block.mlp.fc2.in_features
            modules = {"LN1": block.norm1, "MHA": lambda t, blk=block: blk.attn(t[None])[0],
                       "LN2": block.norm2, "FC1": block.mlp.fc1,
                       "FC2": lambda t, blk=block, h=hidden: blk.mlp.fc2(F.pad(t, (0, h - t.shape[-1])))}
            for name, module in modules.items():
                key = (f"block_{index + 1}", name)
                sums[key] = sums.get(key, 0.0) + ratio(module(x), module(y), x, y)
    return {key: value / len(first_images) for key, value in sums.items()}


def brute_force_in_situ(model, first_images, second_images):
    """Each component's real (input, output) recorded by forward hooks during an ordinary forward."""
    def record(image):
        seen, hooks = {}, []
        for index, block in enumerate(model.blocks):
            for name, module in (("LN1", block.norm1), ("MHA", block.attn), ("LN2", block.norm2),
                                 ("FC1", block.mlp.fc1), ("FC2", block.mlp.fc2)):
                def hook(module, args, output, key=(f"block_{index + 1}", name)):
                    seen.setdefault(key, (args[0].detach(), output.detach()))
                hooks.append(module.register_forward_hook(hook))
        with torch.no_grad():
            model(image[None])
        for hook in hooks:
            hook.remove()
        return seen

    sums = {}
    for a, b in zip(first_images, second_images):
        seen_a, seen_b = record(a), record(b)
        for key in seen_a:
            (in_x, out_x), (in_y, out_y) = seen_a[key], seen_b[key]
            sums[key] = sums.get(key, 0.0) + ratio(out_x, out_y, in_x, in_y)
    return {key: value / len(first_images) for key, value in sums.items()}


@pytest.mark.parametrize("mode", ["paper", "in_situ"])
def test_plasticity_matches_per_pair_loops(mode):
    model, pool = tiny_vit(), images(10)
    got = plasticity(model, pool, mode=mode, num_pairs=12, seed=3, batch_size=5)
    first, second = draw_pairs(10, None, 12, seed=3)
    assert (first != second).all()
    brute_force = brute_force_paper if mode == "paper" else brute_force_in_situ
    reference = brute_force(model, pool[first], pool[second])
    for (stage, component), value in reference.items():
        assert got[stage][component] == pytest.approx(value, rel=1e-5), (stage, component)
    assert all(got[stage]["num_pairs"] == 12 for stage in got)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), mode=st.sampled_from(["paper", "in_situ"]))
def test_fc1_plasticity_is_bounded_by_the_largest_singular_value(seed, mode):
    model = tiny_vit(seed=seed)
    got = plasticity(model, images(6, seed=seed), mode=mode, num_pairs=8, seed=seed)
    for index, block in enumerate(model.blocks):
        sigma_max = float(torch.linalg.matrix_norm(block.mlp.fc1.weight.detach().double(), ord=2))
        assert 0 < got[f"block_{index + 1}"]["FC1"] <= sigma_max * (1 + 1e-6)


def test_grouped_mlp_blocks_share_fc_plasticity_in_paper_mode():
    model = tiny_vit({"kind": "grouped_mlp", "group_size": 2})
    got = plasticity(model, images(8), num_pairs=10)
    for first, second in (("block_1", "block_2"), ("block_3", "block_4")):
        for component in ("FC1", "FC2"):
            assert got[first][component] == got[second][component]
        assert got[first]["MHA"] != got[second]["MHA"]  # attention stays per block
    assert got["block_1"]["FC1"] != got["block_3"]["FC1"]


def test_pairs_are_deterministic_for_a_seed_and_two_sets_pair_across():
    model, pool, downstream = tiny_vit(), images(8), images(5, seed=7)
    first = plasticity(model, pool, downstream, num_pairs=9, seed=4)
    rebatched = plasticity(model, pool, downstream, num_pairs=9, seed=4, batch_size=2)
    assert {stage: pytest.approx(values, rel=1e-9) for stage, values in first.items()} == rebatched
    other_seed = plasticity(model, pool, downstream, num_pairs=9, seed=5)
    assert other_seed["block_1"]["MHA"] != first["block_1"]["MHA"]
    i, j = draw_pairs(8, 5, 9, seed=4)
    reference = brute_force_paper(model, pool[i], downstream[j])
    assert first["block_2"]["MHA"] == pytest.approx(reference[("block_2", "MHA")], rel=1e-5)


def test_streaming_metric_pairs_within_batches_and_skips_identical_images():
    model, pool = tiny_vit(), images(12)
    pool[5] = pool[4]  # duplicates: a pair of them has no input distance
    metric = Plasticity(num_pairs=10, seed=2)
    got = run_probe(model, list(pool.split(6)), [metric])["plasticity"]
    expected_pairs, firsts, seconds = 0, [], []
    for batch_index, batch in enumerate(pool.split(6)):
        budget = min(6, 10 - expected_pairs)
        offsets = np.random.default_rng([2, batch_index]).integers(1, 6, 6)[:budget]
        first = np.arange(budget)
        second = (first + offsets) % 6
        expected_pairs += budget
        keep = [not torch.equal(batch[a], batch[b]) for a, b in zip(first, second)]
        firsts.append(batch[first][keep])
        seconds.append(batch[second][keep])
    reference = brute_force_paper(model, torch.cat(firsts), torch.cat(seconds))
    assert got["block_1"]["num_pairs"] == len(torch.cat(firsts)) <= 10
    for (stage, component), value in reference.items():
        assert got[stage][component] == pytest.approx(value, rel=1e-5), (stage, component)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        Plasticity(mode="elsewhere")
    with pytest.raises(ValueError, match="at least 2 images"):
        draw_pairs(1, None, 3, seed=0)
    narrow = tiny_vit(mlp_ratio=0.5)
    with pytest.warns(UserWarning, match="FC2 is left out"):
        got = plasticity(narrow, images(4), num_pairs=3)
    assert "FC2" not in got["block_1"] and set(COMPONENTS) - {"FC2"} <= set(got["block_1"])


def test_p3s_indexed_pairing_pairs_image_k_of_one_source_with_image_k_of_the_other():
    from diagnostics.suite import load_probe
    from trainer.recipe_schema import DiagnosticsConfig

    generator = torch.Generator().manual_seed(3)
    pretraining = [(torch.randn(3, 16, 16, generator=generator), 0) for _ in range(7)]
    downstream = [(torch.randn(3, 16, 16, generator=generator), 1) for _ in range(5)]
    probe_set = [(torch.randn(3, 16, 16, generator=generator), i % 3) for i in range(6)]
    cfg = DiagnosticsConfig(metrics=["plasticity"], plasticity_pairs=4, probe_batch_size=3)
    shards = [load_probe(probe_set, cfg, rank, 2, pair_sources=(pretraining, downstream)) for rank in (0, 1)]
    for rank, shard in enumerate(shards):  # process r takes pairs r, r + 2: image k of each source
        ks = range(rank, 4, 2)
        torch.testing.assert_close(shard.pair_first, torch.stack([pretraining[k][0] for k in ks]))
        torch.testing.assert_close(shard.pair_second, torch.stack([downstream[k][0] for k in ks]))
    model = tiny_vit()
    alone = load_probe(probe_set, cfg, pair_sources=(pretraining, downstream))
    got = Plasticity(mode="paper")
    got.update_pairs(model, alone.pair_first, alone.pair_second)
    want = Plasticity(mode="paper")  # the same four pairs, given by hand
    want.update_pairs(model, torch.stack([p[0] for p in pretraining[:4]]), torch.stack([d[0] for d in downstream[:4]]))
    assert got.compute() == want.compute()
