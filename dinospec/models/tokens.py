"""How a token sequence is routed through specialized layers.

A specialized model keeps the prefix ([CLS], registers) and the patch tokens of an image as
two separate streams, each a contiguous tensor: every specialized layer then runs its fused
kernel once per stream with no gathering or copying, and only attention joins them. Packed
sequences (several crops concatenated into one row) interleave the two types; they are a
single stream routed by a boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREFIX = "prefix"
PATCH = "patch"


@dataclass(frozen=True)
class TokenTypes:
    """Mixed stream: `prefix_mask` is (B, N) or (1, N), True where a token is a prefix token."""

    prefix_mask: Tensor

    def __post_init__(self) -> None:
        mask = self.prefix_mask
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(
                f"prefix_mask must be a (B, N) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
            )

    def select_rows(self, index: Tensor) -> TokenTypes:
        """Layout of a subset of the batch (stochastic depth computes on a subset)."""
        if self.prefix_mask.shape[0] == 1:
            return self
        return TokenTypes(self.prefix_mask[index])


Route = str | TokenTypes | None
"""PREFIX or PATCH for a stream of one token type, TokenTypes for a mixed stream, None
for a vanilla model (every layer shared)."""


def select_rows(route: Route, index: Tensor) -> Route:
    return route.select_rows(index) if isinstance(route, TokenTypes) else route
