"""iBOT loss on masked patch tokens (DINOv2's ibot_patch_loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinospec.losses.targets import TeacherTargets


def masked_patch_weights(masks: Tensor) -> Tensor:
    """One weight per masked patch, in row-major order, equal to 1 / (masked patches of its
    image): every masked image then counts the same however much of it was masked."""
    per_image = 1 / masks.sum(dim=-1).clamp(min=1)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class IBOTPatchLoss(TeacherTargets):
    """Cross-entropy between student and teacher on the patches hidden from the student.

    The center has DINOv2's (1, 1, K) shape so that its checkpoints load; targets keep the
    shape of whatever teacher tokens are passed in.
    """

    def __init__(
        self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.student_temp = student_temp

    @staticmethod
    def rank_totals(rows: Tensor) -> Tensor:
        """This rank's mean over its masked patches, with weight one: the center follows
        the average of the ranks' means, as DINOv2's (it all-reduces each rank's mean and
        divides by the world size), not the mean over all masked patches, which weighs a
        rank by how many patches it masked. A rank without masked patches has no mean and
        weight zero, so the others' means are averaged (DINOv2, whose ranks always mask,
        would divide by zero there)."""
        if rows.shape[0] == 0:
            return rows.new_zeros(rows.shape[1] + 1)
        return torch.cat([rows.sum(dim=0) / rows.shape[0], rows.new_ones(1)])

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Weighted sum of the per-patch cross-entropies divided by the number of images.

        Unmasked images count in the denominator, so the loss scale follows the fraction of
        masked images. `n_masked_patches` drops the padding rows of fixed-size buffers, and
        `masks_weight` lets the data loader precompute the weights off the training stream.
        """
        log_probs = F.log_softmax(student_patch_tokens_masked / self.student_temp, dim=-1)
        per_patch = -(teacher_patch_tokens_masked * log_probs).sum(dim=-1)
        if n_masked_patches is not None:
            per_patch = per_patch[:n_masked_patches]
        if masks_weight is None:
            masks_weight = masked_patch_weights(student_masks_flat)
        return (per_patch * masks_weight).sum() / student_masks_flat.shape[0]
