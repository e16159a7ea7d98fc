"""Batch assembly for self-supervised training: stacked crops plus iBOT masks, as DINOv2.

Crops are stacked crop-major (every image's first global crop, then every image's second),
which is the order the losses assume when they pair student and teacher views.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

MaskFn = Callable[[int, np.random.Generator], np.ndarray]


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict[str, Any], Any]],
    *,
    mask_generator: MaskFn,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Collate (crops dict, target) samples into one training batch.

    `rng` drives the mask ratios, the masks and their order. Leave it None inside a
    DataLoader: a Generator bound into the collate function is copied into every worker
    with the same state, so all workers would draw the same masks; with None a fresh
    Generator is seeded from torch's RNG, which the DataLoader seeds per worker.
    """
    rng = _rng_from_torch() if rng is None else rng
    n_tokens = _token_count(mask_generator, n_tokens)
    global_crops = stack_crops(samples_list, "global_crops")
    local_crops = stack_crops(samples_list, "local_crops")
    counts, upperbound = rank_mask_counts(
        global_crops.shape[0], mask_probability, mask_ratio_tuple, n_tokens, rng
    )
    masks = [mask_generator(int(count), rng) for count in counts]
    collated_masks = torch.from_numpy(np.stack(masks)).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight(collated_masks),
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), mask_indices_list.numel(), dtype=torch.long),
    }


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
) -> tuple[np.ndarray, int]:
    """How many tokens to mask in each of one rank's `n_images` global crops, in batch
    order, and DINOv2's `upperbound`. As in DINOv2's collate, which runs once per rank,
    int(n_images * mask_probability) crops get one stratified ratio each (so every rank's
    batch spans the whole ratio range), the others none, and which crops get which is a
    random permutation of the batch."""
    n_masked = int(n_images * mask_probability)
    ratios, upperbound = stratified_mask_ratios(n_masked, bounds, n_tokens, rng)
    counts = np.zeros(n_images, dtype=np.int64)
    counts[rng.permutation(n_images)[:n_masked]] = mask_counts(ratios, n_tokens)
    return counts, upperbound


def stratified_mask_ratios(
    n: int, bounds: tuple[float, float], n_tokens: int, rng: np.random.Generator
) -> tuple[list[float], int]:
    """One ratio drawn uniformly in each of n equal slices of `bounds`, so a batch always
    spans easy and hard masking instead of clustering by chance; also returns the largest
    total number of masked tokens these slices allow (DINOv2's `upperbound`).

    DINOv2 cuts the slices with a float32 `torch.linspace` and draws the ratios in float32;
    so do these, since float64 edges truncate differently at some slice ends (36 tokens
    over 12 masked images: an upperbound of 132 instead of DINOv2's 131). The ratios are
    float32 values; pass them to mask_counts for DINOv2's token counts.
    """
    edges = torch.linspace(bounds[0], bounds[1], n + 1).numpy()
    lows, highs = edges[:-1], edges[1:]
    ratios = lows + (highs - lows) * rng.random(n).astype(np.float32)
    upperbound = int(mask_counts(highs, n_tokens).sum())
    return ratios.tolist(), upperbound


def mask_counts(ratios: Sequence[float] | np.ndarray, n_tokens: int) -> np.ndarray:
    """int(n_tokens * ratio) for each ratio, with the product in float32 as DINOv2 takes it
    (a Python int times a float32 tensor), so counts agree with DINOv2's at every ratio."""
    products = np.float32(n_tokens) * np.asarray(ratios, dtype=np.float32)
    return products.astype(np.int64)


def masks_weight(collated_masks: Tensor) -> Tensor:
    """1 / (masked tokens in the same image) for each masked token, in flattened order, so
    every masked image contributes equally to the iBOT loss whatever its mask size."""
    per_image = 1.0 / collated_masks.sum(-1).clamp(min=1.0)
    return per_image.unsqueeze(-1).expand_as(collated_masks)[collated_masks]


def _token_count(mask_generator: MaskFn, n_tokens: int | None) -> int:
    grid = getattr(mask_generator, "num_patches", None)
    if n_tokens is None and grid is None:
        raise ValueError("n_tokens is required when the mask generator has no num_patches")
    if n_tokens is not None and grid is not None and n_tokens != grid:
        raise ValueError(f"n_tokens={n_tokens} but the mask generator covers {grid} patches")
    return n_tokens if n_tokens is not None else grid


def _rng_from_torch() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
