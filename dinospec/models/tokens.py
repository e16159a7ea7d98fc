"""How a token sequence is routed through specialized layers.

A specialized model keeps the prefix ([CLS], registers) and the patch tokens of an image as
two separate streams, each a contiguous tensor, along the residual path: every specialized
layer then runs its fused kernel once per stream with no gathering or copying. Inside a
residual branch the streams are joined (prefix first, the order of a vanilla model's
sequence) where a shared layer or attention needs the whole sequence, and split back into
views where a specialized layer or the residual path needs them apart. Packed sequences
(several crops concatenated into one row) interleave the two types; they are a single
stream routed by a boolean mask.
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


def join(parts: list[Tensor]) -> Tensor:
    """The whole sequence as one tensor, prefix stream first."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def split(parts: list[Tensor], sizes: list[int]) -> list[Tensor]:
    """One tensor per stream: views of a joined sequence (no copy); parts that are already
    per stream pass through."""
    if len(parts) == len(sizes):
        return parts
    return list(join(parts).split(sizes, dim=1))
