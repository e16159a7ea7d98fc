"""Segmentation and classification metrics of an evaluation run.

Segmentation mIoU is defined on the *whole* validation set (total intersection over total
union per class), not as a mean of per-image scores, so the state that must survive
across batches and ranks is one confusion matrix of integer counts. Integer counts also
keep the sum exact however many pixels a run sees, which a float accumulator would not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

IGNORE_INDEX = 255


def communication_device(tensor: torch.Tensor) -> torch.device:
    """Where `tensor` must be for the default process group: NCCL only moves CUDA tensors,
    so a CPU tensor travels to the current GPU (and back), and callers may keep their data
    wherever is convenient."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all ranks, returned on its own device; the input is untouched."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    buffer = tensor.to(communication_device(tensor), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def _check_range(values: torch.Tensor, num_classes: int, what: str) -> None:
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        value = int(values[bad][0])
        raise ValueError(
            f"{what} contains {value}, outside 0..{num_classes - 1} "
            f"(and not the ignore index): wrong num_classes or an unmapped label?"
        )


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Counts[i, j] of pixels whose label is i and prediction is j (rows: truth).

    Pixels labelled `ignore_index` are dropped whatever was predicted there, so padding
    and void regions never count as errors.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label {tuple(target.shape)}")
    keep = target != ignore_index
    pred, target = pred[keep].long(), target[keep].long()
    _check_range(target, num_classes, "label")
    _check_range(pred, num_classes, "prediction")
    flat = target * num_classes + pred
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegmentationScores:
    """Scores in [0, 1]; per-class entries are NaN where the class is undefined."""

    miou: float
    iou: list[float]
    pixel_accuracy: float
    mean_accuracy: float
    class_accuracy: list[float]


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return float(present.mean()) if present.numel() else float("nan")


def scores_from_confusion(matrix: torch.Tensor) -> SegmentationScores:
    """IoU and accuracies of a confusion matrix (rows: truth, columns: prediction).

    A class absent from both labels and predictions has no union: its IoU is NaN and it
    leaves the mean, because a run should not be rewarded or punished for classes the
    validation set does not contain. A class only predicted has IoU 0 and stays in.
    Per-class accuracy is NaN where the class has no labelled pixel (recall undefined).
    """
    counts = matrix.double()
    true_pos = counts.diagonal()
    labelled = counts.sum(dim=1)
    predicted = counts.sum(dim=0)
    union = labelled + predicted - true_pos
    iou = true_pos / union
    class_acc = true_pos / labelled
    total = counts.sum()
    pixel_acc = float(true_pos.sum() / total) if total > 0 else float("nan")
    return SegmentationScores(
        miou=_nanmean(iou),
        iou=iou.tolist(),
        pixel_accuracy=pixel_acc,
        mean_accuracy=_nanmean(class_acc),
        class_accuracy=class_acc.tolist(),
    )


class ConfusionMatrix:
    """Running confusion matrix of a segmentation evaluation.

    It lives on the device of the first batch it sees so that updates never copy
    predictions to the host; `compute` sums over ranks each time it is called (every rank
    must call it), on a copy, so calling it twice never counts anything twice.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        batch = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix = batch if self.matrix is None else self.matrix + batch

    def total(self) -> torch.Tensor:
        """The matrix summed over all ranks (zeros if no batch was seen here)."""
        local = self.matrix
        if local is None:
            local = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        return sum_across_ranks(local)

    def compute(self) -> SegmentationScores:
        return scores_from_confusion(self.total())


def topk_correct(
    scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, int]:
    """Number of samples whose label is among the `k` highest scores, for each k.

    Counts rather than fractions so that batches and ranks can be summed before dividing.
    A k above the number of classes is capped: every label is then among the top k.
    """
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(
    scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Fraction of samples whose label is among the `k` highest scores, for each k."""
    if target.numel() == 0:
        raise ValueError("top-k accuracy of an empty set is undefined")
    return {k: n / target.numel() for k, n in topk_correct(scores, target, ks).items()}
