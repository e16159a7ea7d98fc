"""Hugging Face transformers' `Dinov2Model` / `Dinov2WithRegistersModel` <-> DINOv2 keys.

HF splits the fused QKV projection into `query`/`key`/`value` (transformers 5 holds them
as `q_proj`/`k_proj`/`v_proj` in memory and saves the older names, which both major
versions load) and the packed SwiGLU input into `weights_in` (in memory `gate_proj` and
`up_proj`, gate first as in DINOv2's `w12`). Splitting and concatenating rows is exact.
The head count and the library's conventions come from `config.json`, which is checked
against the tensors: a config that disagrees with them is an error naming both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from dinospec.config import ModelConfig
from dinospec.models.architecture import ffn_hidden, refuse_unless_plain_vit
from dinospec.models.errors import CheckpointError

StateDict = dict[str, Tensor]

MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
LAYER_NORM_EPS = 1e-6
"""dinospec's (and DINOv2's) LayerNorm epsilon."""

_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_RENAMED = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
_LAYER_SCALES = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_FUSED = {
    "attn.qkv": (
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
    "mlp.w12": (("mlp.gate_proj", "mlp.up_proj"),),
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def is_hf_layout(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in state_dict)


def from_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """DINOv2's keys for an HF DINOv2 state dict; unknown keys keep their names, so the
    strict load names them."""
    out: StateDict = {}
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key in _EMBEDDINGS:
            out[_EMBEDDINGS[key]] = value
            continue
        match = _LAYER.match(key)
        if match is None:
            out[key] = value
            continue
        block, rest = match.groups()
        module, _, leaf = rest.rpartition(".")
        if rest in _LAYER_SCALES:
            out[f"blocks.{block}.{_LAYER_SCALES[rest]}"] = value
        elif module in _RENAMED:
            out[f"blocks.{block}.{_RENAMED[module]}.{leaf}"] = value
        else:
            parts.setdefault((block, leaf), {})[module] = value
    for (block, leaf), pieces in parts.items():
        out.update(_fuse(block, leaf, pieces))
    return out


def _fuse(block: str, leaf: str, pieces: dict[str, Tensor]) -> StateDict:
    """One block's split projections (all `leaf`: weight or bias) concatenated; pieces
    that complete no projection keep their HF names."""
    out = {}
    for target, layouts in _FUSED.items():
        for names in layouts:
            if set(names) <= pieces.keys():
                out[f"blocks.{block}.{target}.{leaf}"] = torch.cat([pieces.pop(n) for n in names])
    out.update({f"encoder.layer.{block}.{module}.{leaf}": v for module, v in pieces.items()})
    return out


def hf_architecture(config: Mapping[str, Any], shapes: ModelConfig, source: str) -> ModelConfig:
    """The shapes' config with HF's head count and position interpolation, after checking
    every field of `config.json` that the tensors also fix."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type={model_type!r}, expected one of {list(MODEL_TYPES)}"
        )
    registers = config.get("num_register_tokens", 0) if model_type != "dinov2" else 0
    patch, image = _side(config.get("patch_size")), _side(config.get("image_size"))
    stated = {
        "hidden_size": (config.get("hidden_size"), shapes.embed_dim),
        "num_hidden_layers": (config.get("num_hidden_layers"), shapes.depth),
        "patch_size": (patch, shapes.patch_size),
        "num_channels": (config.get("num_channels", 3), shapes.in_chans),
        "image_size": (
            image // patch * patch if isinstance(image, int) and isinstance(patch, int) else image,
            shapes.img_size,
        ),
        "qkv_bias": (config.get("qkv_bias", True), shapes.qkv_bias),
        "use_swiglu_ffn": (config.get("use_swiglu_ffn", False), shapes.ffn_layer != "mlp"),
        "num_register_tokens": (registers, shapes.num_register_tokens),
    }
    problems = [
        f"{key}={ours!r} but the tensors say {theirs!r}"
        for key, (ours, theirs) in stated.items()
        if ours != theirs
    ]
    if not problems:
        hidden = ffn_hidden(replace(shapes, mlp_ratio=config.get("mlp_ratio", 4)))
        if hidden != ffn_hidden(shapes):
            problems.append(
                f"mlp_ratio={config.get('mlp_ratio')!r} gives {hidden} hidden units but the "
                f"tensors have {ffn_hidden(shapes)}"
            )
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or heads < 1 or shapes.embed_dim % heads:
        problems.append(f"num_attention_heads={heads!r} does not divide {shapes.embed_dim}")
    if config.get("layer_norm_eps", LAYER_NORM_EPS) != LAYER_NORM_EPS:
        problems.append(f"layer_norm_eps={config['layer_norm_eps']!r}, dinospec's is 1e-6")
    if shapes.ffn_layer == "mlp" and config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={config['hidden_act']!r}, dinospec's MLP uses 'gelu'")
    if problems:
        raise CheckpointError(f"{source} disagrees with the weights: " + "; ".join(problems))
    return replace(
        shapes,
        num_heads=heads,
        interpolate_offset=0.0,
        interpolate_antialias=model_type == "dinov2_with_registers",
    )


