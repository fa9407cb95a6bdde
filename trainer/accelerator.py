"""The accelerator a recipe asks for: DDP, FSDP or DeepSpeed ZeRO, mixed precision, trackers.

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
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from trainer.recipe import RecipeError
from trainer.recipe_schema import Recipe
from trainer.run_dir import RunDir


class DistributedSetupError(RecipeError):
    """A distributed configuration this recipe cannot train under."""


def _deepspeed_plugin(recipe: Recipe) -> DeepSpeedPlugin:
    # accelerate's DeepSpeed integration also imports transformers (HfDeepSpeedConfig).
    missing = [name for name in ("deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise DistributedSetupError(f"distributed.strategy = 'deepspeed' needs {' and '.join(missing)} "
                                    "(not installed): pip install 'depthlab[deepspeed]'")
    plugin = DeepSpeedPlugin(zero_stage=recipe.distributed.zero_stage,
                             gradient_accumulation_steps=recipe.train.grad_accum_steps,
                             gradient_clipping=recipe.optim.clip_grad_norm or 0.0,
                             # ZeRO-3: gather the full weights for model.safetensors (in their own dtype)
                             zero3_save_16bit_model=True)
    # accelerate reads the micro-batch from a prepared dataloader; the trainer prepares only model
    # and optimizer (its samplers shard the data themselves), so the recipe states it.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
    return plugin


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
        if "LOCAL_RANK" not in os.environ:  # DeepSpeed joins the launcher's process group; it makes none
            raise DistributedSetupError(
                "distributed.strategy = 'deepspeed' needs a distributed launcher: `accelerate launch "
                "--use_deepspeed --num_processes N trainer/train.py …` (N = 1 too) or `--multi_gpu`")
        plugins["deepspeed_plugin"] = _deepspeed_plugin(recipe)
    elif strategy == "fsdp":
        plugins["fsdp_plugin"] = _fsdp_plugin(recipe)
    tensorboard = recipe.logging.tensorboard
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=recipe.distributed.find_unused_parameters)]
    cpu = _cpu_processes_only()
    if cpu and strategy == "deepspeed":
        # accelerate reaches DeepSpeed only off its CPU path; naming gloo gives DeepSpeed's CPU
        # accelerator a process group of the launched size (otherwise every rank thinks it is alone).
        cpu = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=recipe.train.precision,
        gradient_accumulation_steps=recipe.train.grad_accum_steps,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(RunDir(run_dir).tensorboard)),
        kwargs_handlers=handlers,
        **plugins,
    )
    check_backend(recipe, accelerator)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != recipe.train.precision:
        accelerator.print(f"note: mixed precision {recipe.train.precision} (train.precision); the launcher's "
                          f"{launched!r} does not apply: the recipe decides, so that a run resumes as it started "
                          f"(--set train.precision={launched} to change it)")
    return accelerator


def check_backend(recipe: Recipe, accelerator: Accelerator) -> None:
    """Refuse combinations that would silently mis-shard or mis-average."""
    kind = accelerator.distributed_type
    wanted = {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}.get(recipe.distributed.strategy)
    if wanted is not None and kind != wanted:
        raise DistributedSetupError(
            f"distributed.strategy = {recipe.distributed.strategy!r}, but accelerate set up {kind.value} "
            f"(device {accelerator.device}); FSDP needs GPUs, and both need `accelerate launch`")
    zero3 = kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    if recipe.variant.kind == "grouped_mlp" and (kind == DistributedType.FSDP or zero3):
        backend = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3"
        raise DistributedSetupError(
            f"variant.kind = 'grouped_mlp' under {backend}: the MLP shared by blocks 2i and 2i+1 would be "
            "sharded as two units (a parameter shared across units is not supported); use DDP or "
            "DeepSpeed ZeRO-1/2 (distributed.strategy=ddp, or distributed.zero_stage=2)")
    sharded = "FSDP" if kind == DistributedType.FSDP else "DeepSpeed ZeRO-3" if zero3 else None
    if sharded and recipe.train.ema_decay is not None:
        raise DistributedSetupError(
            f"train.ema_decay under {sharded}: the EMA averages full (unsharded) tensors; set train.ema_decay=null, "
            "or use DDP / DeepSpeed ZeRO-1/2 for a run with an EMA")
    if kind == DistributedType.DEEPSPEED and recipe.train.nonfinite_max_skips:
        raise DistributedSetupError(
            f"train.nonfinite_max_skips = {recipe.train.nonfinite_max_skips} under DeepSpeed: the engine applies "
            "the update inside backward, before the loss can be checked, so a bad batch cannot be skipped; "
            "set train.nonfinite_max_skips=0 (the run stops at a non-finite loss and names the last good checkpoint)")
    if kind == DistributedType.FSDP and recipe.train.compile:
        raise DistributedSetupError("train.compile under FSDP is not supported by depthlab yet; "
                                    "set train.compile=false")
