"""Vanilla -> specialized conversion that preserves the function exactly.

A trained vanilla backbone becomes a specialized one by copying each shared sublayer into
its new prefix path: both paths then compute what the shared layer computed, so outputs are
unchanged, and further training lets the two paths drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from dinospec.config import ModelConfig, SpecializeConfig
from dinospec.models.specialize import TokenSpecialized
from dinospec.models.vit import DinoVisionTransformer, build_backbone

StateDict = dict[str, Tensor]

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def fill_prefix_path(state_dict: Mapping[str, Tensor], model: DinoVisionTransformer) -> StateDict:
    """Copy shared weights into every prefix parameter of `model` the state dict lacks."""
    filled = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, TokenSpecialized):
            continue
        for param in ("weight", "bias"):
            shared, prefix = f"{name}.{param}", f"{name}.prefix_{param}"
            if prefix not in filled and shared in filled:
                filled[prefix] = filled[shared].clone()
    return filled


def infer_model_config(
    state_dict: Mapping[str, Tensor], num_heads: int | None = None
) -> ModelConfig:
    """Architecture of a DINOv2-layout state dict.

    Heads leave no trace in the weights; every DINOv2 size uses 64-dimensional heads, so
    that is assumed unless `num_heads` is given. Specialized sublayers are read from the
    `prefix_*` keys. Register models follow the hub convention (antialiased, offset 0).
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"not a DINOv2 backbone state dict: missing {missing}")
    embed_dim = state_dict["cls_token"].shape[-1]
    patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)))
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    hidden = (
        state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2
        if swiglu
        else state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    )
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    return ModelConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=state_dict["patch_embed.proj.weight"].shape[1],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or max(embed_dim // 64, 1),
        mlp_ratio=4.0 if swiglu else hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=f"blocks.0.mlp.{'w3' if swiglu else 'fc2'}.bias" in state_dict,
        ffn_layer="swiglufused" if swiglu else "mlp",
        init_values=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
        num_register_tokens=registers,
        interpolate_antialias=registers > 0,
        interpolate_offset=0.0 if registers else 0.1,
        specialize=_infer_specialization(state_dict, depth, swiglu),
    )


def _infer_specialization(
    state_dict: Mapping[str, Tensor], depth: int, swiglu: bool
) -> SpecializeConfig:
    modules = {
        "norm1": "norm1",
        "qkv": "attn.qkv",
        "proj": "attn.proj",
        "norm2": "norm2",
        "ffn_in": "mlp.w12" if swiglu else "mlp.fc1",
        "ffn_out": "mlp.w3" if swiglu else "mlp.fc2",
    }
    blocks = {
        f"{sub}_blocks": [
            i for i in range(depth) if f"blocks.{i}.{mod}.prefix_weight" in state_dict
        ]
        for sub, mod in modules.items()
    }
    return SpecializeConfig(final_norm="norm.prefix_weight" in state_dict, **blocks)


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
    config = infer_model_config(model_or_state_dict, num_heads=1)
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
