"""Parameter and FLOP report of a model config against its vanilla twin.

The paper's claim is "about 8% more parameters, no extra FLOPs"; this report shows both
numbers for any config so the claim can be checked, not trusted.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from math import prod
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis

from dinospec.config import ModelConfig, SpecializeConfig
from dinospec.models.vit import DinoVisionTransformer, build_backbone


@dataclass(frozen=True)
class ModelStats:
    name: str
    params: int
    gflops: float


def _shape(value: Any) -> list[int]:
    return value.type().sizes()


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of QK^T and of the attention-weighted sum of V (fvcore counts MACs)."""
    q, k, v = (_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _addcmul_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """One multiply-add per element: the per-token-type affine of a specialized norm, which
    fvcore would otherwise miss while counting the fused affine of a plain LayerNorm."""
    return prod(_shape(outputs[0]))


class _ClassToken(nn.Module):
    """Traceable wrapper: fvcore's tracer needs tensor outputs, not DINOv2's dict."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone.forward_features(x)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: DinoVisionTransformer, img_size: int = 224) -> float:
    """GFLOPs (fvcore's multiply-add convention) of one forward pass on one image."""
    x = torch.zeros(1, model.config.in_chans, img_size, img_size)
    analysis = FlopCountAnalysis(_ClassToken(model).eval(), (x,))
    analysis.set_op_handle(
        "aten::scaled_dot_product_attention", _sdpa_flops, "aten::addcmul", _addcmul_flops
    )
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return analysis.total() / 1e9


def model_stats(config: ModelConfig, name: str, img_size: int = 224) -> ModelStats:
    model = build_backbone(config)
    return ModelStats(name, count_parameters(model), count_gflops(model, img_size))


def compare_with_vanilla(config: ModelConfig, img_size: int = 224) -> list[ModelStats]:
    vanilla = replace(config, specialize=SpecializeConfig())
    return [model_stats(config, "config", img_size), model_stats(vanilla, "vanilla twin", img_size)]


def format_report(rows: list[ModelStats], img_size: int = 224) -> str:
    base = rows[-1].params
    header = f"{'model':<14}{'params':>16}{'added':>14}{'added %':>10}{f'GFLOPs@{img_size}':>14}"
    lines = [header, "-" * len(header)]
    for r in rows:
        added = r.params - base
        lines.append(
            f"{r.name:<14}{r.params:>16,}{added:>+14,}{100 * added / base:>+9.2f}%{r.gflops:>14.3f}"
        )
    return "\n".join(lines)
