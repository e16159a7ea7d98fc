"""iBOT block masks and the batch collation that draws them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import collate_like_dinov2

from dinospec.data import MaskingGenerator
from dinospec.data.collate import stratified_mask_ratios


def components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected groups of masked patches."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            size += 1
            for n in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                inside = 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1]
                if inside and mask[n] and not seen[n]:
                    seen[n] = True
                    stack.append(n)
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("target", [13, 51, 128])
def test_masked_count_reaches_but_never_exceeds_the_target(target: int) -> None:
    generator = MaskingGenerator((16, 16))
    rng = np.random.default_rng(0)
    counts = np.array([generator(target, rng).sum() for _ in range(200)])
    assert counts.max() <= target
    assert counts.mean() >= 0.85 * target
    assert counts.min() >= min(target, 4)


def test_remainders_under_min_num_patches_are_filled() -> None:
    """As in DINOv2, a block's area is drawn between min_num_patches and what is left, so
    the last blocks of a mask can be smaller than the minimum and most masks reach the
    target exactly (the old rule, no block under the minimum, left remainders unfilled)."""
    generator = MaskingGenerator((14, 14), min_num_patches=6)
    rng = np.random.default_rng(1)
    masks = [generator(40, rng) for _ in range(200)]
    sizes = [s for mask in masks for s in components(mask)]
    assert min(sizes) < 6 and len(sizes) > 200
    assert np.mean([mask.sum() == 40 for mask in masks]) > 0.8


def test_block_aspect_ratio_is_log_uniform_in_range() -> None:
    generator = MaskingGenerator((32, 32), min_aspect=0.3)
    rng = np.random.default_rng(2)
    shapes = [generator.block_shape(200, rng) for _ in range(3000)]
    large = np.array([math.log(h / w) for h, w in shapes if h * w >= 40])
    assert large.min() >= math.log(0.3) - 0.2 and large.max() <= math.log(1 / 0.3) + 0.2
    assert large.min() < math.log(0.4) and large.max() > math.log(2.5)
    assert abs(np.median(large)) < 0.1
    assert generator.log_aspect_ratio == pytest.approx((math.log(0.3), math.log(1 / 0.3)))


def test_explicit_max_aspect_is_used() -> None:
    generator = MaskingGenerator((32, 32), min_aspect=0.5, max_aspect=1.0)
    rng = np.random.default_rng(3)
    shapes = [generator.block_shape(200, rng) for _ in range(500)]
    assert all(h <= w + 1 for h, w in shapes if h * w >= 40)


def test_defaults_follow_dinov2() -> None:
    generator = MaskingGenerator((16, 16))
    assert generator.max_num_patches == 128 and generator.min_num_patches == 4
    assert generator.num_patches == 256
    assert MaskingGenerator(7).num_patches == 49


def test_masks_are_reproducible_from_the_generator_alone() -> None:
    generator = MaskingGenerator((12, 10))
    np.random.seed(1)
    first = [generator(30, np.random.default_rng(5)) for _ in range(3)]
    np.random.seed(2)
    torch.manual_seed(2)
    again = [generator(30, np.random.default_rng(5)) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert first[0].shape == (12, 10) and first[0].dtype == bool
    other = generator(30, np.random.default_rng(6))
    assert not np.array_equal(first[0], other)


def test_zero_target_gives_an_empty_mask() -> None:
    assert not MaskingGenerator((8, 8))(0, np.random.default_rng(0)).any()


def crops_sample(index: int, n_global: int = 2, n_local: int = 3) -> tuple[dict, int]:
    """Crops filled with a value naming (crop, image), to check the stacking order."""
    return (
        {
            "global_crops": [torch.full((3, 16, 16), 10.0 * c + index) for c in range(n_global)],
            "local_crops": [torch.full((3, 8, 8), 100.0 + 10 * c + index) for c in range(n_local)],
        },
        0,
    )


class FirstPatches:
    """A mask generator that masks exactly the first n patches and records the requests."""

    def __init__(self, n_tokens: int) -> None:
        self.num_patches = n_tokens
        self.requests: list[int] = []

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        self.requests.append(n)
        return np.arange(self.num_patches) < n


def collate(batch_size: int = 4, seed: int = 0, **kwargs) -> dict:
    kwargs.setdefault("mask_generator", MaskingGenerator((4, 4)))
    samples = [crops_sample(i) for i in range(batch_size)]
    return collate_like_dinov2(samples, rng=np.random.default_rng(seed), **kwargs)


def test_collated_shapes_and_crop_major_order() -> None:
    out = collate()
    global_crops, local_crops = out["collated_global_crops"], out["collated_local_crops"]
    assert global_crops.shape == (8, 3, 16, 16) and local_crops.shape == (12, 3, 8, 8)
    assert global_crops[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert local_crops[:, 0, 0, 0].tolist() == [
        100 + 10 * c + i for c in range(3) for i in range(4)
    ]
    assert out["collated_masks"].shape == (8, 16) and out["collated_masks"].dtype == torch.bool


def test_masks_weight_gives_each_masked_image_weight_one() -> None:
    out = collate(batch_size=8, mask_generator=MaskingGenerator((8, 8)))
    masks = out["collated_masks"]
    masked_images = int((masks.sum(1) > 0).sum())
    assert masked_images == int(16 * 0.5)
    assert out["masks_weight"].sum().item() == pytest.approx(masked_images)
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [out["mask_indices_list"].numel()]
    assert out["masks_weight"].numel() == out["mask_indices_list"].numel()
    per_token_image = out["mask_indices_list"] // masks.shape[1]
    expected = 1.0 / masks.sum(1)[per_token_image]
    assert torch.allclose(out["masks_weight"], expected.float())


def test_mask_ratios_are_stratified_over_the_range() -> None:
    spy = FirstPatches(100)
    out = collate(batch_size=5, mask_generator=spy, mask_ratio_tuple=(0.1, 0.5))
    drawn = sorted(r for r in spy.requests if r)
    edges = np.linspace(0.1, 0.5, 6)
    for count, lo, hi in zip(drawn, edges[:-1], edges[1:], strict=True):
        assert int(100 * lo) <= count <= int(100 * hi)
    assert spy.requests.count(0) == 5
    assert sorted(out["collated_masks"].sum(1).tolist()) == sorted(drawn + [0] * 5)


def test_stratified_ratios_use_one_draw_per_slice() -> None:
    ratios = stratified_mask_ratios(4, (0.1, 0.5), np.random.default_rng(0))
    assert [int(r * 10) for r in ratios] == [1, 2, 3, 4]


def test_masked_images_are_shuffled_across_the_batch() -> None:
    positions = set()
    for seed in range(10):
        masks = collate(seed=seed, mask_generator=FirstPatches(16))["collated_masks"]
        positions.add(tuple((masks.sum(1) > 0).nonzero().flatten().tolist()))
    assert len(positions) > 3


def test_mask_probability_sets_the_number_of_masked_images() -> None:
    masks = collate(mask_probability=0.75, mask_generator=FirstPatches(16))["collated_masks"]
    assert int((masks.sum(1) > 0).sum()) == 6


def test_crops_are_cast_and_masks_reproducible() -> None:
    first, again = collate(dtype=torch.bfloat16), collate(dtype=torch.bfloat16)
    assert first["collated_global_crops"].dtype == torch.bfloat16
    assert first["collated_local_crops"].dtype == torch.bfloat16
    assert torch.equal(first["collated_masks"], again["collated_masks"])


def test_without_rng_masks_follow_torch_seed() -> None:
    samples = [crops_sample(i) for i in range(4)]
    results = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        out = collate_like_dinov2(samples, mask_generator=MaskingGenerator((8, 8)))
        results.append(out["collated_masks"])
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])
