"""BatchNorm over a batch that several ranks share, for a probe on frozen features.

SPEC's segmentation batch of 16 is one batch however many processes split it (mmseg's
recipe syncs BatchNorm over its GPUs). torch's SyncBatchNorm refuses CPU tensors; this
one needs only per-channel sums, so it runs on gloo as well as NCCL. It can stay that
simple because its input, frozen backbone features, needs no gradient: the batch
statistics are then constants of the backward pass and only the affine weight and bias
learn, with gradients that the training loop sums over ranks like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eval.metrics import sum_across_ranks


@torch.no_grad()
def global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance of (N, C, H, W) over all ranks' batches, and
    the number of values per channel. Each rank contributes exact float32 moments of its
    part; they are combined in float64, where E[x^2] - E[x]^2 loses nothing that matters."""
    local_var, local_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    count = x.numel() // x.shape[1]
    mean64 = local_mean.double()
    sums = torch.stack(
        [torch.full_like(mean64, count), mean64 * count, (local_var.double() + mean64**2) * count]
    )
    total, first, second = sum_across_ranks(sums)
    mean = first / total
    var = (second / total - mean**2).clamp(min=0)
    return mean, var, int(total[0])


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch; in eval mode,
    and with its state dict, it is a plain BatchNorm2d."""

    @classmethod
    def replacing(cls, bn: nn.BatchNorm2d) -> GlobalBatchNorm2d:
        """A copy of `bn`, parameters and running statistics included."""
        new = cls(bn.num_features, bn.eps, bn.momentum, device=bn.weight.device)
        new.load_state_dict(bn.state_dict())
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if x.requires_grad:
            raise RuntimeError("GlobalBatchNorm2d takes inputs without gradient (frozen features)")
        mean, var, count = global_moments(x)
        self._track(mean, var, count)
        return F.batch_norm(
            x, mean.to(x.dtype), var.to(x.dtype), self.weight, self.bias, False, 0.0, self.eps
        )

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Running statistics as BatchNorm2d keeps them: unbiased variance, momentum (or a
        cumulative average when momentum is None)."""
        self.num_batches_tracked += 1
        factor = self.momentum if self.momentum is not None else 1 / int(self.num_batches_tracked)
        unbiased = var * count / max(count - 1, 1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
