"""Which tokens of a sequence take the prefix ([CLS] / register) path.

Specialized layers need to know, for every token, whether it is a prefix token or a patch
token. Inside one image the prefix tokens are the leading positions, which allows cheap
slicing; packed sequences (several crops concatenated into one row) interleave them, so
the general form is a boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenTypes:
    """Token-type layout of a (B, N, D) sequence.

    `prefix_mask` is (B, N) or (1, N), True where a token takes the prefix path.
    `num_leading` is set when the prefix tokens are exactly positions [0, num_leading) of
    every row, which lets the layers split by slicing instead of gathering.
    """

    prefix_mask: Tensor
    num_leading: int | None = None

    @classmethod
    def leading(cls, num_prefix: int, seq_len: int, device: torch.device) -> TokenTypes:
        """Layout of one image: the first `num_prefix` tokens are prefix tokens."""
        mask = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
        mask[:, :num_prefix] = True
        return cls(mask, num_leading=num_prefix)

    @classmethod
    def from_mask(cls, prefix_mask: Tensor) -> TokenTypes:
        """Arbitrary layout, e.g. several crops packed into one sequence."""
        if prefix_mask.dtype != torch.bool or prefix_mask.dim() != 2:
            raise ValueError(
                f"prefix_mask must be a (B, N) bool tensor, got {prefix_mask.dtype} "
                f"of shape {tuple(prefix_mask.shape)}"
            )
        return cls(prefix_mask, num_leading=None)

    def select_rows(self, index: Tensor) -> TokenTypes:
        """Layout of a subset of the batch (stochastic depth computes on a subset)."""
        if self.prefix_mask.shape[0] == 1:
            return self
        return TokenTypes(self.prefix_mask[index], self.num_leading)
