"""Vanilla -> specialized conversion that preserves the function exactly.

A trained vanilla backbone becomes a specialized one by copying each shared sublayer into
its new prefix path: both paths then compute what the shared layer computed, so outputs are
unchanged, and further training lets the two paths drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from dinospec.config import SpecializeConfig
from dinospec.models.architecture import shapes_architecture
from dinospec.models.sublayers import SPECIALIZED
from dinospec.models.vit import DinoVisionTransformer, build_backbone

StateDict = dict[str, Tensor]


def fill_prefix_path(state_dict: Mapping[str, Tensor], model: DinoVisionTransformer) -> StateDict:
    """Copy shared weights into every prefix parameter of `model` the state dict lacks."""
    filled = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, SPECIALIZED):
            continue
        for param in ("weight", "bias"):
            shared, prefix = f"{name}.{param}", f"{name}.prefix_{param}"
            if prefix not in filled and shared in filled:
                filled[prefix] = filled[shared].clone()
    return filled


def specialize_backbone(
    model_or_state_dict: DinoVisionTransformer | Mapping[str, Tensor],
    spec: SpecializeConfig | dict,
) -> DinoVisionTransformer | StateDict:
    """A specialized twin of a vanilla (or less specialized) backbone, same function.

    Given a model, returns a new model (same device, dtype and train/eval mode); given a
    state dict, returns the state dict with the prefix parameters added.
    """
    if isinstance(spec, dict):
        spec = SpecializeConfig(**spec)
    if isinstance(model_or_state_dict, DinoVisionTransformer):
        source = model_or_state_dict
        target = build_backbone(replace(source.config, specialize=spec))
        _check_superset(source.state_dict().keys(), target)
        target.load_state_dict(fill_prefix_path(source.state_dict(), target), strict=True)
        first = next(source.parameters())
        return target.to(device=first.device, dtype=first.dtype).train(source.training)
    # only the keys matter here, and heads leave no trace in them
    config = replace(shapes_architecture(model_or_state_dict, "state dict"), num_heads=1)
    with torch.device("meta"):
        target = build_backbone(replace(config, specialize=spec))
    _check_superset(model_or_state_dict.keys(), target)
    return fill_prefix_path(model_or_state_dict, target)


def _check_superset(source_keys: Iterable[str], target: DinoVisionTransformer) -> None:
    """Dropping a prefix path would change the function, so it is refused."""
    dropped = sorted(set(source_keys) - set(target.state_dict()))
    if dropped:
        raise ValueError(
            "the new specialization drops prefix parameters the backbone already has, which "
            f"would change its function: {dropped[:8]}{' ...' if len(dropped) > 8 else ''}"
        )
