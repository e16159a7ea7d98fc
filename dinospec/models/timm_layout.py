"""timm's DINOv2 ViTs (`vit_*_patch14_dinov2`, `vit_*_patch14_reg4_dinov2`) <-> DINOv2 keys.

timm keeps DINOv2's module names but differs in three places: register tokens are
`reg_token`; register models hold no position for [CLS] (`no_embed_class=True`: its
position is already added into `cls_token`); and SwiGLU is `mlp.fc1`/`mlp.fc2` (timm's
`SwiGLUPacked`, the gate in the first half as in DINOv2's `w12`). timm has no
`mask_token`. Each conversion below is exact: `cls_token + pos_embed[:, :1]` is the very
addition DINOv2 performs in its forward pass, so moving it into the token changes no bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dinospec.config import ModelConfig
from dinospec.models.architecture import ffn_hidden, refuse_unless_plain_vit

StateDict = dict[str, Tensor]

REG_TOKEN = "reg_token"
RELEASED_NAMES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


def is_timm_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """timm's own keys: `reg_token`, packed SwiGLU in `fc1`/`fc2`, or no [CLS] position.
    A vanilla MLP model without registers has DINOv2's keys exactly and reads as such."""
    fc1, fc2 = state_dict.get("blocks.0.mlp.fc1.weight"), state_dict.get("blocks.0.mlp.fc2.weight")
    packed = fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]
    return REG_TOKEN in state_dict or packed or _lacks_class_position(state_dict)


def _lacks_class_position(state_dict: Mapping[str, Tensor]) -> bool:
    pos = state_dict.get("pos_embed")
    if pos is None:
        return False
    n = pos.shape[1]
    return math.isqrt(n) ** 2 == n and math.isqrt(n - 1) ** 2 != n - 1


def from_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """DINOv2's keys and layout for a timm DINOv2 ViT state dict (no `mask_token`)."""
    out = dict(state_dict)
    if REG_TOKEN in out:
        out["register_tokens"] = out.pop(REG_TOKEN)
    if _lacks_class_position(out):
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    for key in [k for k in out if k.endswith(".mlp.fc1.weight")]:
        block = key.removesuffix(".fc1.weight")
        if out[key].shape[0] == 2 * out[f"{block}.fc2.weight"].shape[1]:
            for suffix in ("weight", "bias"):
                if f"{block}.fc1.{suffix}" in out:
                    out[f"{block}.w12.{suffix}"] = out.pop(f"{block}.fc1.{suffix}")
                if f"{block}.fc2.{suffix}" in out:
                    out[f"{block}.w3.{suffix}"] = out.pop(f"{block}.fc2.{suffix}")
    return out


def to_timm(state_dict: Mapping[str, Tensor], config: ModelConfig) -> StateDict:
    """timm's keys and layout for a vanilla dinospec backbone (see `timm_model_args`)."""
    refuse_unless_plain_vit(config, "timm", "timm's DINOv2 ViT")
    out = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if config.num_register_tokens:
        out[REG_TOKEN] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:].clone()
    if config.ffn_layer != "mlp":
        for key in [k for k in out if ".mlp.w12." in k or ".mlp.w3." in k]:
            new = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
            out[new] = out.pop(key)
    return out


def timm_model_args(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of `timm.create_model` that build the exported model (model
    name, then overrides), as text a user can paste: `mlp_layer` and `act_layer` name
    timm's classes."""
    registers = config.num_register_tokens
    size = RELEASED_NAMES.get(config.embed_dim, "small")
    name = f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2"
    args: dict[str, Any] = {
        "model_name": name,
        "pretrained": False,
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "num_heads": config.num_heads,
        "qkv_bias": config.qkv_bias,
        "init_values": config.init_values,
        "reg_tokens": registers,
        "no_embed_class": bool(registers),
    }
    if config.ffn_layer == "mlp":
        args["mlp_ratio"] = config.mlp_ratio
    else:
        # half a unit over, so that timm's int(embed_dim * mlp_ratio) cannot round down
        args["mlp_ratio"] = (2 * ffn_hidden(config) + 0.5) / config.embed_dim
        args["mlp_layer"] = "timm.layers.SwiGLUPacked"
        args["act_layer"] = "torch.nn.SiLU"
    return args
