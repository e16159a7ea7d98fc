"""Layer specialization: separate parameters for prefix ([CLS], registers) and patch tokens.

The paper finds that LayerNorm already pulls [CLS] and patch tokens apart, so giving each
token type its own affine (and, early in the network, its own QKV projection) lets both
roles be served without compromise. Attention stays joint; every token still passes
through exactly one projection, so FLOPs are unchanged.

Parameter names follow DINOv2 for the patch path (`weight`, `bias`) and add `prefix_weight`
/ `prefix_bias`, so official checkpoints keep their meaning and the new parameters land under
`blocks.N.` (layer-wise lr decay) with `norm` in the name of norm parameters (no weight decay).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.config import SpecializeConfig, resolve_blocks
from dinospec.models.tokens import PATCH, PREFIX, Route, join, split

BLOCK_SUBLAYERS = ("norm1", "qkv", "proj", "norm2", "ffn_in", "ffn_out")
NORM_SUBLAYERS = ("norm1", "norm2")


class TokenSpecialized:
    """Marker for layers whose forward takes the token layout as second argument."""


class SpecializedLayerNorm(nn.LayerNorm, TokenSpecialized):
    """LayerNorm with one set of statistics per token and an affine per token type."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps)
        self.prefix_weight = nn.Parameter(torch.ones(dim))
        self.prefix_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, route: Route) -> Tensor:
        if route == PREFIX:
            return F.layer_norm(
                x, self.normalized_shape, self.prefix_weight, self.prefix_bias, self.eps
            )
        if route == PATCH:
            return super().forward(x)
        normalized = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        is_prefix = route.prefix_mask.unsqueeze(-1)
        weight = torch.where(is_prefix, self.prefix_weight, self.weight)
        bias = torch.where(is_prefix, self.prefix_bias, self.bias)
        return torch.addcmul(bias, normalized, weight)


class SpecializedLinear(nn.Linear, TokenSpecialized):
    """Linear layer that sends prefix and patch tokens through their own weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.prefix_weight = nn.Parameter(torch.empty_like(self.weight))
        self.prefix_bias = nn.Parameter(torch.empty_like(self.bias)) if bias else None
        nn.init.trunc_normal_(self.prefix_weight, std=0.02)
        if self.prefix_bias is not None:
            nn.init.zeros_(self.prefix_bias)

    def forward(self, x: Tensor, route: Route) -> Tensor:
        if route == PREFIX:
            return F.linear(x, self.prefix_weight, self.prefix_bias)
        if route == PATCH:
            return super().forward(x)
        is_prefix = route.prefix_mask.expand(x.shape[:-1])
        prefix = F.linear(x[is_prefix], self.prefix_weight, self.prefix_bias)
        patches = F.linear(x[~is_prefix], self.weight, self.bias)
        out = prefix.new_empty(*x.shape[:-1], self.out_features)
        out[is_prefix] = prefix
        out[~is_prefix] = patches
        return out


def apply_layer(layer: nn.Module, x: Tensor, route: Route) -> Tensor:
    """Call a sublayer, passing the route only to specialized ones."""
    if isinstance(layer, TokenSpecialized):
        if route is None:
            raise ValueError(f"{type(layer).__name__} needs a token route (None given)")
        return layer(x, route)
    return layer(x)


def apply_sublayer(
    layer: nn.Module, parts: list[Tensor], routes: list[Route], sizes: list[int]
) -> list[Tensor]:
    """A per-token sublayer on tokens held jointly (one tensor) or per stream (`sizes`
    tokens each). A specialized layer runs once per stream, since its weights differ. A
    shared one runs once on the joined sequence: a specialized model then computes exactly
    its vanilla twin's GEMMs there, with no small prefix GEMMs and one weight-gradient
    product, and joining the normalized input before QKV copies a third of what joining
    the QKV outputs would."""
    if len(routes) == 1:
        return [apply_layer(layer, join(parts), routes[0])]
    if isinstance(layer, TokenSpecialized):
        return [layer(x, r) for x, r in zip(split(parts, sizes), routes, strict=True)]
    return [layer(join(parts))]


def make_norm(dim: int, specialized: bool) -> nn.LayerNorm:
    return SpecializedLayerNorm(dim) if specialized else nn.LayerNorm(dim, eps=1e-6)


def make_linear(in_features: int, out_features: int, bias: bool, specialized: bool) -> nn.Linear:
    cls = SpecializedLinear if specialized else nn.Linear
    return cls(in_features, out_features, bias=bias)


@dataclass(frozen=True)
class SpecializationPlan:
    """Resolved form of a SpecializeConfig for a model of a given depth."""

    per_block: tuple[frozenset[str], ...]
    final_norm: bool
    tokens: str

    @classmethod
    def build(cls, spec: SpecializeConfig | None, depth: int) -> SpecializationPlan:
        if spec is None:
            spec = SpecializeConfig()
        per_block: list[set[str]] = [set() for _ in range(depth)]
        for sublayer in BLOCK_SUBLAYERS:
            key = f"{sublayer}_blocks"
            value = getattr(spec, key)
            try:
                blocks = resolve_blocks(value, depth)
            except ValueError as err:
                raise ValueError(f"specialize.{key}={value!r}: {err}") from err
            for i in blocks:
                per_block[i].add(sublayer)
        return cls(tuple(frozenset(s) for s in per_block), bool(spec.final_norm), spec.tokens)

    @property
    def is_vanilla(self) -> bool:
        return not self.final_norm and not any(self.per_block)

    def num_prefix_path_tokens(self, num_register_tokens: int) -> int:
        return 1 + num_register_tokens if self.tokens == "cls+registers" else 1
