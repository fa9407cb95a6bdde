"""The recipe schema: every knob depthlab reads, with its default, in one place.

A recipe YAML may set any subset of these fields; everything else takes the default below.
`knob()` attaches the validation range and a one-line help text to a field; the loader in
`trainer/recipe.py` enforces types, ranges and choices before any model is built.
Choices marked OPEN in the science notes (shared/science.md) are knobs here, so a run's
resolved `recipe.yaml` records exactly which choice it used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from diagnostics.registry import METRIC_NAMES as DIAGNOSTIC_METRICS


def knob(default: Any = None, *, help: str = "", min: float | None = None, max: float | None = None,
         min_exclusive: bool = False, choices: tuple | None = None) -> Any:
    """A dataclass field carrying its validation range and help text.

    `choices` constrains the items of a list-valued knob (scalar choices use `Literal`).
    """
    meta = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = knob("vit_base_patch16_224", help="timm model name (any timm VisionTransformer)")
    num_classes: int = knob(1000, min=1, help="classifier outputs")
    img_size: int = knob(224, min=8, help="input resolution (square)")
    in_chans: int = knob(3, min=1, help="input channels")
    patch_size: int | None = knob(None, min=1, help="override the timm model's patch size")
    embed_dim: int | None = knob(None, min=1, help="override the embedding width")
    depth: int | None = knob(None, min=1, help="override the number of blocks (depth-d from scratch)")
    num_heads: int | None = knob(None, min=1, help="override the number of attention heads")
    mlp_ratio: float | None = knob(None, min=0, min_exclusive=True, help="override the MLP hidden ratio")
    drop_path_rate: float = knob(0.1, min=0, max=1, help="stochastic depth (linear over depth, timm rule)")
    drop_rate: float = knob(0.0, min=0, max=1, help="dropout before the head")
    pretrained: bool = knob(False, help="load timm pretrained weights (from the local cache only)")
    checkpoint: str | None = knob(None, help="initialise weights from this file (.safetensors or run checkpoint)")
    kwargs: dict[str, Any] = knob({}, help="any other timm VisionTransformer kwarg, passed through")


@dataclass
class VariantConfig:
    kind: Literal["none", "grouped_mlp", "shallow_mlp", "thin_mlp", "truncated"] = knob(
        "none", help="P2 architecture variant applied to the timm model")
    group_size: int = knob(2, min=1, help="grouped_mlp: consecutive blocks sharing one MLP")
    group_init_scale: float | None = knob(
        None, min=0, min_exclusive=True,
        help="grouped_mlp: init scale of the shared fc1.weight/fc1.bias/fc2.weight; null = 1/sqrt(group_size)")
    shallow_ratio: float = knob(0.5, min=0, max=1, min_exclusive=True,
                                help="shallow_mlp: fraction of hidden units kept (the first ones)")
    shallow_init: Literal["slice", "reinit"] = knob(
        "slice", help="shallow_mlp: keep the sliced full-width init, or re-initialise the narrow MLP")
    thin_mlp_ratio: float = knob(2.0, min=0, min_exclusive=True, help="thin_mlp: mlp_ratio at creation")
    keep_depth: int | None = knob(None, min=1, help="truncated: keep the first d blocks (plus final norm, head)")


@dataclass
class DataConfig:
    source: Literal["imagefolder", "hf", "digits", "synthetic"] = knob(
        "imagefolder", help="imagefolder (train/ val/ folders), hf (datasets), digits (embedded), synthetic")
    root: str | None = knob(None, help="imagefolder root, or a local path for hf")
    hf_name: str | None = knob(None, help="hf: dataset name on the hub (or use root for a local copy)")
    hf_config: str | None = knob(None, help="hf: dataset config name")
    train_split: str = knob("train", help="split (or folder) to train on")
    eval_split: str = knob("val", help="split (or folder) to evaluate on")
    image_column: str = knob("image", help="hf: image column")
    label_column: str = knob("label", help="hf: label column")
    num_workers: int = knob(8, min=0, help="data-loader worker processes per training process")
    pin_memory: bool = knob(True, help="pin host memory for faster host-to-device copies")
    skip_corrupt: bool = knob(False, help="skip (and count) unreadable images instead of stopping")
    fast_path: bool = knob(
        True, help="training images leave the loader workers as uint8 (torchvision JPEG decode, reduced DCT decode "
                   "where the crop allows, torch's antialiased resize); normalisation and random erasing run on the "
                   "device. Same augmentation draws as the reference transform; false = timm's transform in the workers")
    val_fraction: float | None = knob(
        None, min=0, max=1, min_exclusive=True,
        help="hold out this fraction of the training split, drawn anew for each train.seed, as a validation set "
             "that picks the best checkpoint; the eval split is then the test set (P3: 0.2); null = none")
    split_seed: int = knob(0, help="digits: seed of the fixed train/test split")
    digits_test_fraction: float = knob(0.25, min=0, max=1, min_exclusive=True, help="digits: held-out fraction")
    synthetic_train_size: int = knob(1024, min=1, help="synthetic: training examples")
    synthetic_eval_size: int = knob(256, min=1, help="synthetic: evaluation examples")


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = knob("adamw", help="optimizer")
    lr: float = knob(1e-3, min=0, min_exclusive=True, help="peak learning rate at lr_reference_batch")
    lr_reference_batch: int | None = knob(
        1024, min=1, help="lr is scaled by global_batch / this (linear rule); null = use lr as given")
    weight_decay: float = knob(0.05, min=0, help="decoupled weight decay (not on biases, norms, pos_embed, cls_token)")
    betas: list[float] = knob([0.9, 0.999], help="AdamW betas")
    eps: float = knob(1e-8, min=0, min_exclusive=True, help="AdamW epsilon")
    momentum: float = knob(0.9, min=0, max=1, help="SGD momentum")
    clip_grad_norm: float | None = knob(None, min=0, min_exclusive=True, help="clip the global gradient norm")
    fused: bool = knob(True, help="use the fused optimizer kernel where the device supports it")
    trainable: list[str] = knob(
        [], help="glob patterns of parameter names to train; empty = all (e.g. 'blocks.*.attn.*' for P3)")


@dataclass
class ScheduleConfig:
    epochs: int = knob(300, min=1, help="training epochs")
    warmup_epochs: float = knob(5.0, min=0, help="linear warm-up length in epochs")
    warmup_steps: int | None = knob(None, min=0, help="warm-up in optimizer steps (overrides warmup_epochs)")
    warmup_lr: float = knob(1e-6, min=0, help="learning rate at the start of warm-up")
    min_lr: float = knob(1e-5, min=0, help="learning rate at the end of the cosine")
    kind: Literal["cosine", "constant"] = knob("cosine", help="decay after warm-up")
    step_on: Literal["update", "epoch"] = knob(
        "update", help="step the schedule every optimizer update, or once per epoch as timm's train.py does by "
                       "default (P2: the LR is constant within an epoch)")
    warmup_prefix: bool = knob(
        False, help="false: the cosine spans the whole run, the warm-up replaces its start (DeiT, P2, timm's "
                    "default); true: warm-up first, then the cosine over the remaining steps (P3)")


@dataclass
class AugmentConfig:
    train_interpolation: Literal["bicubic", "bilinear", "nearest", "random"] = knob(
        "bicubic", help="resize interpolation for training")
    eval_interpolation: Literal["bicubic", "bilinear", "nearest"] = knob(
        "bicubic", help="resize interpolation for evaluation")
    scale: list[float] = knob([0.08, 1.0], help="RandomResizedCrop area range")
    ratio: list[float] = knob([0.75, 1.3333333333], help="RandomResizedCrop aspect range")
    hflip: float = knob(0.5, min=0, max=1, help="horizontal flip probability")
    color_jitter: float = knob(0.3, min=0, help="colour jitter strength (ignored when auto_augment is set)")
    auto_augment: str | None = knob("rand-m9-mstd0.5-inc1", help="timm auto-augment policy string; null = off")
    device_augment: bool | None = knob(
        None, help="data.fast_path: RandAugment (rand-*) ops drawn in the workers, applied to the uint8 batch on the "
                   "device (Pillow's arithmetic, re-implemented); null = when CUDA is available, false = in the workers")
    reprob: float = knob(0.25, min=0, max=1, help="random erasing probability")
    remode: Literal["pixel", "rand", "const"] = knob("pixel", help="random erasing fill mode")
    recount: int = knob(1, min=1, help="random erasing count")
    mixup: float = knob(0.8, min=0, help="mixup alpha (0 = off)")
    cutmix: float = knob(1.0, min=0, help="cutmix alpha (0 = off)")
    mixup_prob: float = knob(1.0, min=0, max=1, help="probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = knob(0.5, min=0, max=1, help="probability of cutmix instead of mixup")
    mixup_mode: Literal["batch", "pair", "elem"] = knob("batch", help="how mixup parameters are drawn")
    label_smoothing: float = knob(0.1, min=0, max=1, help="label smoothing")
    repeated_aug: int = knob(3, min=1, help="repeated augmentation: copies of each image per epoch (1 = off)")
    mean: list[float] = knob([0.5, 0.5, 0.5], help="normalisation mean")
    std: list[float] = knob([0.5, 0.5, 0.5], help="normalisation std")
    crop_pct: float = knob(0.9, min=0, max=1, min_exclusive=True, help="evaluation centre-crop fraction")


@dataclass
class TrainConfig:
    seed: int = knob(0, help="global seed (each process offsets it by its rank)")
    batch_size: int = knob(128, min=1, help="per-process batch size")
    grad_accum_steps: int = knob(1, min=1, help="micro-batches per optimizer step")
    precision: Literal["bf16", "fp16", "no"] = knob("bf16", help="mixed precision through accelerate")
    compile: bool = knob(False, help="torch.compile the model (through accelerate, after the DDP/DeepSpeed wrapper)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = knob(
        "inductor", help="torch.compile backend: inductor (fast kernels); aot_eager / eager trace without "
                         "generating code, to debug a graph")
    tf32: bool = knob(False, help="let float32 matmuls and convolutions on Ampere+ GPUs use TF32 (faster, 10-bit "
                                  "mantissa): precision 'no' training and the diagnostics' fp32 probe; false = exact "
                                  "fp32")
    grad_checkpointing: bool = knob(False, help="activation checkpointing of the blocks (saves memory)")
    ema_decay: float | None = knob(0.9998, min=0, max=1, min_exclusive=True,
                                   help="EMA of the weights, per optimizer step; null = no EMA")
    ema_walk: Literal["parameters", "state_dict"] = knob(
        "parameters", help="parameters: every tensor averaged once per step; state_dict: timm's ModelEmaV3 as P2 "
                           "ran it (a GroupedMLP tensor shared by 2 blocks is averaged twice, decay**2; the first "
                           "update copies the weights)")
    max_steps: int | None = knob(None, min=1, help="stop after this many optimizer steps (smoke tests)")
    nonfinite_max_skips: int = knob(0, min=0, help="batches with a non-finite loss skipped before stopping")
    output_dir: str | None = knob(None, help="run directory; null = runs/<recipe name>")


@dataclass
class EvalConfig:
    every_epochs: int | None = knob(1, min=1, help="evaluate every N epochs")
    every_steps: int | None = knob(None, min=1, help="evaluate every N optimizer steps")
    batch_size: int = knob(256, min=1, help="per-process evaluation batch size")
    ema: bool = knob(True, help="also evaluate the EMA weights")
    pe_scale_rows: Literal["patches", "all"] = knob(
        "patches", help="--eval-only: pe_scale multiplies the position embedding of the patch positions only "
                        "(science.md §1), or also the CLS/prefix rows ('all', depthlab before 2026-12)")
    pe_scale: float = knob(1.0, min=0, help="--eval-only: evaluate with patch_embed + pe_scale * pos_embed "
                                            "(science.md §1 PE-scale experiment); training needs 1.0")


@dataclass
class CheckpointConfig:
    every_epochs: int | None = knob(1, min=1, help="save every N epochs")
    every_steps: int | None = knob(None, min=1, help="save every N optimizer steps")
    keep_last: int = knob(2, min=1, help="periodic checkpoints kept (last and best are kept besides)")
    save_best: bool = knob(True, help="keep the checkpoint with the best evaluation top-1")
    best_on: Literal["ema", "raw"] = knob("ema", help="which model's top-1 picks `best` (raw when there is no EMA)")


@dataclass
class LoggingConfig:
    tensorboard: bool = knob(True, help="write TensorBoard events under <run>/tb")
    every_steps: int = knob(50, min=1, help="log training scalars every N optimizer steps")
    progress_bar: bool = knob(True, help="show a progress bar on the main process")


@dataclass
class DiagnosticsConfig:
    """Depth-dynamics diagnostics during training (trainer/training_diagnostics.py); every OPEN choice of
    science.md is a knob."""

    enabled: bool = knob(False, help="measure the depth-dynamics metrics during training")
    at_checkpoints: bool = knob(True, help="run at every periodic, final and stopped checkpoint (not at best-only "
                                           "or preemption saves)")
    every_steps: int | None = knob(None, min=1, help="also run every N optimizer steps")
    metrics: list[str] = knob(list(DIAGNOSTIC_METRICS), choices=DIAGNOSTIC_METRICS, help="metrics to compute")
    model: Literal["raw", "ema", "both"] = knob("raw", help="which weights are probed (ema needs train.ema_decay)")
    tensorboard_images: Literal["checkpoints", "final", "never"] = knob(
        "checkpoints", help="when to log the stage x step heatmaps and the phase curve as images: at every "
                            "measured checkpoint, once at the end of training, or never")
    probe_size: int = knob(512, min=2, help="images in the fixed probe set (a seeded subset of the eval split)")
    probe_batch_size: int = knob(64, min=1, help="per-process batch size on the probe set")
    probe_seed: int = knob(0, help="seed choosing the probe images")
    include_cls: bool = knob(False, help="OPEN: include the CLS token in token similarity")
    phase_tau_floor: float = knob(0.005, min=0, help="OPEN: phase detection tolerance floor")
    phase_tau_fraction: float = knob(0.1, min=0, help="OPEN: tolerance as a fraction of the S_c range")
    phase_tau_scales: list[float] = knob([0.5, 1.0, 2.0], min=0, min_exclusive=True,
                                         help="OPEN: tau multipliers of the reported tau-sensitivity")
    phase_include_norm: bool = knob(False, help="OPEN: the final norm stage belongs to the phase curve")
    isi_variant: Literal["nested", "literal"] = knob("nested", help="OPEN: all-to-all regression form")
    isi_nested_fit: Literal["residual", "joint"] = knob(
        "residual", help="OPEN: nested ISI fit: residual = self-only map, then g(H) on its residual with its own "
                         "penalty (isi_ridge_grid and inf, chosen on validation); joint = one penalty for both")
    isi_pca_rank: int = knob(256, min=1, help="OPEN: nested ISI, rank of the whole-token-set projection")
    isi_pca_oversample: int = knob(16, min=0, help="nested ISI: extra columns of the randomized range finder")
    isi_pca_power_iterations: int = knob(1, min=0, help="nested ISI: power passes of the range finder")
    isi_holdout_fraction: float = knob(0.2, min=0, max=1, min_exclusive=True,
                                       help="OPEN: fraction of probe images held out for scoring (< 1)")
    isi_validation_fraction: float = knob(0.2, min=0, max=1, min_exclusive=True,
                                          help="OPEN: fraction of the training images choosing the ridge (< 1)")
    isi_ridge_grid: list[float] = knob([10.0 ** k for k in range(-6, 3)], min=0, min_exclusive=True,
                                       help="OPEN: ridge multipliers c of tr(XtX)/p tried")
    isi_seed: int = knob(0, help="seed of the ISI fit/validation/held-out split")
    isi_stages: list[str] = knob([], help="stages scored by ISI (embed, pe, block_<i>, norm); empty = all")
    isi_memory_budget_gb: float | None = knob(
        32.0, min=0, min_exclusive=True,
        help="ISI device memory budget (GiB): stages run in groups that fit; null = all stages at once")
    stage_replay_gb: float = knob(
        0.25, min=0, help="multi-pass metrics (ISI): later passes replay the first pass's stage tokens, kept on the "
                          "device while they fit in this many GiB per process, instead of running the forward again; 0 = off")
    nc_all_stages: bool = knob(True, help="neural collapse at every stage (else final norm only)")
    plasticity_mode: Literal["paper", "in_situ"] = knob("paper", help="OPEN: component inputs for plasticity")
    plasticity_pairs: int = knob(128, min=1, help="image pairs averaged for plasticity")
    plasticity_pairing: Literal["within_probe", "indexed"] = knob(
        "within_probe", help="within_probe: random pairs of probe images; indexed (P3): image k of "
                             "plasticity_pair_data's eval split with image k of this recipe's eval split")
    plasticity_pair_data: str | None = knob(
        None, help="indexed pairing: an image folder root whose data.eval_split folder holds the pretraining "
                   "distribution's validation images (ImageNet's val/ for P3)")
    plasticity_seed: int = knob(0, help="seed drawing the plasticity pairs")
    grad_norm_every_steps: int = knob(50, min=1, help="grad_norms: log per-component gradient norms every N steps")


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = knob(
        "auto", help="auto = whatever `accelerate launch`/its config chose")
    zero_stage: int = knob(2, min=0, max=3, help="deepspeed: ZeRO stage")
    fsdp_sharding: Literal["full_shard", "shard_grad_op", "no_shard", "hybrid_shard"] = knob(
        "full_shard", help="fsdp: sharding strategy")
    fsdp_reduce_dtype: Literal["fp32", "param"] = knob(
        "fp32", help="fsdp: reduce gradients in float32 (as DDP does), or in the compute dtype of train.precision")
    find_unused_parameters: bool = knob(False, help="ddp: needed when some parameters get no gradient")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
