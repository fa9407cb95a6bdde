"""depthlab's model family: timm ViTs and P2's MLP variants, registered with timm on import."""

from models.factory import (
    create_vit,
    create_vit_from_recipe,
    load_model_file,
    model_kwargs_from_recipe,
    read_spec,
    rebuild_from_spec,
    save_model_file,
    spec_of,
)
from models.profile import ModelProfile, count_parameters, parameter_dtype, profile_model
from models.registry import BASE_MODELS, REGISTERED_MODELS
from models.variants import (
    VARIANT_KINDS,
    VariantError,
    apply_grouped_mlp,
    apply_shallow_mlp,
    apply_variant,
    truncate_depth,
)

__all__ = [
    "BASE_MODELS", "REGISTERED_MODELS", "VARIANT_KINDS", "ModelProfile", "VariantError",
    "apply_grouped_mlp", "apply_shallow_mlp", "apply_variant", "count_parameters", "create_vit", "parameter_dtype",
    "create_vit_from_recipe", "load_model_file", "model_kwargs_from_recipe", "profile_model",
    "read_spec", "rebuild_from_spec", "save_model_file", "spec_of", "truncate_depth",
]
