"""`Streams`: how the blocks carry a batch of token sequences.

A specialized model keeps the prefix ([CLS], registers) and the patch tokens of an image as
two streams, each a contiguous tensor, along the residual path: every specialized layer
then runs its fused kernel once per stream with no gathering or copying. Inside a residual
branch the streams are joined (prefix first, the order of a vanilla model's sequence)
where a shared layer or attention needs the whole sequence, and split back into views
where a specialized layer or the residual path needs them apart. A vanilla model's
sequence is one stream. BENCHMARKS.md has what this saves over routing inside one tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class Streams(NamedTuple):
    """A batch of same-size token sequences: `sizes` says how many tokens each stream
    holds ((N,) in a vanilla model, (prefix, patches) in a specialized one) and `parts`
    holds them, one tensor per stream or the whole sequence joined in one."""

    parts: tuple[Tensor, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of_sequence(cls, x: Tensor, num_prefix: int) -> Streams:
        """A (B, N, D) sequence as streams: the first `num_prefix` tokens and the rest, each
        made contiguous; one stream when `num_prefix` is 0 (a vanilla model)."""
        if not num_prefix:
            return cls((x,), (x.shape[1],))
        parts = (x[:, :num_prefix].contiguous(), x[:, num_prefix:].contiguous())
        return cls(parts, (num_prefix, x.shape[1] - num_prefix))

    def joined(self) -> Tensor:
        """The whole sequence in one tensor, prefix stream first."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=1)

    def split(self) -> tuple[Tensor, ...]:
        """One tensor per stream: views of a joined sequence (no copy); parts that are
        already per stream pass through."""
        if len(self.parts) == len(self.sizes):
            return self.parts
        return self.joined().split(self.sizes, dim=1)

    def as_split(self) -> Streams:
        return Streams(self.split(), self.sizes)

    def with_whole(self, x: Tensor) -> Streams:
        """A whole-sequence tensor with these streams' sizes."""
        return Streams((x,), self.sizes)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Streams:
        """`fn` on every part as held (for per-token operations, joined or not)."""
        return Streams(tuple(fn(x) for x in self.parts), self.sizes)

    def add(self, branch: Streams) -> Streams:
        """The residual sum, per stream."""
        return Streams(
            tuple(x + b for x, b in zip(self.parts, branch.split(), strict=True)), self.sizes
        )
