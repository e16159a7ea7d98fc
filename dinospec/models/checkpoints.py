"""Backbone weight files in every layout dinospec reads: DINOv2's torch-hub state dicts and
training checkpoints, timm's DINOv2 ViTs, Hugging Face `Dinov2Model` /
`Dinov2WithRegistersModel` (a directory or its weight file) and dinospec's exports.

A checkpoint must never run code, so `.pth`/`.bin` files are read with `weights_only=True`
and everything else is safetensors. The layout is recognised from the keys and converted
to DINOv2's keys; the architecture is read from the file and checked against the config
(heads: see dinospec.models.architecture); every missing, unexpected or mis-shaped key is
listed at once, before the model is touched.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dinospec.config import ModelConfig, SpecializeConfig
from dinospec.models.architecture import (
    FileArchitecture,
    architecture_problems,
    shapes_architecture,
    with_heads,
)
from dinospec.models.convert import fill_prefix_path
from dinospec.models.errors import CheckpointError
from dinospec.models.hf_layout import from_hf, hf_architecture, is_hf_layout
from dinospec.models.timm_layout import from_timm, is_timm_layout
from dinospec.models.vit import DinoVisionTransformer, build_backbone

__all__ = [
    "CheckpointError",
    "Weights",
    "load_backbone",
    "load_weights",
    "read_weights",
    "save_backbone",
]

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
CONFIG_METADATA_KEY = "dinospec_model_config"
HF_CONFIG = "config.json"
SHARD_INDEX = ".safetensors.index.json"
HF_WEIGHTS = ("model.safetensors", f"model{SHARD_INDEX}", "pytorch_model.bin")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


@dataclass
class Weights:
    """A backbone read from a file: its state dict in DINOv2's layout, what the file says
    about the architecture, the layout it was stored in, and what had to be supplied."""

    state_dict: StateDict
    architecture: FileArchitecture
    layout: str
    source: str
    notes: list[str] = field(default_factory=list)


def read_weights(path: str | Path) -> Weights:
    """The backbone in a weight file or a Hugging Face model directory, in DINOv2's layout.

    Layouts: a plain state dict (torch hub, dinospec `.pth`), a DINOv2 training checkpoint
    (`{"model": {"teacher.backbone.*": ...}}`, chunked blocks included), a timm DINOv2 ViT,
    an HF DINOv2 model (safetensors, sharded or not, or `.bin`; `config.json` beside it
    gives the head count and is checked against the tensors), and dinospec safetensors
    (the model config in the metadata).
    """
    path = Path(path)
    if path.is_dir():
        return read_weights(hf_weight_file(path))
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.name.endswith(SHARD_INDEX):
        return _converted(_read_sharded(path), path)
    if path.suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        stored = metadata.get(CONFIG_METADATA_KEY)
        if stored:
            return _dinospec_weights(tensors, _config_from_json(stored, path), str(path))
    else:
        tensors = _backbone_state_dict(_torch_load(path), path)
    return _converted(tensors, path)


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: holds Python objects besides tensors; refusing to unpickle them "
            f"(weights_only=True): {err}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt: {err}") from err


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt: {err}") from err
    return state_dict, metadata


def _config_from_json(text: str, path: Path) -> ModelConfig:
    """The model config a dinospec file records. A field this version does not know (a
    file from a newer dinospec) is named rather than dropped: the weights may need it."""
    where = f"{path}: metadata {CONFIG_METADATA_KEY!r}"
    try:
        stored = json.loads(text)
        specialize = stored["specialize"]
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{where} is not a model config ({err!r})") from err
    for cls, given, prefix in (
        (ModelConfig, stored, "model."),
        (SpecializeConfig, specialize, "model.specialize."),
    ):
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(
                f"{where} has fields this dinospec does not know: "
                f"{', '.join(prefix + key for key in unknown)} (written by a newer version?)"
            )
    return ModelConfig(**{**stored, "specialize": SpecializeConfig(**specialize)})


def _dinospec_weights(tensors: StateDict, stored: ModelConfig, source: str) -> Weights:
    shapes = shapes_architecture(tensors, source)
    return Weights(tensors, FileArchitecture(shapes, stored=stored), "dinospec", source)


def hf_weight_file(directory: Path) -> Path:
    """The weight file of an HF model directory (`config.json` beside it)."""
    found = [directory / name for name in HF_WEIGHTS if (directory / name).is_file()]
    if not found:
        raise CheckpointError(
            f"{directory}: a directory without {' or '.join(HF_WEIGHTS)} (nor a training "
            "run directory with an exported teacher)"
        )
    return found[0]


def _read_sharded(index: Path) -> StateDict:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: unreadable shard index: {err}") from err
    tensors: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_read_safetensors(index.parent / shard)[0])
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index}: tensors listed but in no shard: {missing[:8]}")
    return tensors


def _converted(tensors: StateDict, path: Path) -> Weights:
    """Recognise the layout by its keys and bring it to DINOv2's."""
    if is_hf_layout(tensors):
        state_dict, layout = from_hf(tensors), "hf"
    elif is_timm_layout(tensors):
        state_dict, layout = from_timm(tensors), "timm"
    else:
        state_dict, layout = dict(tensors), "hub"
    notes = _fill_mask_token(state_dict, str(path))
    return Weights(
        state_dict, _file_architecture(state_dict, layout, path), layout, str(path), notes
    )


