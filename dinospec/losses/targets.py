"""Teacher targets shared by the DINO and iBOT losses.

Both losses turn teacher logits into soft targets in one of two ways: softmax after
subtracting an EMA "center" (which keeps one prototype from taking over), or
Sinkhorn-Knopp (which forces every prototype to receive equal mass over the batch). Both
need statistics of the whole global batch, so they reduce across ranks whenever
torch.distributed is initialized.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    if _distributed():
        dist.all_reduce(tensor, op=op)


def _normalize_over_batch(log_q: Tensor) -> Tensor:
    """Give each prototype (column) a total mass of one over the rows of every rank.

    Subtracting the peak before exponentiating keeps large logits from overflowing, and
    subtracting it again from the result, rather than a precomputed logsumexp, keeps the
    dominant entries at full float32 precision. A rank with no rows (possible for iBOT)
    still has to join both reductions.
    """
    peak = log_q.amax(dim=0) if log_q.shape[0] else log_q.new_full(log_q.shape[1:], float("-inf"))
    _all_reduce(peak, dist.ReduceOp.MAX)
    shifted = log_q - peak
    mass = shifted.exp().sum(dim=0)
    _all_reduce(mass)
    return shifted - mass.log()


def sinkhorn_knopp(teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Balanced soft assignments of samples to prototypes, computed in the log domain.

    The published algorithm exponentiates logits / temperature directly, which overflows
    float32 once a logit exceeds about 88 * temperature. It also rescales by the matrix
    total, by the number of prototypes and by the global number of samples; each of those
    is a uniform factor that the following normalization removes, so only the
    per-prototype totals need to cross ranks and the global sample count is never needed.
    The final step normalizes each sample, so every row is a distribution.
    """
    if n_iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least one iteration, got {n_iterations}")
    log_q = teacher_output.float() / teacher_temp
    for _ in range(n_iterations):
        log_q = F.log_softmax(_normalize_over_batch(log_q), dim=-1)
    return log_q.exp()


class TeacherTargets(nn.Module):
    """Center bookkeeping and target construction common to the DINO and iBOT losses.

    The batch mean of the teacher output is all-reduced asynchronously when the step's
    targets are made, and only folded into the center when the next targets are needed,
    so the communication overlaps with the student's forward and backward passes. The
    buffer keeps DINOv2's name and shape so its checkpoints load.
    """

    center: Tensor

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending: tuple[Tensor, dist.Work | None] | None = None
        self.register_state_dict_pre_hook(self._apply_before_saving)

    @staticmethod
    def _apply_before_saving(module: TeacherTargets, *_: object) -> None:
        """A checkpoint taken between an update and its application would otherwise lose it,
        and a resumed run would then center differently from an uninterrupted one."""
        module.apply_center_update()

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """Centered, sharpened teacher distributions, using every update issued so far.

        The center is flattened so that the targets keep the shape of the input whatever
        the center's stored shape.
        """
        self.apply_center_update()
        return F.softmax((teacher_output - self.center.flatten()) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, *, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp targets; the iteration count is keyword-only so that a stray
        count of masked patches passed positionally cannot become the iteration count."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Start reducing this batch's statistic over all ranks; it is applied on the next
        use."""
        self.queue_update(self.statistics(teacher_output))

    @torch.no_grad()
    def statistics(self, teacher_output: Tensor) -> Tensor:
        """What the center update needs of a batch (`rank_totals`), a vector of the
        prototype count: taken while the teacher's logits exist, it lets the training step
        free them before the student's forward pass instead of holding them to its end."""
        rows = teacher_output.detach().float().reshape(-1, teacher_output.shape[-1])
        return self.rank_totals(rows)

    @torch.no_grad()
    def queue_update(self, totals: Tensor) -> None:
        """Start reducing `statistics` over all ranks: each rank's contribution and its
        weight travel in one reduction, and the center moves towards their weighted mean
        when it is next used."""
        self.apply_center_update()
        handle = dist.all_reduce(totals, async_op=True) if _distributed() else None
        self._pending = (totals, handle)

    @staticmethod
    def rank_totals(rows: Tensor) -> Tensor:
        """This rank's row sum and row count: the center follows the mean over the rows of
        all ranks. DINOv2 divides the summed rows by this rank's count times the world size,
        the same number, since every rank holds as many [CLS] tokens."""
        return torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold the pending batch statistic into the center with the EMA momentum (a no-op
        when nothing is pending, or when no rank had a row: the center then stays)."""
        if self._pending is None:
            return
        totals, handle = self._pending
        self._pending = None
        if handle is not None:
            handle.wait()
        weight = totals[-1]
        batch_mean = totals[:-1] / weight
        moved = self.center * self.center_momentum + batch_mean * (1 - self.center_momentum)
        self.center.copy_(torch.where(weight > 0, moved, self.center))
