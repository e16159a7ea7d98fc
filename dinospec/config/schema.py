"""The config schema: one dataclass per section, defaults in the fields, the meaning of a
key beside it. What values may be (dinospec.config.checks) and how files fill it
(dinospec.config.files) are beside this module; `dinospec.config` holds all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
ATTN_BACKENDS = ("sdpa", "xformers")
MULTI_CROP_ATTENTIONS = ("per_crop", "one_pass")
PREFIX_TOKENS = ("cls+registers", "cls")
BLOCK_SUBLAYERS = ("norm1", "qkv", "proj", "norm2", "ffn_in", "ffn_out")
"""The sublayers of a block that can be specialized, in forward order: each is selected
by `SpecializeConfig.<name>_blocks` and built shared or specialized (dinospec.models)."""


@dataclass
class SpecializeConfig:
    """Which sublayers give prefix tokens their own parameters, and in which blocks.

    Each `*_blocks` value selects blocks: "all", "none", a fraction of the depth counted
    from the input (float in [0, 1], e.g. 0.3333 for the first third), a count from the
    input (int), or an explicit list of block indices.
    """

    tokens: str = "cls+registers"
    norm1_blocks: Any = "none"
    qkv_blocks: Any = "none"
    proj_blocks: Any = "none"
    norm2_blocks: Any = "none"
    ffn_in_blocks: Any = "none"
    ffn_out_blocks: Any = "none"
    final_norm: bool = False


@dataclass
class ModelConfig:
    """DINOv2 backbone arguments plus the specialization; names match DINOv2's constructor."""

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    ffn_layer: str = "mlp"
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    init_values: float | None = 1.0e-5
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    attn_backend: str = "sdpa"
    # How a multi-crop call (the student's, all crop sizes) runs: per_crop runs each crop
    # size as its own batch; one_pass packs every crop into one sequence with block-diagonal
    # attention (DINOv2's forward_nested; xformers' kernel with attn_backend=xformers, one
    # SDPA call per crop size otherwise), fewer and larger kernels for GPUs. Same function
    # and gradients up to float rounding (dinospec.models.one_pass).
    multi_crop_attention: str = "per_crop"
    specialize: SpecializeConfig = field(default_factory=SpecializeConfig)


@dataclass
class DataConfig:
    """Where training images come from. `dataset`: synthetic (embedded, no files),
    imagenet (`path`/train/<wnid>/*.JPEG), folder (any image tree) or list (a text file
    of image paths)."""

    dataset: str = "synthetic"
    path: str | None = None
    synthetic_size: int = 20000
    synthetic_image_size: int = 64
    num_workers: int = 2
    max_bad_fraction: float = 0.01


@dataclass
class CropsConfig:
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    local_crops_number: int = 8
    global_crops_size: int = 224
    local_crops_size: int = 98  # 96 in SPEC for patch 16; DINOv2 uses 98 with patch 14
    # Gaussian blur sigma range in pixels (9-pixel kernel). DINOv2's values suit 224 px
    # crops; on much smaller crops the same sigma wipes out textures a few pixels wide,
    # so small-image configs scale it with the crop size.
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # Gaussian blur probability of global crop 1, global crop 2 and each local crop, as
    # DINOv2's code executes them (its GaussianBlur hands 1 - p to RandomApply): 0.0 / 0.9 /
    # 0.5, how the released checkpoints were trained. Its paper and code state 1.0 / 0.1 /
    # 0.5; set those three values for the stated recipe.
    blur_prob_global1: float = 0.0
    blur_prob_global2: float = 0.9
    blur_prob_local: float = 0.5


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    head_n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    # Mask ratios are stratified over each rank's batch, as DINOv2's collate does (per GPU),
    # or over the global batch ("global"), which makes the masks of a step independent of
    # the number of processes.
    mask_stratification: str = "rank"


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30


