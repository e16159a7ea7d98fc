"""Linear classification probe on precomputed frozen features (SPEC section 5).

The best learning rate of a linear probe differs between backbones by orders of
magnitude, so a whole grid is trained at once: one nn.Linear per learning rate, each in
its own optimizer parameter group, all fed the same mini-batches. Precomputed features
make each epoch a few matrix products, which is what makes the grid affordable. The
learning rate is chosen on a held-out part of train so the reported val accuracy is not
itself the result of a search on val.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eval.metrics import topk_accuracy

LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


@dataclass(frozen=True)
class LinearProbeConfig:
    lrs: tuple[float, ...] = LR_GRID
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    holdout_fraction: float = 0.1
    seed: int = 0


@dataclass
class LinearProbeResult:
    best_lr: float
    holdout_top1: dict[float, float]
    val_accuracy: dict[int, float]
    classifier: nn.Linear


@torch.no_grad()
def class_token_features(
    backbone: nn.Module, images: torch.Tensor, n_last_blocks: int = 1, avgpool: bool = False
) -> torch.Tensor:
    """[CLS] of the last `n_last_blocks` blocks, concatenated, optionally followed by the
    mean patch token of the last block (DINOv2's linear-probe inputs)."""
    layers = backbone.get_intermediate_layers(
        images, n_last_blocks, reshape=True, return_class_token=True, norm=True
    )
    parts = [cls for _, cls in layers]
    if avgpool:
        parts.append(layers[-1][0].mean(dim=(2, 3)))
    return torch.cat(parts, dim=1)


def extract_features(
    backbone: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    n_last_blocks: int = 1,
    avgpool: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every (images, labels) batch, kept as float32 on the CPU
    so a bank of a million samples does not occupy the accelerator."""
    backbone.eval()
    features, labels = [], []
    for images, targets in batches:
        out = class_token_features(backbone, images.to(device), n_last_blocks, avgpool)
        features.append(out.float().cpu())
        labels.append(targets.long().cpu())
    return torch.cat(features), torch.cat(labels)


def split_holdout(
    num_samples: int, fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (train, holdout) index sets, a seeded random `fraction` held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    holdout_size = max(1, round(num_samples * fraction))
    if holdout_size >= num_samples:
        raise ValueError(f"{num_samples} samples cannot spare {holdout_size} for a holdout")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[holdout_size:], order[:holdout_size]


class LinearGrid(nn.Module):
    """One linear classifier per learning rate; forward gives logits (L, B, C)."""

    def __init__(
        self, in_dim: int, num_classes: int, lrs: tuple[float, ...], seed: int = 0
    ) -> None:
        super().__init__()
        self.lrs = lrs
        self.heads = nn.ModuleList(nn.Linear(in_dim, num_classes) for _ in lrs)
        init = torch.Generator().manual_seed(seed)
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01, generator=init)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(features) for head in self.heads])


def make_optimizer(grid: LinearGrid, config: LinearProbeConfig) -> torch.optim.Optimizer:
    """One parameter group per head, so each head gets its own learning rate."""
    groups = [
        {"params": head.parameters(), "lr": lr}
        for head, lr in zip(grid.heads, grid.lrs, strict=True)
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose 'sgd' or 'adamw'")


def grid_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: the heads share no parameter, so
    each receives exactly the gradient it would get if trained alone."""
    num_heads, _, num_classes = logits.shape
    mean_over_heads = F.cross_entropy(logits.reshape(-1, num_classes), labels.repeat(num_heads))
    return mean_over_heads * num_heads


def fit_grid(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, config: LinearProbeConfig
) -> LinearGrid:
    """Train every head of the grid for `config.epochs` with a per-step cosine decay."""
    grid = LinearGrid(features.shape[1], num_classes, config.lrs, config.seed)
    grid = grid.to(features.device)
    optimizer = make_optimizer(grid, config)
    steps_per_epoch = -(-features.shape[0] // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs * steps_per_epoch
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    for _ in range(config.epochs):
        order = torch.randperm(features.shape[0], generator=shuffle).to(features.device)
        for batch in order.split(config.batch_size):
            loss = grid_loss(grid(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return grid


@torch.no_grad()
def grid_accuracy(
    grid: LinearGrid, features: torch.Tensor, labels: torch.Tensor
) -> list[dict[int, float]]:
    """Top-1 / top-5 of every head, in grid order."""
    logits = grid(features)
    return [topk_accuracy(head_logits, labels, (1, 5)) for head_logits in logits]


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    config: LinearProbeConfig | None = None,
) -> LinearProbeResult:
    """Fit the grid on train minus a holdout, keep the head best on the holdout (the
    smaller learning rate on a tie), report that head on val."""
    config = config or LinearProbeConfig()
    fit_idx, holdout_idx = split_holdout(
        train_features.shape[0], config.holdout_fraction, config.seed
    )
    grid = fit_grid(train_features[fit_idx], train_labels[fit_idx], num_classes, config)
    holdout = grid_accuracy(grid, train_features[holdout_idx], train_labels[holdout_idx])
    holdout_top1 = [acc[1] for acc in holdout]
    best = max(range(len(config.lrs)), key=lambda i: (holdout_top1[i], -config.lrs[i]))
    head = grid.heads[best]
    with torch.no_grad():
        val = topk_accuracy(head(val_features), val_labels, (1, 5))
    return LinearProbeResult(
        best_lr=config.lrs[best],
        holdout_top1=dict(zip(config.lrs, holdout_top1, strict=True)),
        val_accuracy=val,
        classifier=head,
    )
