"""iBOT masks and their collation against DINOv2's own MaskingGenerator and collate.

The reference modules are imported from ../shared/reference/dinov2. The generators draw
from different random sources (Python's `random` there, a numpy Generator here), so masks
are compared by their statistics over many draws, each seeded, with tolerances set by the
number of draws: 5 standard errors for means and fractions, and for distributions the
two-sample Kolmogorov-Smirnov bound at a 1e-4 level (or, for the few values a masked count
takes, a total variation of 0.05, about three times what two reference samples of this
size differ by). The collation is compared exactly, by giving both the same uniform draw.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from helpers import collate_like_dinov2, dinov2

from dinospec.data import MaskingGenerator

reference_collate = dinov2("dinov2.data.collate")
ReferenceGenerator = dinov2("dinov2.data.masking").MaskingGenerator

GRID = 16  # 224 px crops, patch 14
MAX_PATCHES = 0.5 * GRID * GRID  # DINOv2's train.py
DRAWS = 2000
KS_LEVEL = 1e-4
COUNT_TV = 0.05


def reference_generator() -> ReferenceGenerator:
    return ReferenceGenerator((GRID, GRID), max_num_patches=MAX_PATCHES)


def dinospec_generator() -> MaskingGenerator:
    return MaskingGenerator((GRID, GRID), max_num_patches=MAX_PATCHES)


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    values = np.union1d(a, b)
    pa = np.array([(a == v).mean() for v in values])
    pb = np.array([(b == v).mean() for v in values])
    return 0.5 * float(np.abs(pa - pb).sum())


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_bound(n: int, m: int) -> float:
    """Two-sample KS critical value at KS_LEVEL (conservative for discrete values)."""
    return math.sqrt(-math.log(KS_LEVEL / 2) / 2) * math.sqrt((n + m) / (n * m))


def assert_means_agree(a: np.ndarray, b: np.ndarray, what: str) -> None:
    error = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= 5 * error + 1e-12, (what, a.mean(), b.mean())


def assert_fractions_agree(a: np.ndarray, b: np.ndarray, what: str) -> None:
    p = (a.sum() + b.sum()) / (len(a) + len(b))
    error = math.sqrt(p * (1 - p) * (1 / len(a) + 1 / len(b)))
    assert abs(a.mean() - b.mean()) <= 5 * error + 1e-12, (what, a.mean(), b.mean())


@pytest.mark.parametrize("asked", [5, 25, 77, 128])
def test_masked_counts_follow_dinov2(asked):
    """Mean count, how often the asked count is hit (DINOv2: about 90%), and the whole
    count distribution, per asked count; 25 is DINOv2's 10% of a 16 x 16 grid."""
    random.seed(asked)
    reference = reference_generator()
    expected = np.array([reference(asked).sum() for _ in range(DRAWS)])
    generator, rng = dinospec_generator(), np.random.default_rng(asked)
    actual = np.array([generator(asked, rng).sum() for _ in range(DRAWS)])
    assert actual.max() <= asked
    assert_means_agree(actual, expected, "mean masked count")
    assert_fractions_agree(actual == asked, expected == asked, "fraction hitting the count")
    assert total_variation(actual, expected) <= COUNT_TV


