"""timm registrations of the variants, e.g. `timm.create_model("vit_base_patch16_224_grouped_mlp")`.

For every base ViT below, four names are registered; each takes the variant's parameters as
kwargs (defaults are P2's) and passes everything else to the base model:

    <base>_grouped_mlp(group_size=2, group_init_scale=None)   # None = 1/sqrt(group_size)
    <base>_shallow_mlp(shallow_ratio=0.5, shallow_init="slice")
    <base>_thin_mlp(thin_mlp_ratio=2.0)
    <base>_truncated(keep_depth=...)        # first d blocks of the depth-D base (pretrained=True works)

A depth-d model from scratch needs no registration: `timm.create_model(base, depth=d)`.
"""

from __future__ import annotations

import sys

from timm.models import register_model

from models.factory import create_vit

BASE_MODELS = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
)

VARIANT_DEFAULTS = {
    "grouped_mlp": {"group_size": 2, "group_init_scale": None},
    "shallow_mlp": {"shallow_ratio": 0.5, "shallow_init": "slice"},
    "thin_mlp": {"thin_mlp_ratio": 2.0},
    "truncated": {"keep_depth": None},
}

# timm's create_model passes these to every entry point; they describe the base's weights.
_TIMM_PLUMBING = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _make_entrypoint(base: str, kind: str):
    defaults = VARIANT_DEFAULTS[kind]

    def entrypoint(pretrained: bool = False, **kwargs):
        variant = {"kind": kind}
        for key, default in defaults.items():
            variant[key] = kwargs.pop(key, default)
        for key in _TIMM_PLUMBING:
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        return create_vit(base, variant, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = f"{base}_{kind}"
    entrypoint.__module__ = __name__
    params = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
    entrypoint.__doc__ = f"{base} with the {kind} variant ({params})."
    return entrypoint


def _register_all() -> list[str]:
    names = []
    module = sys.modules[__name__]
    for base in BASE_MODELS:
        for kind in VARIANT_DEFAULTS:
            fn = _make_entrypoint(base, kind)
            setattr(module, fn.__name__, fn)
            register_model(fn)
            names.append(fn.__name__)
    return names


REGISTERED_MODELS = _register_all()
