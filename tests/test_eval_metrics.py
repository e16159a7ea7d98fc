"""Segmentation and classification metrics: hand-worked cases, an independent reference
(torchmetrics) and a per-class numpy reference, and the sum across ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval.metrics import (
    IGNORE_INDEX,
    ConfusionMatrix,
    confusion_matrix,
    scores_from_confusion,
    topk_accuracy,
    topk_correct,
)

# Nine pixels, the last one ignored (whatever is predicted there must not count).
LABEL = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, IGNORE_INDEX])
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1])


def test_confusion_matrix_by_hand() -> None:
    # truth 0 -> predicted 0, 0, 1; truth 1 -> 1, 2; truth 2 -> 2, 2, 0.
    expected = torch.tensor([[2, 1, 0], [0, 1, 1], [1, 0, 2]])
    assert torch.equal(confusion_matrix(PRED, LABEL, 3), expected)


def test_scores_by_hand() -> None:
    # TP = (2, 1, 2); labelled = (3, 2, 3); predicted (column sums) = (3, 2, 3).
    # IoU = TP / (labelled + predicted - TP) = 2/4, 1/3, 2/4 -> mIoU = (4/3) / 3 = 4/9.
    # pixel accuracy = 5 / 8; class accuracy = 2/3, 1/2, 2/3 -> mean = (11/6) / 3 = 11/18.
    scores = scores_from_confusion(confusion_matrix(PRED, LABEL, 3))
    assert scores.iou == pytest.approx([0.5, 1 / 3, 0.5])
    assert scores.miou == pytest.approx(4 / 9)
    assert scores.pixel_accuracy == pytest.approx(5 / 8)
    assert scores.class_accuracy == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert scores.mean_accuracy == pytest.approx(11 / 18)


def test_class_absent_everywhere_leaves_the_mean() -> None:
    # Same pixels with a fourth class that neither labels nor predictions contain: its IoU
    # and accuracy are undefined (NaN) and the means are those of the three-class case.
    scores = scores_from_confusion(confusion_matrix(PRED, LABEL, 4))
    assert math.isnan(scores.iou[3]) and math.isnan(scores.class_accuracy[3])
    assert scores.miou == pytest.approx(4 / 9)
    assert scores.mean_accuracy == pytest.approx(11 / 18)


def test_class_only_predicted_counts_as_zero_iou() -> None:
    # Labels (0, 0), predictions (0, 3): IoU0 = 1 / (2 + 1 - 1) = 1/2, IoU3 = 0 / 1 = 0,
    # classes 1 and 2 absent -> mIoU = (1/2 + 0) / 2 = 1/4. Class 3 has no labelled pixel,
    # so its accuracy is undefined: mean accuracy = accuracy of class 0 = 1/2.
    scores = scores_from_confusion(confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 4))
    assert scores.iou[0] == pytest.approx(0.5) and scores.iou[3] == 0.0
    assert math.isnan(scores.iou[1]) and math.isnan(scores.iou[2])
    assert scores.miou == pytest.approx(0.25)
    assert scores.mean_accuracy == pytest.approx(0.5)
    assert math.isnan(scores.class_accuracy[3])


def test_ignored_pixels_never_count() -> None:
    pred = torch.randint(0, 3, (4, 8, 8))
    label = torch.randint(0, 3, (4, 8, 8))
    label[:, :2] = IGNORE_INDEX
    changed = pred.clone()
    changed[:, :2] = (pred[:, :2] + 1) % 3
    first = confusion_matrix(pred, label, 3)
    assert torch.equal(first, confusion_matrix(changed, label, 3))
    assert int(first.sum()) == 4 * 6 * 8


def test_custom_ignore_index() -> None:
    label = torch.tensor([0, 1, 11, 11])
    pred = torch.tensor([0, 1, 0, 1])
    assert int(confusion_matrix(pred, label, 2, ignore_index=11).sum()) == 2


def test_out_of_range_values_are_errors() -> None:
    with pytest.raises(ValueError, match="label contains 3"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="prediction contains 7"):
        confusion_matrix(torch.tensor([7, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 3)


def test_running_matrix_equals_one_shot() -> None:
    pred = torch.randint(0, 5, (6, 16, 16))
    label = torch.randint(0, 6, (6, 16, 16))
    label[label == 5] = IGNORE_INDEX
    running = ConfusionMatrix(5)
    for p, t in zip(pred, label, strict=True):
        running.update(p, t)
    assert torch.equal(running.total(), confusion_matrix(pred, label, 5))
    assert running.compute() == scores_from_confusion(confusion_matrix(pred, label, 5))


def test_empty_running_matrix_gives_nan() -> None:
    scores = ConfusionMatrix(3).compute()
    assert math.isnan(scores.miou) and math.isnan(scores.pixel_accuracy)


def _random_segmentation(num_classes: int, present: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels using only the first `present` classes, 10% ignored."""
    gen = torch.Generator().manual_seed(1)
    label = torch.randint(0, present, (8, 24, 24), generator=gen)
    noise = torch.randint(0, present, label.shape, generator=gen)
    pred = torch.where(torch.rand(label.shape, generator=gen) < 0.6, label, noise)
    label[torch.rand(label.shape, generator=gen) < 0.1] = IGNORE_INDEX
    return pred, label


