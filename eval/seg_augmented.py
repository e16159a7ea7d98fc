"""Training the linear segmentation head on augmented crops (SPEC section 5), in one
process or split over several.

The global batch (`seg.batch_size`, 16 in SPEC) is shared out over the ranks: each rank
runs the frozen backbone on its slots of every global batch, BatchNorm statistics cover
the global batch, the loss is the mean over the global batch's labelled pixels and the
gradients are summed over ranks, so every step is the one a single process would take.
Samples come from dinospec's global index stream and each one is augmented with a
generator seeded by its position in that stream, so the crops the head sees do not depend
on the number of ranks or of loader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from dinospec.config import ConfigError
from dinospec.data.samplers import InfiniteDistributedSampler
from eval.config import EvalConfig
from eval.global_bn import GlobalBatchNorm2d
from eval.metrics import IGNORE_INDEX, sum_across_ranks
from eval.runner import Console
from eval.seg_data import PairTransform, SegmentationDataset
from eval.seg_head import LinearSegmenter
from eval.seg_probe import probe_optimizer
from eval.seg_transforms import SegTrainTransform
from eval.sharding import Ranks

Key = tuple[int, int]
"""(dataset index, position in the global sample stream)."""


class GlobalBatches(Sampler[list[Key]]):
    """This rank's keys of every global batch, forever: global batch b is the stream's
    positions [b * size, (b + 1) * size), and position p belongs to rank p % world_size."""

    def __init__(self, dataset_size: int, batch_size: int, ranks: Ranks, seed: int) -> None:
        if batch_size < ranks.world_size:
            raise ConfigError(
                f"seg.batch_size: a global batch of {batch_size} cannot be shared out over "
                f"{ranks.world_size} processes"
            )
        self.stream = InfiniteDistributedSampler(dataset_size, ranks.rank, ranks.world_size, seed)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[Key]]:
        batch: list[Key] = []
        current = 0
        for position, index in self.stream.with_positions():
            if position // self.batch_size != current:
                yield batch
                batch, current = [], position // self.batch_size
            batch.append((index, position))


class SeededAugmentation(Dataset):
    """The augmented pair of a key: the transform `augmentation(generator=...)` builds, with
    a generator seeded by (seed, position), so the same whichever rank or worker reads it."""

    def __init__(
        self,
        pairs: Dataset,
        augmentation: Callable[..., PairTransform],
        seed: int,
    ) -> None:
        self.pairs = pairs
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        index, position = key
        state = np.random.SeedSequence([self.seed, position]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        return self.augmentation(generator=generator)(*self.pairs[index])


def global_batch_step(
    segmenter: LinearSegmenter,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """One step on the global batch of which this rank holds `images`; returns the global
    batch's mean loss."""
    logits = segmenter(images)
    labelled = sum_across_ranks((labels != IGNORE_INDEX).sum()).clamp(min=1)
    summed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    loss = summed / labelled
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for param in segmenter.head.parameters():
        param.grad = sum_across_ranks(param.grad)
    optimizer.step()
    return sum_across_ranks(loss.detach())


def train_augmented(
    segmenter: LinearSegmenter,
    train_set: SegmentationDataset,
    config: EvalConfig,
    console: Console,
    ranks: Ranks,
) -> dict[str, Any]:
    """SPEC's recipe: every iteration a fresh random rescale (0.5-2.0), crop and flip."""
    s = config.seg
    device = next(segmenter.head.parameters()).device
    train_set.transform = None
    loader = DataLoader(
        SeededAugmentation(
            train_set, partial(SegTrainTransform, s.base_size, s.crop_size), config.seed
        ),
        batch_sampler=GlobalBatches(
            len(train_set), min(s.batch_size, len(train_set)), ranks, config.seed
        ),
        num_workers=config.dataset.num_workers,
    )
    segmenter.head.bn = GlobalBatchNorm2d.replacing(segmenter.head.bn)
    optimizer, scheduler = probe_optimizer(segmenter.head.parameters(), s)
    console.phase(f"training the head on augmented crops for {s.iterations} iterations")
    segmenter.train()
    batches = iter(loader)
    loss = torch.zeros(())
    for _ in console.progress(range(s.iterations), s.iterations, "train head"):
        images, labels = next(batches)
        loss = global_batch_step(segmenter, optimizer, images.to(device), labels.to(device))
        scheduler.step()
    return {
        "mode": "augmented",
        "augmentation": "random rescale 0.5-2.0, crop, flip",
        "final_loss": loss.item(),
    }
