"""Configuration of evaluation jobs: dataclass schema, YAML files, `key=value` overrides.

Evaluation configs load exactly like training configs (files may `extends:` each other,
overrides come last) and fail the same way: an unknown key, a wrong type or a value that
cannot work is reported with the file (or the command line) that set it, before a backbone
is loaded or an image is read. The allowed values of every numeric key are declared in
EVAL_RANGES, with the same kinds of ranges as dinospec.config's tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinospec.config import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Allowed,
    Each,
    OneOf,
    Range,
    load_schema,
    raise_problems,
    range_problems,
)
from eval.linear_cls import LR_GRID

SEG_KINDS = ("ade20k", "camvid", "folder_pairs")
CLS_KINDS = ("imagenet", "class_folders")
DEPTH_KINDS = ("nyu", "depth_folders")
DATASET_KINDS = SEG_KINDS + CLS_KINDS + DEPTH_KINDS
N_LAYERS = (1, 4)
FOLDER_KEYS = ("train_images", "train_labels", "val_images", "val_labels")
FOLDER_PAIR_KEYS = (*FOLDER_KEYS, "class_file")


@dataclass
class BackboneSource:
    """`path`: a training run directory (its exported teacher), a `.pth` or a `.safetensors`.
    `model_config`: a dinospec YAML whose `model` section describes the architecture, for
    files that do not carry one; `num_heads` helps infer it from bare DINOv2 weights."""

    path: str | None = None
    model_config: str | None = None
    num_heads: int | None = None


@dataclass
class DatasetSource:
    """Where images come from. Segmentation: ade20k / camvid (`root` + splits) or
    folder_pairs (explicit folders + `class_file`). Classification: imagenet or
    class_folders, both `root/<split>/<class>/<image>`; `class_file` optionally names the
    classes in sorted-folder order. Depth: nyu (`root` + split files named by the splits)
    or depth_folders (the `*_labels` folders hold the 16-bit PNG depth maps), depth maps
    storing depth in metres x `depth_scale`. The limits take an evenly spaced subset, for
    quick runs."""

    kind: str = "camvid"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_images: str | None = None
    train_labels: str | None = None
    val_images: str | None = None
    val_labels: str | None = None
    class_file: str | None = None
    first_class_value: int = 0
    ignore_values: list[int] = field(default_factory=lambda: [255])
    max_train_images: int | None = None
    max_val_images: int | None = None
    train_per_class: int | None = None
    val_per_class: int | None = None
    depth_scale: float = 1000.0
    num_workers: int = 2


@dataclass
class SegSettings:
    """The linear segmentation protocol of SPEC section 5; defaults are the ADE20K recipe.

    `cache_features` trains on features computed once from un-augmented centre crops
    (affordable on a CPU); otherwise every iteration runs the backbone on an augmented crop.
    """

    iterations: int = 40_000
    batch_size: int = 16
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-3
    warmup_iterations: int = 1500
    crop_size: int = 512
    stride: int = 341
    base_size: int = 512
    n_layers: int = 1
    multiscale: bool = False
    flip: bool = False
    cache_features: bool = False
    num_visualized: int = 4


@dataclass
class ClsSettings:
    """k-NN and linear classification (SPEC section 5) on features computed once."""

    n_last_blocks: int = 1
    avgpool: bool = False
    image_size: int = 224
    resize_size: int = 256
    feature_batch_size: int = 64
    knn: bool = True
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    linear: bool = True
    lrs: list[float] = field(default_factory=lambda: list(LR_GRID))
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    holdout_fraction: float = 0.1


@dataclass
class DepthSettings:
    """DINOv2's linear depth probe (eval.run_depth); defaults are its NYU Depth v2 recipe:
    AdamW, linear warm-up from 0.001x then cosine, gradients clipped at norm 35, random
    `crop_size` (H, W) views, whole-image test with a horizontal flip. `batch_size` is the
    global batch (DINOv2's configs give 2 per GPU without the GPU count; 16 assumes 8)."""

    iterations: int = 38_400
    batch_size: int = 16
    lr: float = 1.0e-4
    weight_decay: float = 1.0e-2
    warmup_iterations: int = 12_800
    grad_clip: float = 35.0
    crop_size: list[int] = field(default_factory=lambda: [416, 544])
    n_layers: int = 1
    n_bins: int = 256
    min_depth: float = 1.0e-3
    max_depth: float = 10.0
    gradient_loss_weight: float = 0.5
    flip: bool = True
    num_visualized: int = 4


@dataclass
class EvalConfig:
    backbone: BackboneSource = field(default_factory=BackboneSource)
    dataset: DatasetSource = field(default_factory=DatasetSource)
    seg: SegSettings = field(default_factory=SegSettings)
    cls: ClsSettings = field(default_factory=ClsSettings)
    depth: DepthSettings = field(default_factory=DepthSettings)
    output_dir: str = "outputs/eval"
    device: str = "cpu"
    seed: int = 0


EVAL_RANGES: dict[str, Allowed] = {
    "backbone.num_heads": COUNT,
    "dataset.first_class_value": NON_NEGATIVE,
    "dataset.ignore_values": Each(NON_NEGATIVE, may_be_empty=True),
    "dataset.max_train_images": COUNT,
    "dataset.max_val_images": COUNT,
    "dataset.train_per_class": COUNT,
    "dataset.val_per_class": COUNT,
    "dataset.depth_scale": POSITIVE,
    "dataset.num_workers": NON_NEGATIVE,
    "seg.iterations": COUNT,
    "seg.batch_size": COUNT,
    "seg.lr": POSITIVE,
    "seg.weight_decay": NON_NEGATIVE,
    "seg.warmup_iterations": NON_NEGATIVE,
    "seg.crop_size": COUNT,
    "seg.stride": COUNT,
    "seg.base_size": COUNT,
    "seg.n_layers": OneOf(N_LAYERS),
    "seg.num_visualized": NON_NEGATIVE,
    "cls.n_last_blocks": OneOf(N_LAYERS),
    "cls.image_size": COUNT,
    "cls.resize_size": COUNT,
    "cls.feature_batch_size": COUNT,
    "cls.ks": Each(COUNT),
    "cls.temperature": POSITIVE,
    "cls.lrs": Each(POSITIVE),
    "cls.epochs": COUNT,
    "cls.batch_size": COUNT,
    "cls.holdout_fraction": Range(0, 1, open_low=True, open_high=True),
    "depth.iterations": COUNT,
    "depth.batch_size": COUNT,
    "depth.lr": POSITIVE,
    "depth.weight_decay": NON_NEGATIVE,
    "depth.warmup_iterations": NON_NEGATIVE,
    "depth.grad_clip": POSITIVE,
    "depth.crop_size": Each(COUNT),
    "depth.n_layers": OneOf(N_LAYERS),
    "depth.n_bins": Range(2),
    "depth.min_depth": POSITIVE,
    "depth.max_depth": POSITIVE,
    "depth.gradient_loss_weight": NON_NEGATIVE,
    "depth.num_visualized": NON_NEGATIVE,
    "seed": SEED,
}
"""Allowed values of every numeric key of EvalConfig (null, where the schema allows it,
means no limit)."""


def load_eval_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    """An evaluation config, validated; every problem is reported at once."""
    config, provenance = load_schema(EvalConfig, path, overrides)
    raise_problems(eval_problems(config), provenance, "evaluation config")
    return config


def eval_problems(c: EvalConfig) -> list[tuple[str, Any, str]]:
    """Every impossible value, as (key, value, what is wrong)."""
    out = range_problems(c, EVAL_RANGES)
    if not c.backbone.path:
        out.append(
            ("backbone.path", c.backbone.path, "is required (run dir, .pth or .safetensors)")
        )
    out += _dataset_problems(c.dataset)
    out += _seg_problems(c.seg)
    out += _cls_problems(c.cls)
    out += _depth_problems(c.depth)
    try:
        torch.device(c.device)
    except RuntimeError as err:
        out.append(("device", c.device, str(err).splitlines()[0]))
    return out


def _dataset_problems(d: DatasetSource) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    if d.kind not in DATASET_KINDS:
        out.append(("dataset.kind", d.kind, f"must be one of {list(DATASET_KINDS)}"))
    if d.kind in ("folder_pairs", "depth_folders"):
        keys = FOLDER_PAIR_KEYS if d.kind == "folder_pairs" else FOLDER_KEYS
        out += [
            (f"dataset.{k}", None, f"is required for kind '{d.kind}'")
            for k in keys
            if not getattr(d, k)
        ]
    elif d.kind in DATASET_KINDS and not d.root:
        out.append(("dataset.root", d.root, f"is required for kind '{d.kind}'"))
    if d.class_file and d.kind in ("ade20k", "camvid"):
        out.append(("dataset.class_file", d.class_file, f"{d.kind} has built-in class names"))
    return out


def _seg_problems(s: SegSettings) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    if s.warmup_iterations > s.iterations:
        out.append(
            ("seg.warmup_iterations", s.warmup_iterations, f"exceeds seg.iterations={s.iterations}")
        )
    if s.stride > s.crop_size:
        out.append(("seg.stride", s.stride, f"exceeds crop_size={s.crop_size}: pixels uncovered"))
    return out


def _cls_problems(s: ClsSettings) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    if s.resize_size < s.image_size:
        out.append(("cls.resize_size", s.resize_size, f"is below image_size={s.image_size}"))
    if s.optimizer not in ("sgd", "adamw"):
        out.append(("cls.optimizer", s.optimizer, "must be 'sgd' or 'adamw'"))
    if not (s.knn or s.linear):
        out.append(("cls.knn", s.knn, "nothing to do: cls.knn and cls.linear are both false"))
    return out


def _depth_problems(s: DepthSettings) -> list[tuple[str, Any, str]]:
    out: list[tuple[str, Any, str]] = []
    if s.warmup_iterations > s.iterations:
        out.append(
            (
                "depth.warmup_iterations",
                s.warmup_iterations,
                f"exceeds depth.iterations={s.iterations}",
            )
        )
    if len(s.crop_size) != 2:
        out.append(("depth.crop_size", s.crop_size, "must be [height, width]"))
    if s.min_depth >= s.max_depth:
        out.append(("depth.min_depth", s.min_depth, f"is not below max_depth={s.max_depth}"))
    return out
