"""Training a linear segmentation probe on cached frozen features.

When the training images are not augmented, the frozen backbone's features are the same at
every iteration, so they are computed once and the probe trains on them directly; this is
what makes a probe affordable on a CPU. The head, loss and schedule are those of SPEC
section 5 (BatchNorm + 1x1 conv, bilinear upsampling, AdamW, warm-up then cosine).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from eval.metrics import IGNORE_INDEX, ConfusionMatrix, SegmentationScores
from eval.seg_head import FrozenPatchFeatures, LinearHead

if TYPE_CHECKING:
    from eval.config import SegSettings


@dataclass(frozen=True)
class SegProbeConfig:
    iterations: int = 40_000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_iterations: int = 1500
    n_layers: int = 1
    seed: int = 0


def probe_config(s: SegSettings, seed: int) -> SegProbeConfig:
    """The training recipe part of an evaluation config's `seg` section."""
    return SegProbeConfig(
        iterations=s.iterations,
        batch_size=s.batch_size,
        lr=s.lr,
        weight_decay=s.weight_decay,
        warmup_iterations=s.warmup_iterations,
        n_layers=s.n_layers,
        seed=seed,
    )


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


def _lr_factor(iteration: int, config: SegProbeConfig) -> float:
    if iteration < config.warmup_iterations:
        return (iteration + 1) / config.warmup_iterations
    progress = (iteration - config.warmup_iterations) / max(
        1, config.iterations - config.warmup_iterations
    )
    return 0.5 * (1 + math.cos(math.pi * progress))


def probe_optimizer(
    parameters: Iterable[nn.Parameter], config: SegProbeConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up then cosine, stepped once per iteration (SPEC section 5);
    shared by the cached-feature and the augmented training of the head."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _lr_factor(i, config))
    return optimizer, scheduler


def _logits(head: LinearHead, features: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)


def train_head(
    features: Tensor, labels: Tensor, num_classes: int, config: SegProbeConfig
) -> LinearHead:
    """Fit the linear head on cached features with random mini-batches."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
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
    config: SegProbeConfig,
    device: torch.device,
) -> SegmentationScores:
    """mIoU and friends of a linear probe trained on `train_set`, measured on `val_set`."""
    train_features, train_labels = extract_features(backbone, train_set, config.n_layers, device)
    val_features, val_labels = extract_features(backbone, val_set, config.n_layers, device)
    head = train_head(train_features, train_labels, num_classes, config)
    return evaluate_head(head, val_features, val_labels, num_classes)
