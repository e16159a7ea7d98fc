"""The training loss of DINOv2's depth probes: scale-invariant log loss plus gradient loss.

Both come from DINOv2's depth code (`SigLoss`, `GradientLoss`) and its NYU configs, which
weight them 1.0 and 0.5. A pixel takes part when its ground truth is positive (0 marks a
missing measurement, and the padding of rotated or cropped training views). Logs are taken
of depth + 0.001 m, DINOv2's guard against the gradient of log near 0.

One deliberate difference: DINOv2's `GradientLoss` indexes its inputs as (H, W) maps but
receives (B, 1, H, W) batches, so its "vertical" differences run over the batch (image b
against image b + 2) and its "horizontal" ones over the single channel; with the two
images per GPU of its configs the term is exactly zero. Here it compares pixels two rows
or columns apart inside each image, the MegaDepth loss it was adapted from; set
`depth.gradient_loss_weight=0` for DINOv2's effective objective (SigLoss alone).
"""

from __future__ import annotations

import torch

LOG_EPS = 1e-3
SIG_LAMBDA = 0.15
"""Weight of the squared mean log error in SigLoss: 1 - lambda with AdaBins' lambda = 0.85."""
SIG_WARMUP_ITERATIONS = 100
"""DINOv2's configs start SigLoss with `warm_up=True`: for this many steps only the mean
log error is fitted, which first brings predictions to the right overall scale."""
GRADIENT_STRIDES = (1, 2, 4, 6)
"""Subsampling of DINOv2's four gradient-loss scales (`[::2 * i]` for i = 1..3)."""


def log_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.log(pred + LOG_EPS) - torch.log(target + LOG_EPS)


def sig_loss(pred: torch.Tensor, target: torch.Tensor, warming_up: bool = False) -> torch.Tensor:
    """sqrt(Var(g) + 0.15 mean(g)^2) of the log errors g of all valid pixels of the batch
    (unbiased variance, as torch.var in DINOv2); sqrt(0.15 mean(g)^2) while `warming_up`."""
    g = log_error(pred, target)[target > 0]
    mean_term = SIG_LAMBDA * g.mean() ** 2
    if warming_up:
        return mean_term.sqrt()
    return (g.var() + mean_term).sqrt()


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-scale log-gradient matching on (B, H, W) maps: at every scale, the absolute
    difference of log errors two pixels apart along rows and columns, summed over pairs of
    valid pixels and divided by the number of valid pixels."""
    total = pred.new_zeros(())
    for stride in GRADIENT_STRIDES:
        p, t = pred[:, ::stride, ::stride], target[:, ::stride, ::stride]
        valid = (t > 0).to(p.dtype)
        d = log_error(p, t) * valid
        vertical = (d[:, :-2] - d[:, 2:]).abs() * valid[:, :-2] * valid[:, 2:]
        horizontal = (d[:, :, :-2] - d[:, :, 2:]).abs() * valid[:, :, :-2] * valid[:, :, 2:]
        total = total + (vertical.sum() + horizontal.sum()) / valid.sum().clamp(min=1)
    return total


def depth_loss(
    pred: torch.Tensor, target: torch.Tensor, gradient_weight: float, iteration: int
) -> torch.Tensor:
    """The probe's loss on (B, H, W) predicted and ground-truth depths in metres."""
    loss = sig_loss(pred, target, warming_up=iteration < SIG_WARMUP_ITERATIONS)
    if gradient_weight:
        loss = loss + gradient_weight * gradient_loss(pred, target)
    return loss
