"""Structured configuration: dataclass schema, YAML files that extend each other, overrides.

A typo in a key, a value of the wrong type, or a value that cannot work (embed_dim not
divisible by num_heads, a block index past the depth) must fail at load time with the key,
the value and the file that set it, not hours later on a cluster. Every numeric key has its
allowed values declared once, in MODEL_RANGES or TRAINING_RANGES (eval.config has its own
table), so a new key is validated by adding one entry there.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXTENDS_KEY = "extends"
FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
ATTN_BACKENDS = ("sdpa", "xformers")
PREFIX_TOKENS = ("cls+registers", "cls")


Schema = TypeVar("Schema")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source, key and value."""


class Allowed(Protocol):
    """The values a key may take: `value in allowed`, and `str(allowed)` completes
    "must be ..." in error messages."""

    def __contains__(self, value: Any) -> bool: ...


@dataclass(frozen=True)
class Range:
    """Finite numbers from `low` to `high` (None: unbounded), each end included unless open."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: Any) -> bool:
        if not isinstance(value, int) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.open_high and value == self.high)

    def __str__(self) -> str:
        left = "(" if self.open_low or self.low is None else "["
        right = ")" if self.open_high or self.high is None else "]"
        low = "-inf" if self.low is None else self.low
        high = "inf" if self.high is None else self.high
        return f"in {left}{low}, {high}{right}"


@dataclass(frozen=True)
class OneOf:
    """A number from a short list (e.g. the layer counts a probe supports)."""

    values: tuple[float, ...]

    def __contains__(self, value: Any) -> bool:
        return value in self.values

    def __str__(self) -> str:
        return f"one of {list(self.values)}"


@dataclass(frozen=True)
class Pair:
    """A `[low, high]` range whose ends both lie in `ends` (crop scales, mask ratios)."""

    ends: Range

    def __contains__(self, value: Any) -> bool:
        return len(value) == 2 and all(v in self.ends for v in value) and value[0] <= value[1]

    def __str__(self) -> str:
        return f"[low, high] with low <= high, both {self.ends}"


@dataclass(frozen=True)
class Each:
    """A list (non-empty unless `may_be_empty`) whose every element is allowed by `element`."""

    element: Range | OneOf
    may_be_empty: bool = False

    def __contains__(self, value: Any) -> bool:
        return (self.may_be_empty or len(value) > 0) and all(v in self.element for v in value)

    def __str__(self) -> str:
        empty = "a list" if self.may_be_empty else "a non-empty list"
        return f"{empty} with every element {self.element}"


COUNT = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, open_low=True)
UNIT = Range(0, 1)
BELOW_ONE = Range(0, 1, open_high=True)
FRACTION = Range(0, 1, open_low=True)
# torch.manual_seed takes at most 64 bits; numpy's seed sequences take no negative number.
SEED = Range(0, 2**64 - 1)


def range_problems(obj: Any, ranges: Mapping[str, Allowed]) -> list[tuple[str, Any, str]]:
    """(key, value, what is allowed) for each value of the dataclass `obj` that its entry in
    `ranges` (dotted keys from obj) does not allow. A null passes: the schema's type already
    says which keys may be null, and the message then says so."""
    out = []
    for key, allowed in ranges.items():
        parent_key, _, name = key.rpartition(".")
        parent = attrgetter(parent_key)(obj) if parent_key else obj
        value = getattr(parent, name)
        if value is None or value in allowed:
            continue
        nullable = type(None) in typing.get_args(typing.get_type_hints(type(parent))[name])
        out.append((key, value, f"must be {allowed}{' or null' if nullable else ''}"))
    return out


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


MODEL_RANGES: dict[str, Allowed] = {
    "img_size": COUNT,
    "patch_size": COUNT,
    "in_chans": COUNT,
    "embed_dim": COUNT,
    "depth": COUNT,
    "num_heads": COUNT,
    "mlp_ratio": POSITIVE,
    "drop_path_rate": BELOW_ONE,
    "init_values": POSITIVE,  # null: no LayerScale
    "num_register_tokens": NON_NEGATIVE,
    "interpolate_offset": NON_NEGATIVE,
}
"""Allowed values of every numeric key of ModelConfig (keys relative to `model`)."""

TRAINING_RANGES: dict[str, Allowed] = {
    "data.synthetic_size": COUNT,
    "data.synthetic_image_size": COUNT,
    "data.num_workers": NON_NEGATIVE,
    "data.max_bad_fraction": BELOW_ONE,
    "crops.global_crops_scale": Pair(FRACTION),
    "crops.local_crops_scale": Pair(FRACTION),
    "crops.local_crops_number": NON_NEGATIVE,
    "crops.global_crops_size": COUNT,
    "crops.local_crops_size": COUNT,
    "crops.blur_sigma": Pair(POSITIVE),
    "crops.blur_prob_global1": UNIT,
    "crops.blur_prob_global2": UNIT,
    "crops.blur_prob_local": UNIT,
    "dino.loss_weight": NON_NEGATIVE,
    "dino.koleo_loss_weight": NON_NEGATIVE,
    "dino.head_n_prototypes": COUNT,
    "dino.head_hidden_dim": COUNT,
    "dino.head_bottleneck_dim": COUNT,
    "dino.head_nlayers": COUNT,
    "ibot.loss_weight": NON_NEGATIVE,
    "ibot.mask_sample_probability": UNIT,
    "ibot.mask_ratio_min_max": Pair(FRACTION),
    "ibot.head_n_prototypes": COUNT,
    "ibot.head_hidden_dim": COUNT,
    "ibot.head_bottleneck_dim": COUNT,
    "ibot.head_nlayers": COUNT,
    "teacher.momentum_teacher": UNIT,
    "teacher.final_momentum_teacher": UNIT,
    "teacher.teacher_temp": POSITIVE,
    "teacher.warmup_teacher_temp": POSITIVE,
    "teacher.warmup_teacher_temp_epochs": NON_NEGATIVE,
    "optim.epochs": COUNT,
    "optim.base_lr": NON_NEGATIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE,
    "optim.layerwise_decay": FRACTION,
    "optim.patch_embed_lr_mult": NON_NEGATIVE,
    "optim.clip_grad": POSITIVE,  # always applied: a max norm of 0 would zero every gradient
    "optim.freeze_last_layer_epochs": NON_NEGATIVE,
    "optim.adamw_beta1": BELOW_ONE,
    "optim.adamw_beta2": BELOW_ONE,
    "optim.head_warmup_epochs": NON_NEGATIVE,
    "optim.backbone_warmup_epochs": NON_NEGATIVE,
    "train.seed": SEED,
    "train.batch_size_per_gpu": COUNT,
    "train.epoch_length": COUNT,
    "train.log_every": COUNT,
    "train.checkpoint_every": COUNT,
    "train.keep_last": COUNT,
    "train.max_nonfinite_skips": NON_NEGATIVE,
    "train.max_iterations": COUNT,  # null: the whole schedule; 0 would be ambiguous
}
"""Allowed values of every numeric key of Config outside `model`."""

CONFIG_RANGES: dict[str, Allowed] = {
    **{f"model.{key}": allowed for key, allowed in MODEL_RANGES.items()},
    **TRAINING_RANGES,
}
"""Every numeric key of Config, with its allowed values."""


def resolve_blocks(value: Any, depth: int) -> list[int]:
    """Turn a block selection (see SpecializeConfig) into sorted block indices.

    Raises ValueError describing the problem; callers add the key and the source.
    """
    if value is None or value == "none":
        return []
    if value == "all":
        return list(range(depth))
    if isinstance(value, bool):
        raise ValueError("a boolean is ambiguous; use 'all' or 'none'")
    if isinstance(value, int):
        if not 0 <= value <= depth:
            raise ValueError(f"block count must be in [0, depth={depth}]")
        return list(range(value))
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError("a fraction of the depth must be in [0, 1]")
        return list(range(math.floor(value * depth + 0.5)))
    if isinstance(value, (list, tuple, ListConfig)):
        indices = list(value)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
        bad += [i for i in indices if i not in bad and not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} are not in [0, {depth - 1}]")
        if len(set(indices)) != len(indices):
            raise ValueError("repeated block index")
        return sorted(indices)
    raise ValueError(
        "expected 'all', 'none', a fraction in [0, 1], a block count, or a list of block indices"
    )


class Provenance:
    """Remembers which source (file or command line) set each key last."""

    def __init__(self) -> None:
        self._sources: list[tuple[str, set[str]]] = []

    def add(self, label: str, cfg: DictConfig) -> None:
        self._sources.append((label, set(_flat_keys(cfg))))

    def source_of(self, key: str) -> str:
        for label, keys in reversed(self._sources):
            if key in keys:
                return label
        return "defaults of the schema"


def _flat_keys(cfg: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(cfg, DictConfig):
        for k, v in cfg.items_ex(resolve=False):
            full = f"{prefix}{k}"
            yield full
            yield from _flat_keys(v, f"{full}.")


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, DictConfig]]:
    """Read a file and, first, every file it extends (depth first, in order)."""
    if not path.is_file():
        origin = f" (extended from {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{origin}")
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    parents = raw.pop(EXTENDS_KEY, [])
    parents = [parents] if isinstance(parents, str) else parents
    sources: list[tuple[str, DictConfig]] = []
    for parent in parents:
        sources += _read_yaml((path.parent / parent).resolve(), (*chain, path))
    sources.append((str(path), OmegaConf.create(raw)))
    return sources


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """`key=value` overrides as one config. Each is parsed alone first, so that a value that
    is not valid YAML is reported with its key: the parser's own error names only a line and
    column of an anonymous string."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            key, _, value = override.partition("=")
            reason = str(err).splitlines()[0]
            raise ConfigError(f"command line: {key}={value!r}: not valid YAML ({reason})") from err
    return OmegaConf.from_dotlist(list(overrides))


