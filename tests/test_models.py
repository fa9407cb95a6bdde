"""The model family: exact P2 parameter counts, GroupedMLP ties, ShallowMLP slicing, ThinMLP, depth."""

import math

import pytest
import timm
import torch
from timm.layers import GluMlp
from torch import nn

import models
from models import (
    VariantError,
    count_parameters,
    create_vit,
    load_model_file,
    profile_model,
    rebuild_from_spec,
    save_model_file,
    spec_of,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)

# science.md §5: exact counts with timm, 1000 classes, 224 px.
P2_COUNTS = {
    "vit_small_patch16_224": (22_050_664, 14_961_256, 14_963_560),
    "vit_base_patch16_224": (86_567_656, 58_233_064, 58_237_672),
    "vit_large_patch16_224": (304_326_632, 203_601_896, 203_614_184),
}


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def tiny(variant: dict | None = None, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return create_vit("vit_tiny_patch16_224", variant, **{**TINY, **overrides})


@pytest.mark.parametrize("base", sorted(P2_COUNTS))
def test_exact_parameter_counts_of_p2_variants(base):
    full, grouped, shallow = P2_COUNTS[base]
    assert count_parameters(meta_model(base)) == full
    assert count_parameters(meta_model(f"{base}_grouped_mlp")) == grouped
    assert count_parameters(meta_model(f"{base}_shallow_mlp")) == shallow
    # ThinMLP with ratio 2 has ShallowMLP's shapes exactly.
    assert count_parameters(meta_model(f"{base}_thin_mlp")) == shallow


def test_p2_architecture_table_for_vit_b():
    base = profile_model(meta_model("vit_base_patch16_224"))
    grouped = profile_model(meta_model("vit_base_patch16_224_grouped_mlp"))
    shallow = profile_model(meta_model("vit_base_patch16_224_shallow_mlp"))
    assert (round(base.params / 1e6, 1), round(base.mlp_params / 1e6, 1), base.unique_mlps) == (86.6, 56.7, 12)
    assert (round(grouped.params / 1e6, 1), round(grouped.mlp_params / 1e6, 1), grouped.unique_mlps) == (58.2, 28.3, 6)
    assert (round(shallow.params / 1e6, 1), round(shallow.mlp_params / 1e6, 1), shallow.unique_mlps) == (58.2, 28.3, 12)
    # Brute-force MACs from the architecture: patch-embed conv, per block qkv/proj/fc1/fc2, head.
    N, T, D, H, C = 196, 197, 768, 3072, 1000
    patch = N * D * 3 * 16 * 16
    block_linear = T * (D * 3 * D + D * D + 2 * D * H)
    attention = T * T * D * 2  # QK^T and AV over all heads
    assert base.macs_linear == patch + 12 * block_linear + D * C
    assert base.macs_total == base.macs_linear + 12 * attention
    assert grouped.macs_linear == base.macs_linear  # sharing saves parameters, not compute
    assert shallow.macs_linear == patch + 12 * T * (D * 3 * D + D * D + D * H) + D * C
    assert round(base.macs_total / 1e9, 1) == 17.6 and round(shallow.macs_linear / 1e9, 1) == 11.3
    assert round(shallow.macs_total / 1e9, 2) == 11.99
    # P2 prints 16.9 G: the exact count is 16.848 G (16.85 rounded once more).
    assert round(base.macs_linear / 1e9, 2) == 16.85


def test_vit_l_grouped_has_twelve_groups():
    model = meta_model("vit_large_patch16_224_grouped_mlp")
    assert profile_model(model).unique_mlps == 12
    assert all(model.blocks[2 * i + 1].mlp is model.blocks[2 * i].mlp for i in range(12))


def test_grouped_mlp_ties_modules_and_keeps_the_rest_per_block():
    model = tiny({"kind": "grouped_mlp", "group_size": 2})
    b = model.blocks
    assert b[1].mlp is b[0].mlp and b[3].mlp is b[2].mlp and b[2].mlp is not b[0].mlp
    for i, j in [(0, 1), (2, 3)]:
        assert b[i].attn is not b[j].attn and b[i].norm1 is not b[j].norm1 and b[i].norm2 is not b[j].norm2
    assert len({id(blk.mlp) for blk in b}) == 2


def test_grouped_mlp_group_size_must_divide_depth():
    with pytest.raises(VariantError, match="group_size = 3 does not divide the model depth 4"):
        tiny({"kind": "grouped_mlp", "group_size": 3})
    model = tiny({"kind": "grouped_mlp", "group_size": 4})
    assert all(blk.mlp is model.blocks[0].mlp for blk in model.blocks)


@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_grouped_mlp_init_scale(scale):
    base = tiny(seed=3)
    grouped = tiny({"kind": "grouped_mlp", "group_size": 2, "group_init_scale": scale}, seed=3)
    expected = 1 / math.sqrt(2) if scale is None else scale
    for i in (0, 2):
        ref, shared = base.blocks[i].mlp, grouped.blocks[i].mlp
        torch.testing.assert_close(shared.fc1.weight, ref.fc1.weight * expected)
        torch.testing.assert_close(shared.fc1.bias, ref.fc1.bias * expected)
        torch.testing.assert_close(shared.fc2.weight, ref.fc2.weight * expected)
        torch.testing.assert_close(shared.fc2.bias, ref.fc2.bias)  # fc2.bias is not scaled
    # Everything outside the MLPs is the untouched timm init.
    torch.testing.assert_close(grouped.blocks[1].attn.qkv.weight, base.blocks[1].attn.qkv.weight)


def test_shared_mlp_gradient_is_the_sum_over_its_blocks():
    grouped = tiny({"kind": "grouped_mlp"}, seed=1)
    untied = tiny(seed=1)
    untied.load_state_dict(grouped.state_dict())  # both depths of a pair now hold the shared values
    x = torch.randn(4, 3, 32, 32)
    grouped(x).square().sum().backward()
    untied(x).square().sum().backward()
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        shared = grouped.blocks[0].mlp.get_parameter(name).grad
        summed = untied.blocks[0].mlp.get_parameter(name).grad + untied.blocks[1].mlp.get_parameter(name).grad
        torch.testing.assert_close(shared, summed, rtol=1e-4, atol=1e-6)


def test_grouped_tie_and_values_survive_a_save_load_round_trip(tmp_path):
    model = tiny({"kind": "grouped_mlp"}, seed=2)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(1.0)  # a trained value, not the init
    path = tmp_path / "model.safetensors"
    save_model_file(model, path)
    loaded = load_model_file(path)
    assert loaded.blocks[1].mlp is loaded.blocks[0].mlp and loaded.blocks[3].mlp is loaded.blocks[2].mlp
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    assert spec_of(loaded) == spec_of(model)


def test_state_dict_round_trip_through_weights_only_torch_load(tmp_path):
    model = tiny({"kind": "grouped_mlp"}, seed=4)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    rebuilt = rebuild_from_spec(spec_of(model))
    rebuilt.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert rebuilt.blocks[1].mlp is rebuilt.blocks[0].mlp
    torch.testing.assert_close(rebuilt.blocks[1].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)


def test_parameter_counts_are_over_unique_parameters():
    model = tiny({"kind": "grouped_mlp"})
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    mlp = model.blocks[0].mlp
    assert count_parameters(model) == with_duplicates - 2 * count_parameters(mlp)


@pytest.mark.parametrize("init", ["slice", "reinit"])
def test_shallow_mlp_keeps_the_first_hidden_units(init):
    base = tiny(seed=5)
    shallow = tiny({"kind": "shallow_mlp", "shallow_ratio": 0.5, "shallow_init": init}, seed=5)
    hidden = base.blocks[0].mlp.fc1.out_features
    keep = hidden // 2
    for ref_block, block in zip(base.blocks, shallow.blocks):
        ref, mlp = ref_block.mlp, block.mlp
        assert mlp.fc1.weight.shape == (keep, 32) and mlp.fc2.weight.shape == (32, keep)
        if init == "slice":
            torch.testing.assert_close(mlp.fc1.weight, ref.fc1.weight[:keep])
            torch.testing.assert_close(mlp.fc1.bias, ref.fc1.bias[:keep])
            torch.testing.assert_close(mlp.fc2.weight, ref.fc2.weight[:, :keep])
            torch.testing.assert_close(mlp.fc2.bias, ref.fc2.bias)
        else:
            assert not torch.equal(mlp.fc1.weight, ref.fc1.weight[:keep])
            assert mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.2)


