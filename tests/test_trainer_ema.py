"""EMA over de-duplicated parameters: a GroupedMLP's shared tensor is averaged once per step."""

import copy

import torch
from timm.utils import ModelEmaV3

from models import create_vit, load_model_file
from trainer.optim import ParameterEma

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def grouped_vit():
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", {"kind": "grouped_mlp", "group_size": 2}, **TINY)


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_shared_tensor_updated_once_matches_brute_force():
    model, decay = grouped_vit(), 0.9
    ema = ParameterEma(model, decay)
    start = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    expected = dict(start)
    for _ in range(3):
        perturb(model)
        ema.update(model)
        # brute force: every tensor, listed once by its first name, averaged once per step
        for n, p in model.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach()
    got = dict(ema.module.named_parameters())
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-6)
    assert ema.module.blocks[1].mlp is ema.module.blocks[0].mlp  # the tie survives the copy


def test_timm_state_dict_ema_would_update_the_shared_tensor_twice():
    """Documents the pitfall ParameterEma avoids (science.md §5)."""
    model, decay = grouped_vit(), 0.9
    ours, timms = ParameterEma(model, decay), ModelEmaV3(model, decay=decay)
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    perturb(model)
    ours.update(model)
    timms.update(model)
    now = model.blocks[0].mlp.fc1.weight.detach()
    once = decay * before + (1 - decay) * now
    twice = decay * once + (1 - decay) * now
    torch.testing.assert_close(ours.module.blocks[0].mlp.fc1.weight, once)
    torch.testing.assert_close(timms.module.blocks[0].mlp.fc1.weight, twice)


def test_ema_save_load_round_trip_keeps_tie(tmp_path):
    model = grouped_vit()
    ema = ParameterEma(model, 0.99)
    perturb(model)
    ema.update(model)
    ema.save(tmp_path / "ema.safetensors")
    loaded = load_model_file(tmp_path / "ema.safetensors")
    assert loaded.blocks[1].mlp is loaded.blocks[0].mlp
    other = ParameterEma(copy.deepcopy(model), 0.99)
    other.load(tmp_path / "ema.safetensors")
    for (n, a), b in zip(ema.module.state_dict().items(), other.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_ema_of_half_precision_weights_averages_in_float32():
    # DeepSpeed bf16 keeps bf16 module weights; at decay 0.9998 a bf16 average would never move.
    model = torch.nn.Linear(4, 4).bfloat16()
    ema = ParameterEma(model, decay=0.9998)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert ema.module.weight.dtype == torch.float32
    expected = start + 2e-4 * (model.weight.float() - start)  # lerp, by hand
    torch.testing.assert_close(ema.module.weight, expected, rtol=0, atol=1e-7)
    assert (ema.module.weight != start).all()


def test_the_ema_averages_float32_masters_when_the_module_holds_rounded_copies():
    model = create_vit("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                       num_classes=3)
    masters = {id(p): p.detach().clone() + 1e-3 for p in model.parameters()}  # what the optimizer holds
    half = copy.deepcopy(model).to(torch.bfloat16)
    for p, q in zip(model.parameters(), half.parameters()):
        masters[id(q)] = masters.pop(id(p))
    ema = ParameterEma(half, 0.5)
    start = {n: t.clone() for n, t in ema.module.state_dict().items()}
    ema.update(half, master=lambda p: masters[id(p)])
    for (name, p), e in zip(half.named_parameters(), ema.module.parameters()):
        torch.testing.assert_close(e, 0.5 * start[name] + 0.5 * masters[id(p)], rtol=0, atol=1e-7, msg=name)
