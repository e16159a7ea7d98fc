"""What a config's values may be: the allowed range of every numeric key, declared once in
MODEL_RANGES or TRAINING_RANGES (eval.config has its own table), so a new key is
validated by adding one entry there; the checks across keys; and block selections.

A value that cannot work (embed_dim not divisible by num_heads, a block index past the
depth) must fail at load time with the key, the value and the file that set it, not hours
later on a cluster.
"""

from __future__ import annotations

import math
from operator import attrgetter
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from dinospec.config.schema import (
    ATTN_BACKENDS,
    BLOCK_SUBLAYERS,
    FFN_LAYERS,
    MULTI_CROP_ATTENTIONS,
    PREFIX_TOKENS,
    Config,
    DataConfig,
    ModelConfig,
)
from dinospec.config.values import (
    BELOW_ONE,
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    UNIT,
    Allowed,
    OneOf,
    Pair,
    Range,
    range_problems,
)

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
    "gram.loss_weight": NON_NEGATIVE,
    "gram.start_iteration": NON_NEGATIVE,
    "gram.refresh_every": NON_NEGATIVE,
    "gram.upscale": Range(1),
    "distill.teacher_num_heads": COUNT,
    "evaluation.every": NON_NEGATIVE,
    "evaluation.train_per_class": COUNT,
    "evaluation.val_per_class": COUNT,
    "evaluation.image_size": COUNT,
    "evaluation.resize_size": COUNT,
    "evaluation.k": COUNT,
    "evaluation.temperature": POSITIVE,
    "evaluation.batch_size": COUNT,
    "evaluation.num_workers": NON_NEGATIVE,
    "evaluation.pca_images": NON_NEGATIVE,
    "evaluation.seg.max_train_images": COUNT,
    "evaluation.seg.max_val_images": COUNT,
    "evaluation.seg.crop_size": COUNT,
    "evaluation.seg.n_layers": OneOf((1, 4)),
    "evaluation.seg.iterations": COUNT,
    "evaluation.seg.batch_size": COUNT,
    "evaluation.seg.lr": POSITIVE,
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
    if m.multi_crop_attention not in MULTI_CROP_ATTENTIONS:
        allowed = list(MULTI_CROP_ATTENTIONS)
        out.append(("multi_crop_attention", m.multi_crop_attention, f"must be one of {allowed}"))
    if m.specialize.tokens not in PREFIX_TOKENS:
        out.append(("specialize.tokens", m.specialize.tokens, f"must be one of {PREFIX_TOKENS}"))
    for name in BLOCK_SUBLAYERS:
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
GRAM_CLIPS = ("none", "teacher", "both")
EVAL_DATASETS = ("none", "imagenet", "synthetic")
EVAL_SEG_DATASETS = ("none", "synthetic", "camvid", "ade20k")


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
    out += gram_problems(c)
    out += evaluation_problems(c)
    if c.train.previous_phase and c.train.pretrained_weights:
        message = "a run starts from train.pretrained_weights or from a previous phase, not both"
        out.append(("train.previous_phase", c.train.previous_phase, message))
    warmups = c.optim.head_warmup_epochs + c.optim.backbone_warmup_epochs
    if c.train.pretrained_weights and warmups > c.optim.epochs:
        message = f"+ optim.backbone_warmup_epochs exceeds optim.epochs={c.optim.epochs}"
        out.append(("optim.head_warmup_epochs", c.optim.head_warmup_epochs, message))
    return out


def gram_problems(c: Config) -> list[tuple[str, Any, str]]:
    """A Gram teacher is a snapshot of a trained teacher: taken at iteration 0 of a run
    that starts from a random init it would anchor the student to noise."""
    g = c.gram
    out = []
    if g.clip_negative not in GRAM_CLIPS:
        out.append(("gram.clip_negative", g.clip_negative, f"must be one of {list(GRAM_CLIPS)}"))
    if g.loss_weight > 0 and g.start_iteration == 0 and not c.train.pretrained_weights:
        out.append(
            (
                "gram.start_iteration",
                0,
                "would make the Gram teacher a snapshot of the random initialization: start it "
                "once the run has trained (DINOv3: after 1M iterations), or start this run from "
                "trained weights (train.pretrained_weights, e.g. an earlier run's directory)",
            )
        )
    size = c.crops.global_crops_size * g.upscale
    patch = c.model.patch_size
    if g.loss_weight > 0 and g.upscale > 1 and (size != int(size) or size % patch):
        out.append(
            (
                "gram.upscale",
                g.upscale,
                f"makes Gram teacher crops of {c.crops.global_crops_size} x {g.upscale} = {size:g} "
                f"px, not a whole number of {patch} px patches (crops.global_crops_size x "
                f"gram.upscale must be a multiple of model.patch_size)",
            )
        )
    return out


def gram_crops_size(c: Config) -> int | None:
    """Side of the Gram teacher's high-resolution crops (DINOv3's gram_teacher_crops_size),
    or None when the Gram teacher takes the global crops themselves: with the term off or
    at `gram.upscale` 1 the data pipeline makes no extra crops."""
    if c.gram.loss_weight <= 0 or c.gram.upscale <= 1:
        return None
    return round(c.crops.global_crops_size * c.gram.upscale)


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


def evaluation_problems(c: Config) -> list[tuple[str, Any, str]]:
    """The evaluation during training: known datasets, a path where one is read, sizes the
    patch grid divides (a probe needs whole patches)."""
    e, patch = c.evaluation, c.model.patch_size
    out = []
    for prefix, section, known in (
        ("evaluation", e, EVAL_DATASETS),
        ("evaluation.seg", e.seg, EVAL_SEG_DATASETS),
    ):
        if section.dataset not in known:
            out.append((f"{prefix}.dataset", section.dataset, f"must be one of {list(known)}"))
        elif section.dataset not in ("none", "synthetic") and not section.path:
            message = f"is required for {prefix}.dataset={section.dataset!r}"
            out.append((f"{prefix}.path", section.path, message))
    if e.dataset != "none" and e.resize_size < e.image_size:
        out.append(("evaluation.resize_size", e.resize_size, f"is below image_size={e.image_size}"))
    sizes = [
        ("evaluation.image_size", e.image_size, e.dataset),
        ("evaluation.seg.crop_size", e.seg.crop_size, e.seg.dataset),
    ]
    for key, size, dataset in sizes:
        if dataset != "none" and patch > 0 and size % patch:
            out.append((key, size, f"must be a multiple of model.patch_size={patch}"))
    return out


def evaluation_path_problems(c: Config) -> list[str]:
    """What is missing of the evaluation's data (the counterpart of data_path_problems):
    the class folders of both k-NN splits and the probe's dataset root, checked by the
    launchers before submitting and by training before its first step."""
    e = c.evaluation
    found = []
    if e.dataset == "imagenet":
        for split in (e.train_split, e.val_split):
            folder = Path(e.path) / split
            if not folder.is_dir():
                found.append(f"evaluation.path={e.path}: {folder} is not a directory")
    if e.seg.dataset not in ("none", "synthetic") and not Path(e.seg.path).is_dir():
        found.append(f"evaluation.seg.path={e.seg.path}: not a directory")
    return found