def test_agrees_with_torchmetrics() -> None:
    # Imported here: the ranks spawned by the distributed test import this module, and
    # torchmetrics would double their start-up time for nothing.
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassJaccardIndex,
    )

    num_classes = 7
    pred, label = _random_segmentation(num_classes, present=6)
    kwargs = dict(num_classes=num_classes, ignore_index=IGNORE_INDEX)
    reference_matrix = MulticlassConfusionMatrix(**kwargs)(pred, label)
    matrix = confusion_matrix(pred, label, num_classes)
    assert torch.equal(matrix, reference_matrix)
    scores = scores_from_confusion(matrix)
    per_class = MulticlassJaccardIndex(average="none", **kwargs)(pred, label)
    assert scores.iou[:6] == pytest.approx(per_class[:6].tolist(), abs=1e-6)
    assert math.isnan(scores.iou[6])
    macro_iou = MulticlassJaccardIndex(average="macro", **kwargs)(pred, label)
    assert scores.miou == pytest.approx(float(macro_iou), abs=1e-6)
    micro_acc = MulticlassAccuracy(average="micro", **kwargs)(pred, label)
    assert scores.pixel_accuracy == pytest.approx(float(micro_acc), abs=1e-6)
    macro_acc = MulticlassAccuracy(average="macro", **kwargs)(pred, label)
    assert scores.mean_accuracy == pytest.approx(float(macro_acc), abs=1e-6)


def _numpy_reference(pred: np.ndarray, label: np.ndarray, num_classes: int) -> tuple:
    """Per-class set arithmetic on boolean masks: no confusion matrix at all."""
    valid = label != IGNORE_INDEX
    ious, accs = [], []
    for c in range(num_classes):
        is_pred, is_label = (pred == c) & valid, (label == c) & valid
        union = np.logical_or(is_pred, is_label).sum()
        if union:
            ious.append(np.logical_and(is_pred, is_label).sum() / union)
        if is_label.sum():
            accs.append(np.logical_and(is_pred, is_label).sum() / is_label.sum())
    pixel = (pred[valid] == label[valid]).mean()
    return float(np.mean(ious)), float(pixel), float(np.mean(accs))


def test_agrees_with_numpy_reference() -> None:
    pred, label = _random_segmentation(9, present=7)
    pred[0, 0, :5] = 8  # a class only ever predicted, never labelled
    miou, pixel, mean_acc = _numpy_reference(pred.numpy(), label.numpy(), 9)
    scores = scores_from_confusion(confusion_matrix(pred, label, 9))
    assert scores.miou == pytest.approx(miou)
    assert scores.pixel_accuracy == pytest.approx(pixel)
    assert scores.mean_accuracy == pytest.approx(mean_acc)


def test_topk_by_hand() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.9],  # label 3 is first: a top-1 hit
            [0.8, 0.1, 0.7, 0.0],  # label 2 is second: top-2 hit only
            [0.3, 0.2, 0.1, 0.4],  # label 2 is third: only "top-5" (capped at 4) hits
        ]
    )
    target = torch.tensor([3, 2, 2])
    assert topk_correct(scores, target, (1, 2, 5)) == {1: 1, 2: 2, 5: 3}
    accuracy = topk_accuracy(scores, target, (1, 2, 5))
    assert accuracy == pytest.approx({1: 1 / 3, 2: 2 / 3, 5: 1.0})


def test_topk_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        topk_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def _sum_worker(rank: int, world_size: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        pred, label = _random_segmentation(5, present=5)
        mine = slice(rank * 4, rank * 4 + 4)
        matrix = ConfusionMatrix(5)
        matrix.update(pred[mine], label[mine])
        expected = confusion_matrix(pred, label, 5)
        assert torch.equal(matrix.total(), expected)
        assert torch.equal(matrix.total(), expected), "a second call must not double-count"
        assert matrix.compute() == scores_from_confusion(expected)
    finally:
        dist.destroy_process_group()


def test_matrix_is_summed_across_ranks(tmp_path) -> None:
    mp.spawn(_sum_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
