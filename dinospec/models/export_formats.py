"""Writing a backbone in the layout another library loads: DINOv2's torch hub, timm,
Hugging Face transformers, or dinospec's safetensors (the model config in the metadata).

Each writer returns the lines a user needs to load the result, because timm and HF build
the model from arguments the weights alone do not carry (heads, register count, FFN).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dinospec.config import ModelConfig
from dinospec.models.checkpoints import write_backbone
from dinospec.models.hf_layout import hf_config, to_hf
from dinospec.models.timm_layout import timm_model_args, to_timm
from dinospec.models.vit import DinoVisionTransformer

EXPORT_FORMATS = ("hub", "timm", "hf", "safetensors")
DEFAULT_NAMES = {
    "hub": "{stem}_hub.pth",
    "timm": "{stem}_timm.safetensors",
    "hf": "{stem}_hf",
    "safetensors": "{stem}_dinospec.safetensors",
}
"""Output path of each format beside its source, `{stem}` the source's name."""


def export_backbone(model: DinoVisionTransformer, fmt: str, out: Path) -> list[str]:
    """Write `model` as `fmt` at `out` (a directory for hf); returns how to load it."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = model.config
    if fmt == "hub":
        torch.save(state_dict, out)
        return _hub_usage(model, out)
    if fmt == "safetensors":
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: a safetensors export needs the suffix .safetensors")
        write_backbone(state_dict, config, out)
        return [f"wrote {out}; dinospec reads it with its model config (load_backbone)"]
    if fmt == "timm":
        save_file({k: v.contiguous() for k, v in to_timm(state_dict, config).items()}, out)
        return _timm_usage(config, out)
    if fmt == "hf":
        tensors, _ = to_hf(state_dict, config)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
        return _hf_usage(config, out)
    raise ValueError(f"unknown export format {fmt!r}; one of {list(EXPORT_FORMATS)}")


def _hub_usage(model: DinoVisionTransformer, out: Path) -> list[str]:
    lines = [f"wrote {out} (DINOv2's key names, a plain state dict of tensors)"]
    if model.is_specialized:
        lines.append(
            "it holds prefix-path weights (prefix_weight, prefix_bias) that DINOv2's own "
            "code does not know: dinospec reads it; DINOv2's hub models need a vanilla one"
        )
    else:
        lines.append(
            "DINOv2: build the hub model of the same size with pretrained=False, then "
            f"model.load_state_dict(torch.load({str(out)!r}, weights_only=True))"
        )
    return lines


def _interpolation_note(config: ModelConfig, offset: float, antialias: bool, lib: str) -> list[str]:
    """Libraries resize position embeddings their own way; at the image size of the
    weights nothing is resized and outputs agree."""
    if (config.interpolate_offset, config.interpolate_antialias) == (offset, antialias):
        return []
    return [
        f"note: {lib} resizes position embeddings to other image sizes differently from this "
        f"model (offset {config.interpolate_offset}, antialias {config.interpolate_antialias}"
        f"); outputs agree at {config.img_size} px and differ slightly at other sizes"
    ]


def _timm_usage(config: ModelConfig, out: Path) -> list[str]:
    args = timm_model_args(config)
    name = args.pop("model_name")
    classes = {k: args.pop(k) for k in ("mlp_layer", "act_layer") if k in args}
    call = ", ".join([repr(name), *(f"{k}={v!r}" for k, v in args.items())])
    call += "".join(f", {k}={v}" for k, v in classes.items())
    return [
        f"wrote {out} (timm's layout)",
        f"timm: model = timm.create_model({call})",
        f"      model.load_state_dict(safetensors.torch.load_file({str(out)!r}))",
        *_interpolation_note(config, 0.0, True, "timm"),
    ]


def _hf_usage(config: ModelConfig, out: Path) -> list[str]:
    cls = hf_config(config)["architectures"][0]
    antialias = bool(config.num_register_tokens)
    return [
        f"wrote {out}/config.json and {out}/model.safetensors",
        f"transformers: model = transformers.{cls}.from_pretrained({str(out)!r})",
        *_interpolation_note(config, 0.0, antialias, "Hugging Face's " + cls),
    ]
