"""Monocular depth metrics as NYU Depth v2 results are reported: RMSE, abs-rel, delta < 1.25.

The protocol is the one of the depth toolbox DINOv2's evaluation runs on (Monocular Depth
Estimation Toolbox, itself following BTS and AdaBins):

- a pixel counts when its ground truth lies strictly between `min_depth` and `max_depth`
  (NYU: 0.001 and 10 m; 0 marks a missing measurement) and, for NYU, inside the Eigen crop
  (rows 45:471, columns 41:601 of the 480 x 640 frame, the region where the Kinect depth
  and the RGB camera overlap);
- predictions are expected within [min_depth, max_depth] (the toolbox clamps them; the
  linear probe's lie there by construction);
- each metric is computed per image and then averaged over images (an image without any
  valid pixel is left out), so a large image does not outweigh a small one.

All functions are pure and take depths in metres.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

NYU_SIZE = (480, 640)
EIGEN_CROP = (slice(45, 471), slice(41, 601))
"""Rows and columns of the NYU Depth v2 frame that are scored (Eigen et al., 2014)."""
DELTA = 1.25


@dataclass(frozen=True)
class DepthScores:
    """Errors of one image, or their means over a set of images."""

    rmse: float
    abs_rel: float
    delta1: float


def eigen_crop_mask(height: int, width: int) -> torch.Tensor:
    """True inside the Eigen crop; only defined on NYU's 480 x 640 frame."""
    if (height, width) != NYU_SIZE:
        raise ValueError(
            f"the Eigen crop is defined on {NYU_SIZE[0]} x {NYU_SIZE[1]} NYU frames, "
            f"not on {height} x {width}"
        )
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[EIGEN_CROP] = True
    return mask


def valid_mask(
    target: torch.Tensor, min_depth: float, max_depth: float, eigen_crop: bool = False
) -> torch.Tensor:
    """The pixels that are scored: measured depth within the range, inside the Eigen crop
    when asked for."""
    mask = (target > min_depth) & (target < max_depth)
    if eigen_crop:
        mask &= eigen_crop_mask(*target.shape[-2:])
    return mask


def image_scores(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> DepthScores | None:
    """Errors of one prediction on the masked pixels; None when no pixel is valid.

    `pred` must be positive where `mask` is set (the ratio divides by it).
    """
    if not mask.any():
        return None
    pred, target = pred[mask].double(), target[mask].double()
    ratio = torch.maximum(pred / target, target / pred)
    return DepthScores(
        rmse=float(((pred - target) ** 2).mean().sqrt()),
        abs_rel=float(((pred - target).abs() / target).mean()),
        delta1=float((ratio < DELTA).double().mean()),
    )


def mean_scores(per_image: Iterable[DepthScores | None]) -> DepthScores:
    """Mean of each metric over the images that had valid pixels (NaN if none had)."""
    scored = [s for s in per_image if s is not None]
    if not scored:
        return DepthScores(math.nan, math.nan, math.nan)
    n = len(scored)
    return DepthScores(
        rmse=sum(s.rmse for s in scored) / n,
        abs_rel=sum(s.abs_rel for s in scored) / n,
        delta1=sum(s.delta1 for s in scored) / n,
    )