def test_shallow_mlp_floor_of_ratio():
    model = tiny({"kind": "shallow_mlp", "shallow_ratio": 0.3})
    assert model.blocks[0].mlp.fc1.out_features == math.floor(0.3 * 128)


def test_shallow_mlp_refuses_glu_and_hidden_norm():
    with pytest.raises(VariantError, match="GluMlp"):
        tiny({"kind": "shallow_mlp"}, mlp_layer=GluMlp)
    with pytest.raises(VariantError, match="hidden-size norm"):
        tiny({"kind": "shallow_mlp"}, scale_mlp_norm=True)


def test_thin_mlp_uses_mlp_ratio_at_creation():
    model = tiny({"kind": "thin_mlp", "thin_mlp_ratio": 1.5})
    assert model.blocks[0].mlp.fc1.out_features == 48
    assert count_parameters(tiny({"kind": "thin_mlp", "thin_mlp_ratio": 2.0})) == count_parameters(
        tiny({"kind": "shallow_mlp"}))


def test_depth_from_scratch_and_truncation_of_an_existing_model():
    scratch = create_vit("vit_tiny_patch16_224", **{**TINY, "depth": 6})
    assert len(scratch.blocks) == 6
    torch.manual_seed(7)
    full = create_vit("vit_tiny_patch16_224", **{**TINY, "depth": 6})
    torch.manual_seed(7)
    truncated = timm.create_model("vit_tiny_patch16_224_truncated", keep_depth=4, **{**TINY, "depth": 6})
    assert len(truncated.blocks) == 4 and len(truncated.feature_info) == 4
    full_sd, trunc_sd = full.state_dict(), truncated.state_dict()
    for key, value in trunc_sd.items():
        torch.testing.assert_close(value, full_sd[key], msg=key)  # first blocks, norm and head kept
    assert not any(k.startswith(("blocks.4.", "blocks.5.")) for k in trunc_sd)
    with pytest.raises(VariantError, match="keep_depth = 7"):
        create_vit("vit_tiny_patch16_224", {"kind": "truncated", "keep_depth": 7}, **TINY)


@pytest.mark.parametrize("name", models.REGISTERED_MODELS)
def test_every_registered_variant_builds_through_timm(name):
    kwargs = {"keep_depth": 6} if name.endswith("_truncated") else {}
    model = meta_model(name, **kwargs)
    assert spec_of(model)["variant"]["kind"] in name
    assert name in timm.list_models("*_patch16_224_*")


def test_variant_kwargs_are_passed_through_timm():
    model = meta_model("vit_small_patch16_224_grouped_mlp", group_size=4, num_classes=10)
    assert profile_model(model).unique_mlps == 3 and model.head.out_features == 10


def test_grouped_mlp_refuses_pretrained_weights():
    with pytest.raises(VariantError, match="pretrained"):
        create_vit("vit_tiny_patch16_224", {"kind": "grouped_mlp"}, pretrained=True, **TINY)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(VariantError, match="not a timm model"):
        create_vit("vit_bsae_patch16_224")


def test_pretrained_weights_missing_from_the_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VariantError, match="not in the local Hugging Face cache"):
        create_vit("vit_tiny_patch16_224", pretrained=True, **TINY)
