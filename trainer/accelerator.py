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


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def fsdp_mixed_precision(recipe: Recipe) -> dict[str, torch.dtype]:
    """FSDP's dtypes, stated rather than left to accelerate, whose default reduces gradients in the
    compute dtype (bf16) where DDP all-reduces float32: parameters and buffers computed in
    train.precision, gradients reduced in distributed.fsdp_reduce_dtype (float32 by default, as DDP)."""
    compute = PRECISION_DTYPES[recipe.train.precision]
    reduce = torch.float32 if recipe.distributed.fsdp_reduce_dtype == "fp32" else compute
    return {"param_dtype": compute, "reduce_dtype": reduce, "buffer_dtype": compute}


def _fsdp_plugin(recipe: Recipe) -> FullyShardedDataParallelPlugin:
    return FullyShardedDataParallelPlugin(
        sharding_strategy=recipe.distributed.fsdp_sharding.upper(),
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],  # timm's ViT block: one FSDP unit per block
        state_dict_type="SHARDED_STATE_DICT",
        use_orig_params=True,  # per-parameter weight-decay groups and the trainable mask need it
        mixed_precision_policy=fsdp_mixed_precision(recipe),
        backward_prefetch="BACKWARD_PRE",  # torch's default (accelerate's is none): the next unit's gather overlaps
    )


def describe_fsdp(recipe: Recipe) -> str:
    policy = fsdp_mixed_precision(recipe)
    names = {k: str(v).removeprefix("torch.") for k, v in policy.items()}
    return (f"FSDP: {recipe.distributed.fsdp_sharding}, one unit per Block, parameters in {names['param_dtype']}, "
            f"gradients reduced in {names['reduce_dtype']}, backward prefetch BACKWARD_PRE")


def _cpu_processes_only() -> bool:
    """Launched as several processes on a machine without GPUs: run them on CPU with gloo.

    (accelerate otherwise only picks its multi-CPU backend for MPI launches or `cpu=True`.)
    """
    gpus = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return "LOCAL_RANK" in os.environ and not gpus


def launched_backend() -> str | None:
    """What `accelerate launch` (its flags or accelerate config) asked for: "deepspeed", "fsdp" or None."""
    for backend, variable in (("deepspeed", "ACCELERATE_USE_DEEPSPEED"), ("fsdp", "ACCELERATE_USE_FSDP")):
        if os.environ.get(variable, "false").lower() == "true":
            return backend
    return None


def effective_strategy(recipe: Recipe) -> str:
    """The recipe's distributed.strategy, or with `auto` the launcher's; a contradiction is refused."""
    strategy, launched = recipe.distributed.strategy, launched_backend()
    if strategy == "auto":
        return launched or "auto"
    if launched is not None and launched != strategy:
        flag = "--use_deepspeed" if launched == "deepspeed" else "--use_fsdp"
        raise DistributedSetupError(
            f"distributed.strategy = {strategy!r}, but the launch asks for {launched} ({flag} or its accelerate "
            f"config): set distributed.strategy=auto (or {launched}) to train under it, or launch without it")
    return strategy


def _fill_deepspeed_config(recipe: Recipe, accelerator: Accelerator) -> None:
    """The batch geometry a DeepSpeed config left to accelerate ("auto"): accelerate reads it from a prepared
    dataloader, and the trainer prepares none (its samplers shard the data themselves)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", recipe.train.batch_size),
                       ("gradient_accumulation_steps", recipe.train.grad_accum_steps),
                       ("gradient_clipping", recipe.optim.clip_grad_norm or 0.0)):
        if config.get(key, "auto") == "auto":
            config[key] = value


def build_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    strategy = effective_strategy(recipe)
    plugins: dict = {}
    if strategy == "deepspeed" and recipe.distributed.strategy == "deepspeed":
        if "LOCAL_RANK" not in os.environ:  # DeepSpeed joins the launcher's process group; it makes none
            raise DistributedSetupError(
                "distributed.strategy = 'deepspeed' needs a distributed launcher: `accelerate launch "
                "--use_deepspeed --num_processes N trainer/train.py …` (N = 1 too) or `--multi_gpu`")
        plugins["deepspeed_plugin"] = _deepspeed_plugin(recipe)
    elif strategy == "fsdp" and recipe.distributed.strategy == "fsdp":
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
        dynamo_backend=recipe.train.compile_backend if recipe.train.compile else "no",  # the recipe decides
        gradient_accumulation_steps=recipe.train.grad_accum_steps,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(RunDir(run_dir).tensorboard)),
        kwargs_handlers=handlers,
        **plugins,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _fill_deepspeed_config(recipe, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP and "fsdp_plugin" in plugins:
        accelerator.print(describe_fsdp(recipe))
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
