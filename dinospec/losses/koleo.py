"""KoLeo regularizer (Sablayrolles et al., 2018, "Spreading vectors for similarity search")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _nearest_neighbours(unit_vectors: Tensor) -> Tensor:
    """Index of each vector's nearest other vector. On the unit sphere the nearest one has
    the largest dot product; the diagonal is set to -1, the lowest possible value, so a
    vector is never its own neighbour. No gradient flows through an index."""
    with torch.no_grad():
        dots = unit_vectors @ unit_vectors.T
        dots.fill_diagonal_(-1)
        return dots.argmax(dim=1)


class KoLeoLoss(nn.Module):
    """Minus the mean log distance of each L2-normalized vector to its nearest neighbour,
    an entropy estimate whose minimization spreads the features over the sphere."""

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """Runs in float32 with autocast off because distances between nearby unit vectors
        vanish in half precision. `pairwise_distance` adds `eps` to the difference, so
        duplicated vectors give a small positive distance rather than a log of zero."""
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            unit = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            neighbours = unit[_nearest_neighbours(unit)]
            distances = F.pairwise_distance(unit, neighbours, p=2, eps=eps)
            return -torch.log(distances + eps).mean()