def block_bounding_box(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return len(rows), len(cols)


@pytest.mark.parametrize("budget", [2, 3, 10, 128])
def test_block_shapes_follow_dinov2(budget):
    """One block placed on an empty grid with `budget` patches left (each generator's
    one-block step; no public call places a single block): its area and log aspect ratio.
    Budgets under the 4-patch minimum are the remainders DINOv2 fills with small blocks."""
    random.seed(budget)
    reference = reference_generator()
    expected = []
    for _ in range(DRAWS):
        mask = np.zeros((GRID, GRID), dtype=bool)
        reference._mask(mask, budget)
        expected.append(block_bounding_box(mask))
    generator, rng = dinospec_generator(), np.random.default_rng(budget)
    actual = []
    for _ in range(DRAWS):
        mask = np.zeros((GRID, GRID), dtype=bool)
        generator._add_block(mask, budget, rng)
        actual.append(block_bounding_box(mask))
    expected, actual = np.array(expected), np.array(actual)
    bound = ks_bound(DRAWS, DRAWS)
    assert ks_statistic(actual.prod(1), expected.prod(1)) <= bound
    assert_means_agree(actual.prod(1), expected.prod(1), "mean block area")
    assert_fractions_agree(actual.prod(1) < 4, expected.prod(1) < 4, "blocks under 4 patches")
    placed_a, placed_e = actual[actual.prod(1) > 0], expected[expected.prod(1) > 0]
    log_aspect_a = np.log(placed_a[:, 0] / placed_a[:, 1])
    log_aspect_e = np.log(placed_e[:, 0] / placed_e[:, 1])
    assert ks_statistic(log_aspect_a, log_aspect_e) <= ks_bound(len(placed_a), len(placed_e))


class FirstPatches:
    """Masks the first n patches (so equal requests give equal masks) and records them."""

    def __init__(self, n_tokens: int) -> None:
        self.num_patches = n_tokens
        self.requests: list[int] = []

    def __call__(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        self.requests.append(int(n))
        return np.arange(self.num_patches) < n


class FixedUniform:
    """A numpy Generator whose uniform draws all equal `u`; permutations stay random."""

    def __init__(self, u: float, seed: int) -> None:
        self.u = u
        self.rng = np.random.default_rng(seed)

    def random(self, size: int) -> np.ndarray:
        return np.full(size, self.u)

    def permutation(self, n: int) -> np.ndarray:
        return self.rng.permutation(n)


def samples(n_images: int) -> list[tuple[dict, None]]:
    crops = {"global_crops": [torch.zeros(3, 4, 4)] * 2, "local_crops": [torch.zeros(3, 2, 2)]}
    return [(crops, None) for _ in range(n_images)]


# (images per rank, tokens, ratio bounds, mask probability); 12 images of 36 tokens is
# where float32 and float64 slice edges truncate differently (upperbound 131 vs 132).
COLLATE_CASES = [
    (64, 256, (0.1, 0.5), 0.5),
    (12, 36, (0.1, 0.5), 0.5),
    (10, 16, (0.2, 0.6), 0.5),
    (5, 100, (0.1, 0.4), 0.75),
    (3, 196, (0.1, 0.5), 0.0),
]


@pytest.mark.parametrize("u", [0.0, 0.3, 0.5, 0.9, 1 - 2**-53])
@pytest.mark.parametrize("case", COLLATE_CASES)
def test_collate_matches_dinov2_given_the_same_uniform_draw(case, u, monkeypatch):
    """With every uniform draw equal to u (random.uniform(lo, hi) computes lo + (hi - lo)
    * random(), here on DINOv2's float32 tensors), both collates ask the same count for
    each stratum of the masked images, mask as many images, report as many masked patches,
    and their masks, indices, weights and counts agree once images are sorted (the
    shuffles differ)."""
    n_images, n_tokens, bounds, probability = case
    monkeypatch.setattr(reference_collate.random, "uniform", lambda lo, hi: lo + (hi - lo) * u)
    reference_spy, spy = FirstPatches(n_tokens), FirstPatches(n_tokens)
    expected = reference_collate.collate_data_and_cast(
        samples(n_images), bounds, probability, torch.float32, n_tokens, reference_spy
    )
    actual = collate_like_dinov2(
        samples(n_images),
        mask_generator=spy,
        mask_ratio_tuple=bounds,
        mask_probability=probability,
        rng=FixedUniform(u, seed=n_images),
    )
    assert sorted(spy.requests) == sorted(reference_spy.requests)
    assert actual["n_masked_patches"].tolist() == expected["n_masked_patches"].tolist()
    masks = actual["collated_masks"]
    assert torch.equal(_sorted_rows(masks), _sorted_rows(expected["collated_masks"]))
    assert torch.equal(actual["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert torch.equal(actual["masks_weight"].sort().values, expected["masks_weight"].sort().values)


def _sorted_rows(masks: torch.Tensor) -> torch.Tensor:
    return masks[masks.sum(1).argsort(stable=True)]


def test_every_image_slot_is_equally_likely_to_be_masked():
    """DINOv2 shuffles the masks over the rank's batch: each global-crop slot is masked
    with probability n_masked / B."""
    spy = FirstPatches(16)
    n_draws, n_images = 1000, 4
    masked = torch.zeros(2 * n_images)
    for seed in range(n_draws):
        out = collate_like_dinov2(
            samples(n_images), mask_generator=spy, rng=np.random.default_rng(seed)
        )
        masked += out["collated_masks"].any(1).float()
    error = math.sqrt(0.25 / n_draws)
    assert (masked / n_draws - 0.5).abs().max() <= 5 * error
