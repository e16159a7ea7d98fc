"""The parts of a training batch that follow DINOv2's collate: crop-major stacks and how
many patches each global crop masks (the training collator, dinospec.train.data, draws
them from its own seeded streams).

Crops are stacked crop-major (every image's first global crop, then every image's second),
which is the order the losses assume when they pair student and teacher views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def stack_crops(samples_list: Sequence[tuple[dict[str, Any], Any]], key: str) -> Tensor:
    """Crop-major stack: index `crop * batch + image`; an empty tensor when there are no
    such crops (a config with `local_crops_number: 0`)."""
    n_crops = len(samples_list[0][0][key])
    if n_crops == 0:
        return torch.empty(0)
    return torch.stack([sample[0][key][c] for c in range(n_crops) for sample in samples_list])


def rank_mask_counts(
    n_images: int,
    mask_probability: float,
    bounds: tuple[float, float],
    n_tokens: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """How many tokens to mask in each of one rank's `n_images` global crops, in batch
    order. As in DINOv2's collate, which runs once per rank,
    int(n_images * mask_probability) crops get one stratified ratio each (so every rank's
    batch spans the whole ratio range), the others none, and which crops get which is a
    random permutation of the batch."""
    n_masked = int(n_images * mask_probability)
    ratios = stratified_mask_ratios(n_masked, bounds, rng)
    counts = np.zeros(n_images, dtype=np.int64)
    counts[rng.permutation(n_images)[:n_masked]] = mask_counts(ratios, n_tokens)
    return counts


def stratified_mask_ratios(
    n: int, bounds: tuple[float, float], rng: np.random.Generator
) -> list[float]:
    """One ratio drawn uniformly in each of n equal slices of `bounds`, so a batch always
    spans easy and hard masking instead of clustering by chance.

    DINOv2 cuts the slices with a float32 `torch.linspace` and draws the ratios in float32;
    so do these, since float64 edges truncate differently at some slice ends (36 tokens
    over 12 masked images). The ratios are float32 values; pass them to mask_counts for
    DINOv2's token counts.
    """
    edges = torch.linspace(bounds[0], bounds[1], n + 1).numpy()
    lows, highs = edges[:-1], edges[1:]
    ratios = lows + (highs - lows) * rng.random(n).astype(np.float32)
    return ratios.tolist()


def mask_counts(ratios: Sequence[float] | np.ndarray, n_tokens: int) -> np.ndarray:
    """int(n_tokens * ratio) for each ratio, with the product in float32 as DINOv2 takes it
    (a Python int times a float32 tensor), so counts agree with DINOv2's at every ratio."""
    products = np.float32(n_tokens) * np.asarray(ratios, dtype=np.float32)
    return products.astype(np.int64)
