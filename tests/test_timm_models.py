"""depthlab's registrations are first-class timm models: what timm's own tests/test_models.py asserts
of every model (listed, cfg, data config, forward/backward at the cfg's input size, forward_features/
forward_head/forward_intermediates, features_only, num_classes=0 and reset_classifier, pretrained
loading, torchscript), plus a `checkpoint_path=` round trip of `save_model_file` output. The cases
come from the installed timm and `models.REGISTERED_MODELS`: tiny/small/base at full size, as timm's
tests run them (large is too slow on CPU). What timm's tests cannot check on these names, and why,
is in the docstring of models/registry.py.
"""

import pytest
import timm
import torch
from safetensors.torch import load_file, load_model, save_file
from timm.data import resolve_data_config, resolve_model_data_config
from timm.models import get_pretrained_cfg
from timm.models._features import FeatureGetterNet

import models
from models import load_model_file, save_model_file
from models.registry import VARIANT_DEFAULTS

NAMES = [n for n in models.REGISTERED_MODELS if not n.startswith("vit_large")]
VARIANT_KWARGS = {"truncated": {"keep_depth": 6}}  # the only variant parameter without a default
FORWARD_BATCH, BACKWARD_BATCH = 1, 2  # timm's tests' batch sizes
# What a cfg must say to size, normalise and adapt inputs and heads (timm's data config and tests).
DATA_KEYS = ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
             "num_classes", "pool_size", "first_conv", "classifier")


def split(name: str) -> tuple[str, str]:
    kind = next(k for k in VARIANT_DEFAULTS if name.endswith(f"_{k}"))
    return name.removesuffix(f"_{kind}"), kind


def create(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **VARIANT_KWARGS.get(split(name)[1], {}), **kwargs)


def unique_mlps(model: torch.nn.Module) -> int:
    return len({id(block.mlp) for block in model.blocks})


def inputs(model: torch.nn.Module, batch: int = FORWARD_BATCH) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_shapes():
    """Per base ViT: the shapes its forward_features / pre-logits / intermediates produce."""
    cache = {}

    def shapes(base: str) -> dict:
        if base not in cache:
            model = timm.create_model(base).eval()
            with torch.no_grad():
                x = inputs(model)
                features = model.forward_features(x)
                cache[base] = {"features": features.shape,
                               "pre_logits": model.forward_head(features, pre_logits=True).shape,
                               "intermediate": model.forward_intermediates(x, intermediates_only=True)[0].shape}
        return cache[base]

    return shapes


@pytest.mark.parametrize("name", NAMES)
def test_listed_with_a_pretrained_cfg_derived_from_the_base(name):
    base, kind = split(name)
    assert name in timm.list_models() and name in timm.list_models(f"{base}_*")
    cfg, base_cfg = get_pretrained_cfg(name), get_pretrained_cfg(base)
    assert cfg is not None and cfg.architecture == name
    assert {k: getattr(cfg, k) for k in DATA_KEYS} == {k: getattr(base_cfg, k) for k in DATA_KEYS}
    # Only the truncated model's blocks are the base's, so only it can load the base's weights.
    assert bool(cfg.has_weights) == (kind == "truncated") == timm.models.is_model_pretrained(name)
    if kind == "truncated":
        assert cfg.hf_hub_id == base_cfg.hf_hub_id and cfg.tag == base_cfg.tag
        assert {t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")} == {
            t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")}

    with torch.device("meta"):  # weights are not needed here
        model = create(name)
    assert model.pretrained_cfg == cfg.to_dict() and model.default_cfg is model.pretrained_cfg
    expected = resolve_data_config(pretrained_cfg=base_cfg.to_dict())
    assert resolve_data_config(model=model) == resolve_model_data_config(model) == expected
    assert expected["input_size"] == cfg.input_size
    state_dict = model.state_dict()
    assert f"{cfg.classifier}.weight" in state_dict and f"{cfg.first_conv}.weight" in state_dict


@pytest.mark.parametrize("name", NAMES)
def test_backward_at_the_cfg_input_size(name):
    model = create(name, num_classes=42).train()
    outputs = model(inputs(model, BACKWARD_BATCH))
    assert outputs.shape == (BACKWARD_BATCH, 42) and not outputs.isnan().any()
    outputs.mean().backward()
    params = dict(model.named_parameters())  # a tied parameter once, as timm counts them
    assert [n for n, p in params.items() if p.grad is None] == []
    assert sum(p.grad.numel() for p in params.values()) == sum(p.numel() for p in params.values())


@pytest.mark.parametrize("name", NAMES)
def test_forward_features_head_and_intermediates_match_the_base(name, base_shapes):
    expected = base_shapes(split(name)[0])
    model = create(name).eval()
    x = inputs(model)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = model(x)
        final, intermediates = model.forward_intermediates(x)
        model.set_grad_checkpointing()
        checkpointed = model(x)
    assert features.shape == expected["features"] and features.shape[-1] == model.num_features
    assert pre_logits.shape == expected["pre_logits"] == (FORWARD_BATCH, model.head_hidden_size)
    assert logits.shape == (FORWARD_BATCH, model.pretrained_cfg["num_classes"]) and not logits.isnan().any()
    torch.testing.assert_close(logits, model.forward_head(features))
    torch.testing.assert_close(final, features)
    torch.testing.assert_close(checkpointed, logits, rtol=1e-4, atol=1e-5)
    assert len(intermediates) == len(model.blocks) == len(model.feature_info)
    assert all(o.shape == expected["intermediate"] for o in intermediates)


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_zero_and_classifier_reset(name):
    model = create(name, num_classes=0).eval()
    x = inputs(model)
    with torch.no_grad():
        assert model.num_classes == 0 and model(x).shape == (FORWARD_BATCH, model.num_features)
        model.reset_classifier(5)
        assert model.num_classes == 5 and model(x).shape == (FORWARD_BATCH, 5)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == (FORWARD_BATCH, model.head_hidden_size)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_wraps_the_variant_model(name):
    wrapped = create(name, seed=3, features_only=True).eval()
    model = create(name, seed=3).eval()
    assert isinstance(wrapped, FeatureGetterNet) and wrapped.pretrained_cfg["architecture"] == name
    assert unique_mlps(wrapped.model) == unique_mlps(model)  # GroupedMLP ties survive the wrapping
    x = inputs(model)
    with torch.no_grad():
        features = wrapped(x)
        expected = model.forward_intermediates(x, indices=3, intermediates_only=True)
    assert wrapped.feature_info.channels() == [model.embed_dim] * 3  # a ViT's default: the last 3 blocks
    assert len(features) == 3
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("_grouped_mlp")])
def test_features_only_out_indices_prune_blocks_but_keep_ties(name):
    first_two = create(name, features_only=True, out_indices=(0, 1)).eval()
    assert len(first_two.model.blocks) == 2 and first_two.model.blocks[1].mlp is first_two.model.blocks[0].mlp
    with torch.no_grad():
        assert [o.shape[1] for o in first_two(inputs(first_two))] == first_two.feature_info.channels()


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_path_round_trips_a_model_file(name, tmp_path):
    source = create(name, seed=1)
    path = tmp_path / "model.safetensors"
    save_model_file(source, path)
    # The file stores each shared tensor once, so strict loading has tied names to fill.
    assert (len(load_file(path)) < len(source.state_dict())) == name.endswith("_grouped_mlp")
    loaded = create(name, seed=2, checkpoint_path=str(path))
    assert unique_mlps(loaded) == unique_mlps(source)
    expected = source.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert [k for k, v in loaded.state_dict().items() if not torch.equal(v, expected[k])] == []


