"""The DINO projection head, shared by the DINO and (unless separate) iBOT objectives."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are `weight_g * weight_v / ||weight_v||`.

    Written out rather than taken from torch.nn.utils so the parameters keep DINOv2's names
    (`weight_g`, `weight_v`) and stay plain parameters that FSDP2 can shard. DINOv2 wraps a
    freshly built `nn.Linear`, so `weight_v` starts as PyTorch's default linear init
    (kaiming-uniform, rows of norm about 0.577 whatever the width) and `weight_g` at 1.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """torch's fused weight norm (what DINOv2's `nn.utils.weight_norm` runs): written
        out, the product and quotient each make a prototypes x bottleneck temporary, forward
        and backward, which cost 6-9% of a 65,536-prototype step."""
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0))


class DINOHead(nn.Module):
    """MLP -> L2-normalized bottleneck -> weight-normalized prototypes (SPEC section 3).

    As in DINOv2, only the MLP's linears are drawn trunc-normal (std 0.02); the prototypes
    keep the default linear init, drawn after the MLP's so a seed gives DINOv2's values.

    The normalized bottleneck with a fixed-norm last layer (weight_g stays 1 unless trained)
    keeps the logits bounded, which is what lets a 65,536-way softmax train stably.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
