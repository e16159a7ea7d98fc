"""Small model factories for tests: tiny sizes so every test runs in seconds on a CPU."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dinospec.config import ModelConfig, SpecializeConfig
from dinospec.models import DinoVisionTransformer

EVERYTHING = SpecializeConfig(
    norm1_blocks="all",
    qkv_blocks="all",
    proj_blocks="all",
    norm2_blocks="all",
    ffn_in_blocks="all",
    ffn_out_blocks="all",
    final_norm=True,
)
PAPER = SpecializeConfig(norm1_blocks="all", norm2_blocks="all", qkv_blocks=0.3333)


def tiny_vit(specialize: SpecializeConfig | None = None, **overrides) -> DinoVisionTransformer:
    kwargs = dict(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=4,
        init_values=1e-5,
        num_register_tokens=2,
    )
    kwargs.update(overrides)
    return DinoVisionTransformer(ModelConfig(specialize=specialize or SpecializeConfig(), **kwargs))


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (LayerScale, norms and tokens included), so no
    initialization symmetry can hide a routing mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


DINOV2_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dinov2"


def dinov2(module: str) -> ModuleType:
    """A module of DINOv2's own code (../shared/reference/dinov2, imported unchanged), the
    peer the recipe tests compare against; its warnings that xFormers is missing are
    expected."""
    if not (DINOV2_REFERENCE / "dinov2").is_dir():
        pytest.fail(f"DINOv2 reference code not found at {DINOV2_REFERENCE}")
    if str(DINOV2_REFERENCE) not in sys.path:
        sys.path.insert(0, str(DINOV2_REFERENCE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def collate_like_dinov2(
    samples: list,
    *,
    mask_generator,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    rng=None,
) -> dict:
    """DINOv2's `collate_data_and_cast` assembled from the pieces dinospec's training
    collator uses (crop stacks, per-rank mask counts, patch weights), with one numpy
    Generator for every draw, so the tests can hold those pieces against DINOv2's."""
    import numpy as np

    from dinospec.data.collate import rank_mask_counts, stack_crops
    from dinospec.losses.ibot import masked_patch_weights

    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
    global_crops = stack_crops(samples, "global_crops")
    n_tokens = mask_generator.num_patches
    counts = rank_mask_counts(
        global_crops.shape[0], mask_probability, mask_ratio_tuple, n_tokens, rng
    )
    masks = torch.from_numpy(np.stack([mask_generator(int(c), rng) for c in counts])).flatten(1)
    indices = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": stack_crops(samples, "local_crops").to(dtype),
        "collated_masks": masks,
        "mask_indices_list": indices,
        "masks_weight": masked_patch_weights(masks),
        "n_masked_patches": torch.tensor([indices.numel()]),
    }
