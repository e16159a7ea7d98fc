"""Training a linear segmentation probe on cached frozen features.

When the training images are not augmented, the frozen backbone's features are the same at
every iteration, so they are computed once and the probe trains on them directly; this is
what makes a probe affordable on a CPU. The head, loss and schedule are those of SPEC
section 5 (BatchNorm + 1x1 conv, bilinear upsampling, AdamW, warm-up then cosine).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from eval.config import SegSettings
from eval.metrics import IGNORE_INDEX, ConfusionMatrix, SegmentationScores
from eval.seg_head import FrozenPatchFeatures, LinearHead


@torch.no_grad()
def extract_features(
    backbone: nn.Module, dataset: Dataset, n_layers: int, device: torch.device, batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """(features (N, C, h, w), labels (N, H, W)) of a dataset of (image, label) pairs."""
    frozen = FrozenPatchFeatures(backbone.to(device), n_layers)
    features, labels = [], []
    for images, label in DataLoader(dataset, batch_size=batch_size):
        features.append(frozen(images.to(device)).float().cpu())
        labels.append(label)
    return torch.cat(features), torch.cat(labels)


def _lr_factor(iteration: int, config: SegSettings) -> float:
    if iteration < config.warmup_iterations:
        return (iteration + 1) / config.warmup_iterations
    progress = (iteration - config.warmup_iterations) / max(
        1, config.iterations - config.warmup_iterations
    )
    return 0.5 * (1 + math.cos(math.pi * progress))


def probe_optimizer(
    parameters: Iterable[nn.Parameter], config: SegSettings
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up then cosine, stepped once per iteration (SPEC section 5);
    shared by the cached-feature and the augmented training of the head."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _lr_factor(i, config))
    return optimizer, scheduler


def _logits(head: LinearHead, features: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)


def train_head(
    features: Tensor, labels: Tensor, num_classes: int, config: SegSettings, seed: int
) -> LinearHead:
    """Fit the linear head on cached features with random mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearHead(features.shape[1], num_classes)
    optimizer, scheduler = probe_optimizer(head.parameters(), config)
    head.train()
    for _ in range(config.iterations):
        index = torch.randint(len(features), (config.batch_size,), generator=generator)
        logits = _logits(head, features[index], tuple(labels.shape[-2:]))
        loss = F.cross_entropy(logits, labels[index], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return head.eval()


@torch.no_grad()
def evaluate_head(
    head: LinearHead, features: Tensor, labels: Tensor, num_classes: int, batch_size: int = 64
) -> SegmentationScores:
    confusion = ConfusionMatrix(num_classes)
    for start in range(0, len(features), batch_size):
        chunk = slice(start, start + batch_size)
        logits = _logits(head, features[chunk], tuple(labels.shape[-2:]))
        confusion.update(logits.argmax(1), labels[chunk])
    return confusion.compute()


def linear_probe_segmentation(
    backbone: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    num_classes: int,
    config: SegSettings,
    device: torch.device,
    seed: int = 0,
) -> SegmentationScores:
    """mIoU and friends of a linear probe trained on `train_set`, measured on `val_set`
    (the training recipe of `config`: iterations, batch, lr, weight decay, warm-up)."""
    train_features, train_labels = extract_features(backbone, train_set, config.n_layers, device)
    val_features, val_labels = extract_features(backbone, val_set, config.n_layers, device)
    head = train_head(train_features, train_labels, num_classes, config, seed)
    return evaluate_head(head, val_features, val_labels, num_classes)
