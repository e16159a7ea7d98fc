"""Small model factories for tests: tiny sizes so every test runs in seconds on a CPU."""

from __future__ import annotations

import torch

from dinospec.config import SpecializeConfig
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
    return DinoVisionTransformer(specialize=specialize, **kwargs)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (LayerScale, norms and tokens included), so no
    initialization symmetry can hide a routing mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model