def load_schema(
    schema: type[Schema], path: str | Path | None, overrides: Sequence[str]
) -> tuple[Schema, Provenance]:
    """Any dataclass schema filled from a YAML file (and the files it extends) and
    `a.b=value` overrides, with the provenance of every key for validation messages."""
    sources = _read_yaml(Path(path).resolve(), ()) if path is not None else []
    if overrides:
        sources.append(("command line", _parse_overrides(overrides)))
    merged = OmegaConf.structured(schema)
    provenance = Provenance()
    for label, cfg in sources:
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as err:
            value = OmegaConf.select(cfg, err.full_key, default=None)
            reason = str(err.msg).splitlines()[0]
            raise ConfigError(f"{label}: {err.full_key}={value!r}: {reason}") from err
        provenance.add(label, cfg)
    return OmegaConf.to_object(merged), provenance


def raise_problems(problems: list[tuple[str, Any, str]], provenance: Provenance, what: str) -> None:
    """One error listing every problem with the source that set the key."""
    if problems:
        lines = [f"{provenance.source_of(k)}: {k}={v!r}: {p}" for k, v, p in problems]
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(lines))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with the files it extends) and apply `a.b=value` overrides."""
    config, provenance = load_schema(Config, path, overrides)
    problems = [(f"model.{k}", v, p) for k, v, p in model_problems(config.model)]
    raise_problems(problems + training_problems(config), provenance, "config")
    return config


def load_model_config(path: str | Path) -> ModelConfig:
    """The `model` section of a config file, validated alone: a file that names an
    architecture (for reading weights) need not hold a trainable recipe around it."""
    config, provenance = load_schema(Config, path, ())
    problems = [(f"model.{k}", v, p) for k, v, p in model_problems(config.model)]
    raise_problems(problems, provenance, "model config")
    return config.model


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def model_problems(m: ModelConfig) -> list[tuple[str, Any, str]]:
    """Every impossible value of a model config, as (key, value, what is wrong)."""
    out = range_problems(m, MODEL_RANGES)
    if m.num_heads > 0 and m.embed_dim % m.num_heads:
        out.append(("num_heads", m.num_heads, f"must divide embed_dim={m.embed_dim}"))
    if m.patch_size > 0 and m.img_size % m.patch_size:
        out.append(("img_size", m.img_size, f"must be a multiple of patch_size={m.patch_size}"))
    if m.ffn_layer not in FFN_LAYERS:
        out.append(("ffn_layer", m.ffn_layer, f"must be one of {list(FFN_LAYERS)}"))
    if m.attn_backend not in ATTN_BACKENDS:
        out.append(("attn_backend", m.attn_backend, f"must be one of {list(ATTN_BACKENDS)}"))
    if m.specialize.tokens not in PREFIX_TOKENS:
        out.append(("specialize.tokens", m.specialize.tokens, f"must be one of {PREFIX_TOKENS}"))
    for name in ("norm1", "qkv", "proj", "norm2", "ffn_in", "ffn_out"):
        key = f"{name}_blocks"
        value = getattr(m.specialize, key)
        try:
            resolve_blocks(value, max(m.depth, 0))
        except ValueError as err:
            out.append((f"specialize.{key}", value, f"{err} (depth={m.depth})"))
    return out


DATASETS = ("synthetic", "imagenet", "folder", "list")
CENTERINGS = ("softmax", "sinkhorn_knopp")
MASK_STRATIFICATIONS = ("rank", "global")
COMPILE_MODES = ("auto", "on", "off")
PRECISIONS = ("auto", "bf16", "fp32")


def compile_mode(value: str) -> str | None:
    """`train.compile` as one of COMPILE_MODES, or None if it is none of them.

    YAML reads an unquoted on/off as a boolean, which reaches this string field as
    'True'/'False'; those mean on/off, so `compile: on` works as written.
    """
    mode = {"True": "on", "False": "off"}.get(value, value)
    return mode if mode in COMPILE_MODES else None


def training_problems(c: Config) -> list[tuple[str, Any, str]]:
    """Impossible values outside the model, as (key, value, what is wrong)."""
    out = range_problems(c, TRAINING_RANGES)
    if c.data.dataset not in DATASETS:
        out.append(("data.dataset", c.data.dataset, f"must be one of {list(DATASETS)}"))
    if c.data.dataset != "synthetic" and not c.data.path:
        out.append(("data.path", c.data.path, f"is required for dataset '{c.data.dataset}'"))
    if c.train.centering not in CENTERINGS:
        out.append(("train.centering", c.train.centering, f"must be one of {list(CENTERINGS)}"))
    if c.ibot.mask_stratification not in MASK_STRATIFICATIONS:
        choices = list(MASK_STRATIFICATIONS)
        out.append(("ibot.mask_stratification", c.ibot.mask_stratification, f"one of {choices}"))
    if compile_mode(c.train.compile) is None:
        out.append(("train.compile", c.train.compile, f"must be one of {list(COMPILE_MODES)}"))
    if c.train.precision not in PRECISIONS:
        out.append(("train.precision", c.train.precision, f"must be one of {list(PRECISIONS)}"))
    for key in ("crops.global_crops_size", "crops.local_crops_size"):
        size = attrgetter(key)(c)
        if c.model.patch_size > 0 and size % c.model.patch_size:
            out.append((key, size, f"must be a multiple of patch_size={c.model.patch_size}"))
    if c.optim.warmup_epochs > c.optim.epochs:
        out.append(
            ("optim.warmup_epochs", c.optim.warmup_epochs, f"exceeds optim.epochs={c.optim.epochs}")
        )
    warmups = c.optim.head_warmup_epochs + c.optim.backbone_warmup_epochs
    if c.train.pretrained_weights and warmups > c.optim.epochs:
        message = f"+ optim.backbone_warmup_epochs exceeds optim.epochs={c.optim.epochs}"
        out.append(("optim.head_warmup_epochs", c.optim.head_warmup_epochs, message))
    return out


def data_path_problems(data: DataConfig) -> list[str]:
    """What is wrong with the dataset location (`data.path`), each as one line naming the key
    and the path, without listing the dataset (a login node must answer in seconds even for
    ImageNet-22k on network storage).

    load_config does not call this: a config must load where its data is not (`dinospec
    info`, analysis of a copied run directory, tests). Training calls it where it builds its
    dataset (`build_image_dataset`), which every entry point goes through, and raises a
    ConfigError; the launchers make the same check on the submitting machine before anything
    is submitted (`launch.jobs`).
    """
    if data.dataset == "synthetic":
        return []
    path = Path(data.path)
    if data.dataset == "list":
        return [] if path.is_file() else [f"data.path={data.path}: image list file not found"]
    root = path / "train" if data.dataset == "imagenet" else path
    if not root.is_dir():
        return [f"data.path={data.path}: {root} is not a directory"]
    if next(root.iterdir(), None) is None:
        return [f"data.path={data.path}: {root} is empty"]
    return []