def test_tied_checkpoints_still_reject_missing_and_unexpected_keys(tmp_path):
    name = "vit_tiny_patch16_224_grouped_mlp"
    path = tmp_path / "model.safetensors"
    save_model_file(create(name), path)
    stored = load_file(path)
    shared = next(k for k in stored if k.startswith("blocks.0.mlp."))
    for broken, error in [({k: v for k, v in stored.items() if k != shared}, "Missing key"),
                          ({**stored, "extra.weight": torch.zeros(1)}, "Unexpected key")]:
        save_file(broken, tmp_path / "broken.safetensors")
        with pytest.raises(RuntimeError, match=error):
            timm.create_model(name, checkpoint_path=str(tmp_path / "broken.safetensors"))
    # A non-strict load reports the tied names it was not given, as torch does; safetensors'
    # load_model (the trainer's resume) relies on that to recognise them as ties.
    model = create(name, seed=5)
    assert sorted(model.load_state_dict(stored, strict=False).missing_keys) == sorted(
        set(model.state_dict()) - set(stored))
    assert load_model(create(name, seed=6), str(path), strict=True) == (set(), [])
    assert unique_mlps(load_model_file(path)) == 6


def test_truncated_loads_the_base_weights_before_truncating(tmp_path):
    """timm's test_model_load_pretrained (in_chans=1, num_classes=5), from a file instead of the hub."""
    base = timm.create_model("vit_tiny_patch16_224")
    path = tmp_path / "base.pth"
    torch.save(base.state_dict(), path)
    truncated = timm.create_model("vit_tiny_patch16_224_truncated", pretrained=True, keep_depth=6, in_chans=1,
                                  num_classes=5, pretrained_cfg_overlay=dict(file=str(path)))
    assert len(truncated.blocks) == 6 and truncated.num_classes == 5 and truncated.pretrained_cfg["file"] == str(path)
    expected = base.state_dict()
    adapted = ("head.weight", "head.bias", "patch_embed.proj.weight")
    assert [k for k, v in truncated.state_dict().items() if k not in adapted and not torch.equal(v, expected[k])] == []
    torch.testing.assert_close(truncated.patch_embed.proj.weight, expected["patch_embed.proj.weight"].sum(1, keepdim=True))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_of_a_shared_mlp_matches_eager():
    """timm's test_model_forward_torchscript; the other variants script as their base does (slow here)."""
    name = "vit_tiny_patch16_224_grouped_mlp"
    with timm.layers.set_layer_config(scriptable=True):
        model = create(name).eval()
    scripted = torch.jit.script(model)
    x = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
