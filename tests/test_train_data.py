"""The training loader's collator and augmentation as the config asks for them."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from train_helpers import tiny_config

from dinospec.config import ConfigError
from dinospec.train.data import (
    StepCollator,
    build_augmentation,
    build_image_dataset,
    build_loader,
    to_device,
)

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


GRAM = ("gram.loss_weight=1.0", "gram.start_iteration=2")


def batch_digest(batch: dict) -> str:
    """sha256 of every key, and of each tensor's dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            digest.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
            digest.update(value.contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(f"{key}={value}".encode())
    return digest.hexdigest()


def step_batch(tmp_path, *overrides: str, step: int = 3) -> dict:
    config = tiny_config(tmp_path, *overrides)
    return next(build_loader(config, build_image_dataset(config), 0, 1, step))


@pytest.mark.parametrize("overrides", [GRAM, (*GRAM, "gram.upscale=1.0")])
def test_gram_at_factor_one_leaves_the_batches_as_they_were(tmp_path, overrides):
    """At gram.upscale 1 the Gram teacher takes the global crops: no extra crops, and the
    batch is bit for bit the one without the Gram term. (Compared live, not with a stored
    digest: bicubic resizing and blur may round differently on another CPU.)"""
    plain = step_batch(tmp_path / "plain")
    batch = step_batch(tmp_path / "gram", *overrides)
    assert "collated_gram_crops" not in batch
    assert batch_digest(batch) == batch_digest(plain)


def test_gram_at_factor_two_adds_the_views_at_twice_the_size(tmp_path):
    """The loader's batch carries the Gram crops (crop-major like the global crops, uint8
    until to_device standardizes them); everything else is the factor-1 batch's except
    the global crops, now resized down from the Gram crops."""
    before = step_batch(tmp_path, *GRAM)
    batch = step_batch(tmp_path, *GRAM, "gram.upscale=2.0")
    gram = batch["collated_gram_crops"]
    assert gram.shape == (2 * 4, 3, 64, 64) and gram.dtype == torch.uint8
    assert batch["collated_global_crops"].shape == before["collated_global_crops"].shape
    for key in ("collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight"):
        assert torch.equal(batch[key], before[key])
    moved = to_device(batch, torch.device("cpu"))
    assert moved["collated_gram_crops"].dtype == torch.float32


@pytest.mark.parametrize("upscale", ["1.125", "1.1"])
def test_gram_crops_that_do_not_fit_the_patch_size_are_refused(tmp_path, upscale):
    """32 px global crops, 8 px patches: x1.125 = 36 px is no whole number of patches, and
    x1.1 = 35.2 px no whole number of pixels."""
    with pytest.raises(ConfigError, match=f"gram.upscale={upscale}: makes Gram teacher crops"):
        tiny_config(tmp_path, *GRAM, f"gram.upscale={upscale}")
