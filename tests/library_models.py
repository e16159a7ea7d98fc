"""Tiny DINOv2 models built in timm and Hugging Face transformers (random weights in every
parameter), and the outputs the conversion tests compare: [CLS], patch tokens and the
intermediate layers, each as the library computes them."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import transformers
from helpers import randomize
from safetensors.torch import load_file

from dinospec.models import DinoVisionTransformer

SIZE = 56  # a 4 x 4 grid of 14-pixel patches
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TIMM_MODELS = {
    # name: extra arguments; the giant's SwiGLU width is set so that 2/3 of 4 x 64,
    # rounded up to 8 as DINOv2 does, is half of fc1 (2 x 176 = 5.5 x 64)
    "vit_small_patch14_dinov2": {},
    "vit_small_patch14_reg4_dinov2": {},
    "vit_giant_patch14_dinov2": {"mlp_ratio": 5.5},
    "vit_giant_patch14_reg4_dinov2": {"mlp_ratio": 5.5},
}
HF_MODELS = {
    "dinov2": {},
    "dinov2_swiglu": {"use_swiglu_ffn": True},
    "dinov2_reg4": {"num_register_tokens": 4},
    "dinov2_reg4_swiglu": {"num_register_tokens": 4, "use_swiglu_ffn": True},
}

Outputs = dict[str, torch.Tensor]


def images(height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """Four images: MKL rounds rows independently of their neighbours from four rows on."""
    return torch.randn(4, 3, height, width, generator=torch.Generator().manual_seed(1))


def timm_model(name: str) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, img_size=SIZE, **TINY, **TIMM_MODELS[name])
    return randomize(model).eval()


def hf_model(name: str) -> transformers.PreTrainedModel:
    kwargs = HF_MODELS[name]
    registers = "num_register_tokens" in kwargs
    config_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    model_cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    config = config_cls(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=14,
        **kwargs,
    )
    return randomize(model_cls(config)).eval()


def save_hf_bin(model: transformers.PreTrainedModel, directory: Path) -> Path:
    """`pytorch_model.bin` as transformers 4 writes it with `safe_serialization=False`
    (torch.save of the state dict it saves); transformers 5 writes safetensors only, so
    its saved tensors are put into that file."""
    model.save_pretrained(directory)
    path = directory / "pytorch_model.bin"
    torch.save(load_file(directory / "model.safetensors"), path)
    (directory / "model.safetensors").unlink()
    return path


@torch.no_grad()
def timm_outputs(model: torch.nn.Module, x: torch.Tensor) -> Outputs:
    features = model.forward_features(x)
    n = model.num_prefix_tokens
    layers = model.forward_intermediates(
        x, indices=2, return_prefix_tokens=True, norm=True, output_fmt="NLC",
        intermediates_only=True,
    )  # fmt: skip
    return {
        "cls": features[:, 0],
        "patch": features[:, n:],
        **{f"layer{i}": patch for i, (patch, _) in enumerate(layers)},
        **{f"layer{i}_cls": prefix[:, 0] for i, (_, prefix) in enumerate(layers)},
    }


@torch.no_grad()
def hf_outputs(model: transformers.PreTrainedModel, x: torch.Tensor) -> Outputs:
    out = model(pixel_values=x, output_hidden_states=True)
    n = 1 + getattr(model.config, "num_register_tokens", 0)
    last = out.last_hidden_state
    layers = out.hidden_states[1:]  # block outputs before the final norm
    return {
        "cls": last[:, 0],
        "patch": last[:, n:],
        **{f"layer{i}": layer[:, n:] for i, layer in enumerate(layers)},
        **{f"layer{i}_cls": layer[:, 0] for i, layer in enumerate(layers)},
    }


@torch.no_grad()
def dinospec_outputs(model: DinoVisionTransformer, x: torch.Tensor, norm: bool) -> Outputs:
    """The same outputs from dinospec: intermediate layers normalized as timm's
    `norm=True` does, or not, as HF's hidden states are."""
    features = model.forward_features(x)
    layers = model.get_intermediate_layers(x, n=2, return_class_token=True, norm=norm)
    out = {"cls": features["x_norm_clstoken"], "patch": features["x_norm_patchtokens"]}
    for i, (patch, cls) in enumerate(layers):
        out[f"layer{i}"], out[f"layer{i}_cls"] = patch, cls
    return out


def max_differences(ours: Outputs, theirs: Outputs) -> dict[str, float]:
    """Largest absolute difference of each output over the output's largest magnitude (the
    keys of both must agree): hidden states reach magnitudes of ~100, where one float32
    rounding step is ~1e-5, so an absolute bound would only measure their scale."""
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
    return {
        key: ((ours[key] - theirs[key]).abs().max() / theirs[key].abs().max()).item()
        for key in ours
    }
