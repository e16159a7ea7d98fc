"""Backbone weight files: official DINOv2 `.pth`, dinospec exports, safetensors.

A checkpoint must never run code, so `.pth` files are read with `weights_only=True` and
everything else is safetensors. Loading checks the architecture before touching the model
and lists every missing, unexpected or mis-shaped key at once.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dinospec.config import ModelConfig, SpecializeConfig
from dinospec.models.convert import fill_prefix_path, infer_model_config
from dinospec.models.vit import DinoVisionTransformer, build_backbone

StateDict = dict[str, Tensor]
CONFIG_METADATA_KEY = "dinospec_model_config"
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_ARCH_FIELDS = (
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "ffn_layer",
    "num_register_tokens",
)


class CheckpointError(RuntimeError):
    """A weight file that cannot be read or does not fit the model; says which and why."""


def read_weights(path: str | Path) -> tuple[StateDict, ModelConfig | None]:
    """The backbone state dict in a file, and the model config stored with it if any.

    Accepts a plain state dict (as published for torch hub), a DINOv2 training checkpoint
    (`{"model": {"teacher.backbone.*": ...}}`, chunked blocks included) and safetensors
    files written by `save_backbone`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: holds Python objects besides tensors; refusing to unpickle them "
            f"(weights_only=True): {err}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt: {err}") from err
    return _backbone_state_dict(obj, path), None


def _read_safetensors(path: Path) -> tuple[StateDict, ModelConfig | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt: {err}") from err
    stored = metadata.get(CONFIG_METADATA_KEY)
    return state_dict, _config_from_json(stored) if stored else None


def _config_from_json(text: str) -> ModelConfig:
    fields = json.loads(text)
    fields["specialize"] = SpecializeConfig(**fields["specialize"])
    return ModelConfig(**fields)


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
) -> DinoVisionTransformer:
    """Load backbone weights from a file into `model`, or into a model built from `model`
    (a config), from the config stored in the file, or from the architecture inferred from
    the weights (`num_heads` defaults to 64-dimensional heads, as in every DINOv2 size).

    A vanilla file loaded into a specialized model fills the prefix path from the shared
    weights, which leaves the function unchanged.
    """
    state_dict, stored = read_weights(path)
    if isinstance(model, DinoVisionTransformer):
        target = model
    else:
        config = model or stored or infer_model_config(state_dict, num_heads)
        if stored is not None:
            _check_same_architecture(config, stored, path)
        target = build_backbone(config)
    load_state_dict_checked(target, state_dict, source=str(path))
    return target


def _check_same_architecture(config: ModelConfig, stored: ModelConfig, path: str | Path) -> None:
    diffs = [
        f"{k}: file {getattr(stored, k)!r} vs config {getattr(config, k)!r}"
        for k in _ARCH_FIELDS
        if getattr(stored, k) != getattr(config, k)
    ]
    if diffs:
        raise CheckpointError(f"{path}: architecture differs from the config: {'; '.join(diffs)}")


def load_state_dict_checked(
    model: DinoVisionTransformer, state_dict: Mapping[str, Tensor], source: str = "state dict"
) -> None:
    """Strict load that reports every problem at once, before changing any weight."""
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
