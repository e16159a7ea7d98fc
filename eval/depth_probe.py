"""Training DINOv2's linear depth head on augmented views through the frozen backbone.

Every iteration takes a batch of random training views (eval.depth_transforms), runs the
frozen backbone and the head, and makes one AdamW step on SigLoss + gradient loss
(eval.depth_loss) with gradients clipped at norm 35. The learning rate follows mmcv's
CosineAnnealing with linear warm-up as DINOv2's depth configs set it: a cosine over the
whole run from `lr` down to lr x 1e-8, multiplied during the warm-up by a factor rising
linearly from 0.001 to 1. Those configs also set mmcv's OneCycle momentum hook, which
varies Adam's beta1 over the run; beta1 stays at 0.9 here.

Samples come from a seeded stream and each view is drawn from a generator seeded by its
position in it (eval.seg_augmented), so the views do not depend on the number of loader
workers. One process trains the head.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from eval.config import EvalConfig
from eval.depth_data import DepthDataset
from eval.depth_head import LinearDepther
from eval.depth_loss import depth_loss
from eval.depth_transforms import DepthTrainTransform
from eval.runner import Console
from eval.seg_augmented import GlobalBatches, SeededAugmentation
from eval.sharding import Ranks

WARMUP_RATIO = 1e-3
MIN_LR_RATIO = 1e-8
AUGMENTATION = "rotate +-2.5 deg, flip, random crop, colour jitter (p = 0.5 each but the crop)"


def lr_factor(iteration: int, iterations: int, warmup: int) -> float:
    """Multiple of the base learning rate at `iteration` (mmcv's cosine with warm-up)."""
    cosine = (
        MIN_LR_RATIO + (1 - MIN_LR_RATIO) * (1 + math.cos(math.pi * iteration / iterations)) / 2
    )
    if iteration < warmup:
        cosine *= 1 - (1 - iteration / warmup) * (1 - WARMUP_RATIO)
    return cosine


def train_depth_head(
    depther: LinearDepther,
    train_set: DepthDataset,
    config: EvalConfig,
    console: Console,
    border_crop: bool,
) -> dict[str, Any]:
    """Fit `depther.head`; returns what results.json records of the training. A batch
    without any valid depth (a non-finite loss) is skipped and counted."""
    d = config.depth
    device = next(depther.head.parameters()).device
    train_set.transform = None
    crop = (d.crop_size[0], d.crop_size[1])
    views = SeededAugmentation(
        train_set, partial(DepthTrainTransform, crop, border_crop), config.seed
    )
    single = Ranks(0, 1, device)
    loader = DataLoader(
        views,
        batch_sampler=GlobalBatches(len(train_set), d.batch_size, single, config.seed),
        num_workers=config.dataset.num_workers,
    )
    optimizer = torch.optim.AdamW(depther.head.parameters(), lr=d.lr, weight_decay=d.weight_decay)
    schedule = partial(lr_factor, iterations=d.iterations, warmup=d.warmup_iterations)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    console.phase(f"training the depth head on augmented crops for {d.iterations} iterations")
    depther.train()
    batches = iter(loader)
    loss, skipped = torch.zeros(()), 0
    for iteration in console.progress(range(d.iterations), d.iterations, "train head"):
        images, depths = next(batches)
        pred = depther(images.to(device))
        loss = depth_loss(pred, depths.to(device), d.gradient_loss_weight, iteration)
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(depther.head.parameters(), d.grad_clip)
            optimizer.step()
        else:
            skipped += 1
        scheduler.step()
    depther.eval()
    return {
        "mode": "augmented",
        "augmentation": AUGMENTATION,
        "final_loss": loss.item(),
        "skipped_steps": skipped,
    }