def _side(value: Any) -> Any:
    """HF sizes are an int or a (height, width) pair; a square pair is its side."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def to_hf(state_dict: Mapping[str, Tensor], config: ModelConfig) -> tuple[StateDict, dict]:
    """State dict (keys as HF saves them) and `config.json` of the HF model equal to a
    vanilla dinospec backbone. A model without LayerScale gets gammas of ones (HF always
    scales), which multiplies by exactly 1."""
    refuse_unless_hf_compatible(config)
    out: StateDict = {}
    inverse = {v: k for k, v in _EMBEDDINGS.items()}
    layer_names = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.w12": "mlp.weights_in",
        "mlp.w3": "mlp.weights_out",
    }
    for key, value in state_dict.items():
        if key in inverse:
            out[inverse[key]] = value
            continue
        _, block, rest = key.split(".", 2)
        module, _, leaf = rest.rpartition(".")
        if module == "attn.qkv":
            names = ("query", "key", "value")
            for name, piece in zip(names, value.chunk(3), strict=True):
                out[f"encoder.layer.{block}.attention.attention.{name}.{leaf}"] = piece.clone()
        elif rest in layer_names:
            out[f"encoder.layer.{block}.{layer_names[rest]}"] = value
        else:
            out[f"encoder.layer.{block}.{layer_names[module]}.{leaf}"] = value
    if config.init_values is None:
        ones = torch.ones(config.embed_dim)
        for block in range(config.depth):
            for i in (1, 2):
                out[f"encoder.layer.{block}.layer_scale{i}.lambda1"] = ones.clone()
    return out, hf_config(config)


def refuse_unless_hf_compatible(config: ModelConfig) -> None:
    """HF's DINOv2 has one set of weights for all tokens and biases after the attention
    and in the FFN."""
    refuse_unless_plain_vit(config, "Hugging Face", "HF's Dinov2Model")
    if config.mlp_ratio != int(config.mlp_ratio):
        raise CheckpointError(
            f"mlp_ratio={config.mlp_ratio}: HF's Dinov2Config takes a whole number (transformers 5)"
        )


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """`config.json` of the HF model with the same architecture."""
    model_type = "dinov2_with_registers" if config.num_register_tokens else "dinov2"
    out = {
        "architectures": [MODEL_TYPES[model_type]],
        "model_type": model_type,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "mlp_ratio": int(config.mlp_ratio),
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": config.qkv_bias,
        "layerscale_value": config.init_values or 1.0,
        "use_swiglu_ffn": config.ffn_layer != "mlp",
        "hidden_act": "gelu",
        "layer_norm_eps": LAYER_NORM_EPS,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "torch_dtype": "float32",
    }
    if config.num_register_tokens:
        out["num_register_tokens"] = config.num_register_tokens
    return out
