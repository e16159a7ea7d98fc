"""DINO loss on the [CLS] token (DINOv2's dino_clstoken_loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from dinospec.losses.targets import TeacherTargets


class DINOLoss(TeacherTargets):
    """Cross-entropy of the student's [CLS] prototype scores against the teacher's targets.

    The loss sums every (student chunk, teacher chunk) pair it is given and does not divide
    by the number of pairs: which pairs count (every crop against the other global view)
    and how they are weighted is the training loop's decision, made by what it passes in
    and by what it divides the result by, exactly as in DINOv2.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__((1, out_dim), center_momentum)
        self.student_temp = student_temp

    def forward(
        self,
        student_output_list: Sequence[Tensor],
        teacher_out_softmaxed_centered_list: Sequence[Tensor],
    ) -> Tensor:
        """Sum over pairs of the batch-mean cross-entropy; the student's log-probabilities
        are computed once per chunk because the prototype dimension is large (65536)."""
        log_probs = [F.log_softmax(s / self.student_temp, dim=-1) for s in student_output_list]
        return -sum(
            (targets * lp).sum(dim=-1).mean()
            for lp in log_probs
            for targets in teacher_out_softmaxed_centered_list
        )