def _file_architecture(state_dict: StateDict, layout: str, path: Path) -> FileArchitecture:
    """The shapes' architecture with the position resizing of the library that wrote the
    file (timm: to the new grid, antialiased; HF: to the new grid, antialiased with
    registers) and, for HF, the head count of the `config.json` beside it, checked."""
    shapes = shapes_architecture(state_dict, str(path))
    if layout == "timm":
        return FileArchitecture(replace(shapes, interpolate_offset=0.0, interpolate_antialias=True))
    if layout != "hf":
        return FileArchitecture(shapes)
    registers = shapes.num_register_tokens > 0
    shapes = replace(shapes, interpolate_offset=0.0, interpolate_antialias=registers)
    config_path = path.parent / HF_CONFIG
    if not config_path.is_file():
        return FileArchitecture(shapes)
    try:
        hf_config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_path}: unreadable: {err}") from err
    shapes = hf_architecture(hf_config, shapes, f"{config_path} (for {path.name})")
    return FileArchitecture(shapes, num_heads=shapes.num_heads)


def _fill_mask_token(state_dict: StateDict, source: str) -> list[str]:
    """DINOv2 starts `mask_token` at zeros and only iBOT's masked patches use it, so a
    file without one (timm never has one) gets zeros, and says so."""
    if "mask_token" in state_dict or "cls_token" not in state_dict:
        return []
    cls = state_dict["cls_token"]
    state_dict["mask_token"] = cls.new_zeros(1, cls.shape[-1])
    return [f"{source}: no mask_token; initialised to zeros, as DINOv2 initialises it"]


def _backbone_state_dict(obj: object, path: Path) -> StateDict:
    """Find the backbone inside the known checkpoint layouts and undo block chunking."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = {
            k.removeprefix("teacher.backbone."): v
            for k, v in obj["model"].items()
            if k.startswith("teacher.backbone.")
        }
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no backbone state dict found (got {type(obj).__name__})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {not_tensors[:8]}")
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in obj.items()}


def save_backbone(model: DinoVisionTransformer, path: str | Path) -> None:
    """Export a backbone: `.safetensors` keeps the model config as metadata; any other
    suffix writes a plain state dict with DINOv2 key names (loadable by DINOv2 itself)."""
    write_backbone(model.state_dict(), model.config, path)


def write_backbone(state_dict: Mapping[str, Tensor], config: ModelConfig, path: str | Path) -> None:
    """`save_backbone` for a state dict already gathered (e.g. from FSDP shards)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, path, metadata={CONFIG_METADATA_KEY: json.dumps(asdict(config))})
    else:
        torch.save(tensors, path)


def load_backbone(
    path: str | Path,
    model: DinoVisionTransformer | ModelConfig | None = None,
    num_heads: int | None = None,
    heads_key: str = "num_heads",
) -> DinoVisionTransformer:
    """Load backbone weights (any layout `read_weights` knows) into `model`, or into a model
    built from `model` (a config), or from the architecture the file records. Without a
    config, a file that records no head count takes `num_heads`; `heads_key` is the
    setting the error names when neither gives one (e.g. `backbone.num_heads`).

    A vanilla file loaded into a specialized model fills the prefix paths from the shared
    weights, which leaves the function unchanged.
    """
    return load_weights(read_weights(path), model, num_heads, heads_key)


def load_weights(
    weights: Weights,
    model: DinoVisionTransformer | ModelConfig | None = None,
    num_heads: int | None = None,
    heads_key: str = "num_heads",
) -> DinoVisionTransformer:
    """`load_backbone` for weights already read."""
    if isinstance(model, DinoVisionTransformer):
        target = model
    else:
        config = model or with_heads(weights.architecture, num_heads, weights.source, heads_key)
        target = build_backbone(config)
    problems = architecture_problems(weights.architecture, target.config)
    load_state_dict_checked(target, weights.state_dict, weights.source, problems)
    for note in [*weights.notes, *_interpolation_notes(weights, target.config)]:
        log.warning(note)
    return target


def _interpolation_notes(weights: Weights, config: ModelConfig) -> list[str]:
    """How positions are resized is no weight, so a config may differ from the file's
    convention; features then differ from the source model's at other image sizes."""
    ours = (config.interpolate_offset, config.interpolate_antialias)
    theirs = weights.architecture.config
    if ours == (theirs.interpolate_offset, theirs.interpolate_antialias):
        return []
    return [
        f"{weights.source}: positions are resized with model.interpolate_offset="
        f"{config.interpolate_offset}, model.interpolate_antialias={config.interpolate_antialias}"
        f"; the weights' {weights.layout} convention is {theirs.interpolate_offset}, "
        f"{theirs.interpolate_antialias}: outputs equal the source model's at "
        f"{config.img_size} px, not at other sizes"
    ]


def load_state_dict_checked(
    model: DinoVisionTransformer,
    state_dict: Mapping[str, Tensor],
    source: str = "state dict",
    architecture: list[str] | None = None,
) -> None:
    """Strict load that reports every problem at once (with the `architecture`
    differences already found), before changing any weight."""
    state_dict = fill_prefix_path(state_dict, model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = [
        (title, items)
        for title, items in (
            ("architecture differs from the config", architecture or []),
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        lines = [f"  {title} ({len(items)}): {', '.join(items[:10])}" for title, items in problems]
        raise CheckpointError(f"{source} does not fit the model:\n" + "\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