@dataclass
class OptimConfig:
    epochs: int = 100
    base_lr: float = 0.004
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    # Only with train.pretrained_weights and heads not taken from it: first, epochs during
    # which the heads (and the centres) train alone, both backbones frozen, so targets from
    # random heads never reach a good backbone; then epochs over which the backbone's lr
    # rises linearly from 0 to the schedule's, its own warm-up.
    head_warmup_epochs: int = 1
    backbone_warmup_epochs: int = 1


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 0
    batch_size_per_gpu: int = 64
    epoch_length: int = 1250
    centering: str = "softmax"
    log_every: int = 10
    checkpoint_every: int = 1250
    keep_last: int = 3
    max_nonfinite_skips: int = 3
    fsdp: bool = False
    max_iterations: int | None = None
    # torch.compile the blocks of student and teacher backbones: on, off, or auto (on
    # with CUDA, where fusing norms and elementwise ops into the matmuls pays for the
    # minutes of compilation; off on CPU, where compiling costs more than it saves).
    compile: str = "auto"
    # Recompute each student block's activations in the backward pass instead of keeping
    # them: about a third more compute for a fraction of the activation memory, so larger
    # batches or models fit. The teacher keeps no activations, so it is never wrapped.
    activation_checkpointing: bool = False
    # Autocast dtype of the forward passes (and FSDP2's parameter dtype): bf16, fp32, or
    # auto (bf16 with CUDA, fp32 on CPU).
    precision: str = "auto"
    # When checkpoints exist but none verifies, a run stops and lists them; set this to
    # start over from iteration 0 on purpose (they are moved to checkpoints/invalid/).
    discard_invalid_checkpoints: bool = False
    # Student and teacher backbones start from these weights instead of a random init: a
    # weight file, a Hugging Face model directory or a dinospec run directory, in any layout
    # dinospec reads (DINOv2 torch hub, timm, Hugging Face, dinospec). The file's
    # architecture must be the model's (a vanilla file fills a specialized model's prefix
    # paths, same function). A run directory also gives its heads and centres; otherwise
    # the heads warm up alone first (optim.head_warmup_epochs).
    pretrained_weights: str | None = None
    # A finished run directory this run continues as its next phase (e.g. DINOv2's short
    # high-resolution phase): backbones, heads and centres from it, positions resized to
    # model.img_size, a new optimizer; the metrics carry the phase and its overall offset.
    previous_phase: str | None = None


@dataclass
class GramConfig:
    # Gram anchoring (DINOv3, section 4), off while loss_weight is 0: the student's patch
    # similarities within each global crop are pulled towards those of a Gram teacher, a
    # snapshot of the EMA teacher taken at start_iteration and retaken every refresh_every
    # iterations (0: never); DINOv3 starts it after 1M iterations and refreshes every 10k.
    # upscale 2 feeds the Gram teacher each global crop rendered again from the image at
    # twice the global size (its distortions included; the student's crop is that rendering
    # resized down), as DINOv3's gram_teacher_crops_size, and brings its feature map back
    # to the student's grid; global size x upscale must be a multiple of the patch size.
    # clip_negative sets negative similarities to 0 in the Gram teacher's matrix or in both
    # (none, teacher, both).
    loss_weight: float = 0.0
    start_iteration: int = 0
    refresh_every: int = 0
    upscale: float = 1.0
    clip_negative: str = "none"


@dataclass
class DistillConfig:
    # A frozen teacher (a dinospec run directory, or a backbone file in any layout dinospec
    # reads) whose DINO/iBOT targets train this config's model, a smaller student, as
    # DINOv2 distilled ViT-S/B/L from ViT-g; the student's EMA is what gets exported. A run
    # directory gives its heads and centres; a file has none, so its heads start random and
    # stay frozen. teacher_num_heads: the teacher's attention heads when its file does not
    # record them and it is no released DINOv2 size.
    teacher: str | None = None
    teacher_num_heads: int | None = None


@dataclass
class EvalSegConfig:
    # A short linear segmentation probe at each evaluation, off while dataset is none:
    # cached patch tokens of centre crops (train and val), a linear head trained for
    # `iterations`, mIoU on val. dataset: none, synthetic (the embedded scenes' label maps),
    # camvid or ade20k (`path` as for `dinospec eval-seg`).
    dataset: str = "none"
    path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    max_train_images: int = 200
    max_val_images: int = 100
    crop_size: int = 224
    n_layers: int = 1
    iterations: int = 300
    batch_size: int = 16
    lr: float = 1.0e-3


@dataclass
class EvaluationConfig:
    # Evaluation of the teacher backbone while it trains, on its frozen features: at the
    # start (at_start), every `every` iterations (0: only at start and end) and at the end.
    # k-NN top-1 of the last block's [CLS] on `dataset`: none (no k-NN), imagenet
    # (`path`/<split>/<class>/<image>, e.g. Imagenette) or synthetic (the embedded scenes'
    # image labels, images of other seeds than the training scenes). It reads no training
    # data and draws from no training random stream, so a run trains the same with it.
    every: int = 0
    at_start: bool = True
    dataset: str = "none"
    path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_per_class: int | None = None
    val_per_class: int | None = None
    image_size: int = 224
    resize_size: int = 256
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 64
    num_workers: int = 2
    pca_images: int = 4
    seg: EvalSegConfig = field(default_factory=EvalSegConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
