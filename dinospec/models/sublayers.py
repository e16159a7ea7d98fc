"""The per-token sublayers of a block (norms and linear projections), each either shared
by all tokens or specialized: one set of parameters per token type.

The paper finds that LayerNorm already pulls [CLS] and patch tokens apart, so giving each
token type its own affine (and, early in the network, its own QKV projection) lets both
roles be served without compromise. Attention stays joint; every token still passes
through exactly one projection, so FLOPs are unchanged.

Every sublayer takes and returns `Streams`. A specialized one runs once per stream, since
its weights differ. A shared linear runs once on the joined sequence: a specialized model
then computes exactly its vanilla twin's GEMMs there, with no small prefix GEMMs and one
weight-gradient product (joining the normalized input before QKV copies a third of what
joining the QKV outputs would). A shared norm runs on each part as held, since a norm is
per token and joining would only copy.

Parameter names follow DINOv2 for the patch path (`weight`, `bias`) and add `prefix_weight`
/ `prefix_bias`, so official checkpoints keep their meaning and the new parameters land under
`blocks.N.` (layer-wise lr decay) with `norm` in the name of norm parameters (no weight decay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinospec.models.streams import Streams

EPS = 1e-6


class SharedLayerNorm(nn.LayerNorm):
    """DINOv2's LayerNorm: one affine for every token."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=EPS)

    def forward(self, x: Streams) -> Streams:
        return x.map(
            lambda t: F.layer_norm(t, self.normalized_shape, self.weight, self.bias, self.eps)
        )


class SpecializedLayerNorm(nn.LayerNorm):
    """LayerNorm with one set of statistics per token and an affine per token type."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, eps=EPS)
        self.prefix_weight = nn.Parameter(torch.ones(dim))
        self.prefix_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Streams) -> Streams:
        prefix, patches = x.split()
        shape = self.normalized_shape
        return Streams(
            (
                F.layer_norm(prefix, shape, self.prefix_weight, self.prefix_bias, self.eps),
                F.layer_norm(patches, shape, self.weight, self.bias, self.eps),
            ),
            x.sizes,
        )


class SharedLinear(nn.Linear):
    """One weight for every token, applied to the joined sequence."""

    def forward(self, x: Streams) -> Streams:
        return x.with_whole(F.linear(x.joined(), self.weight, self.bias))


class SpecializedLinear(nn.Linear):
    """Linear layer that sends prefix and patch tokens through their own weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.prefix_weight = nn.Parameter(torch.empty_like(self.weight))
        self.prefix_bias = nn.Parameter(torch.empty_like(self.bias)) if bias else None
        nn.init.trunc_normal_(self.prefix_weight, std=0.02)
        if self.prefix_bias is not None:
            nn.init.zeros_(self.prefix_bias)

    def forward(self, x: Streams) -> Streams:
        prefix, patches = x.split()
        return Streams(
            (
                F.linear(prefix, self.prefix_weight, self.prefix_bias),
                F.linear(patches, self.weight, self.bias),
            ),
            x.sizes,
        )


SPECIALIZED = (SpecializedLayerNorm, SpecializedLinear)
"""The sublayer classes with a prefix path (`prefix_weight`, `prefix_bias`)."""


def make_norm(dim: int, specialized: bool) -> nn.LayerNorm:
    return SpecializedLayerNorm(dim) if specialized else SharedLayerNorm(dim)


def make_linear(in_features: int, out_features: int, bias: bool, specialized: bool) -> nn.Linear:
    cls = SpecializedLinear if specialized else SharedLinear
    return cls(in_features, out_features, bias=bias)
