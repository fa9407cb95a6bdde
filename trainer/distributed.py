"""The Accelerator a recipe asks for: DDP, FSDP or DeepSpeed ZeRO, mixed precision, trackers.

`distributed.strategy: auto` takes whatever `accelerate launch` and the user's accelerate config
chose; `ddp`, `fsdp` and `deepspeed` build accelerate's plugins from the recipe. Either way the
chosen backend is checked against the model: a GroupedMLP shares one MLP between blocks, which
FSDP and ZeRO-3 would shard as two separate units, so that combination is refused, as is an EMA
under FSDP (its parameters are sharded; the EMA here averages full tensors).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration

from trainer.recipe import RecipeError
from trainer.recipe_schema import Recipe


class DistributedSetupError(RecipeError):
    """A distributed configuration this recipe cannot train under."""


def _deepspeed_plugin(recipe: Recipe) -> DeepSpeedPlugin:
    # accelerate's DeepSpeed integration also imports transformers (HfDeepSpeedConfig).
    missing = [name for name in ("deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise DistributedSetupError(f"distributed.strategy = 'deepspeed' needs {' and '.join(missing)} "
                                    "(not installed): pip install 'depthlab[deepspeed]'")
    return DeepSpeedPlugin(zero_stage=recipe.distributed.zero_stage,
                           gradient_accumulation_steps=recipe.train.grad_accum_steps,
                           gradient_clipping=recipe.optim.clip_grad_norm or 0.0)


def _fsdp_plugin(recipe: Recipe) -> FullyShardedDataParallelPlugin:
    return FullyShardedDataParallelPlugin(
        sharding_strategy=recipe.distributed.fsdp_sharding.upper(),
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],  # timm's ViT block: one FSDP unit per block
        state_dict_type="SHARDED_STATE_DICT",
        use_orig_params=True,  # per-parameter weight-decay groups and the trainable mask need it
    )


def _cpu_processes_only() -> bool:
    """Launched as several processes on a machine without GPUs: run them on CPU with gloo.

    (accelerate otherwise only picks its multi-CPU backend for MPI launches or `cpu=True`.)
    """
    gpus = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return "LOCAL_RANK" in os.environ and not gpus


def build_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    strategy = recipe.distributed.strategy
    plugins: dict = {}
    if strategy == "deepspeed":
        plugins["deepspeed_plugin"] = _deepspeed_plugin(recipe)
    elif strategy == "fsdp":
        plugins["fsdp_plugin"] = _fsdp_plugin(recipe)
    tensorboard = recipe.logging.tensorboard
    accelerator = Accelerator(
        cpu=_cpu_processes_only(),
        mixed_precision=recipe.train.precision,
        gradient_accumulation_steps=recipe.train.grad_accum_steps,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=recipe.distributed.find_unused_parameters)],
        **plugins,
    )
    check_backend(recipe, accelerator)
    return accelerator


def check_backend(recipe: Recipe, accelerator: Accelerator) -> None:
    """Refuse combinations that would silently mis-shard or mis-average."""
    kind = accelerator.distributed_type
    wanted = {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}.get(recipe.distributed.strategy)
    if wanted is not None and kind != wanted:
        raise DistributedSetupError(
            f"distributed.strategy = {recipe.distributed.strategy!r}, but accelerate set up {kind.value} "
            f"(device {accelerator.device}); FSDP and DeepSpeed need GPUs launched with `accelerate launch`")
    zero3 = kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    if recipe.variant.kind == "grouped_mlp" and (kind == DistributedType.FSDP or zero3):
        backend = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise DistributedSetupError(
            f"variant.kind = 'grouped_mlp' under {backend}: the MLP shared by blocks 2i and 2i+1 would be "
            "sharded as two units (a parameter shared across units is not supported); use DDP or "
            "DeepSpeed ZeRO-1/2 (distributed.strategy=ddp, or distributed.zero_stage=2)")
    if kind == DistributedType.FSDP and recipe.train.ema_decay is not None:
        raise DistributedSetupError(
            "train.ema_decay under FSDP: the EMA averages full (unsharded) tensors; set train.ema_decay=null, "
            "or use DDP / DeepSpeed ZeRO-1/2 for a run with an EMA")
    if kind == DistributedType.FSDP and recipe.train.compile:
        raise DistributedSetupError("train.compile under FSDP is not supported by depthlab yet; "
                                    "set train.compile=false")
