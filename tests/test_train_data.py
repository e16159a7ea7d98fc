"""The training loader's collator and augmentation as the config asks for them."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import tiny_config

from dinospec.train.data import StepCollator, build_augmentation

PER_RANK, WORLD, GRID = 8, 2, 16


def _rank_counts(stratification: str, rank: int, step: int, tmp_path) -> list[int]:
    config = tiny_config(tmp_path, f"ibot.mask_stratification={stratification}")
    collator = StepCollator(config, PER_RANK * WORLD, GRID, rank)
    rows = list(range(rank, PER_RANK * WORLD, WORLD))
    return collator.slot_counts(step, rows)


def _one_per_slice(counts: list[int]) -> bool:
    """Whether the masked crops' counts, sorted, fall one into each equal slice of
    [0.1, 0.5] of the token count (truncated as the counts are)."""
    masked = sorted(c for c in counts if c)
    edges = np.floor(np.linspace(0.1, 0.5, len(masked) + 1) * GRID**2)
    return all(lo <= c <= hi for c, lo, hi in zip(masked, edges[:-1], edges[1:], strict=True))


@pytest.mark.parametrize("rank", range(WORLD))
def test_each_rank_stratifies_its_own_batch_as_dinov2(rank, tmp_path):
    """DINOv2's collate runs per GPU: each rank masks int(2B * 0.5) of its 2B global crops,
    one ratio from each slice, whatever the other ranks drew."""
    for step in range(20):
        counts = _rank_counts("rank", rank, step, tmp_path)
        assert len(counts) == 2 * PER_RANK
        assert sum(c > 0 for c in counts) == PER_RANK
        assert _one_per_slice(counts)


def test_global_stratification_spreads_slices_over_ranks(tmp_path):
    """Over the global batch, a rank holds some of the slices, not one of each: the masks
    of a step are the same on one process or many, at the cost of DINOv2's per-rank spread."""
    for step in range(20):
        ranks = [_rank_counts("global", rank, step, tmp_path) for rank in range(WORLD)]
        assert sum(c > 0 for counts in ranks for c in counts) == WORLD * PER_RANK
        assert _one_per_slice([c for counts in ranks for c in counts])
    uneven = [
        rank
        for step in range(20)
        for rank in range(WORLD)
        if sum(c > 0 for c in _rank_counts("global", rank, step, tmp_path)) != PER_RANK
    ]
    assert uneven


def test_blur_probabilities_reach_the_training_augmentation(tmp_path):
    config = tiny_config(
        tmp_path,
        "crops.blur_prob_global1=1.0",
        "crops.blur_prob_global2=0.1",
        "crops.blur_prob_local=0.25",
    )
    augmentation = build_augmentation(config)
    transforms = (
        augmentation.global_transform_1,
        augmentation.global_transform_2,
        augmentation.local_transform,
    )
    assert [t.transforms[1].p for t in transforms] == [1.0, 0.1, 0.25]
