"""DINOv2's feature picture: the first three principal components of patch features as RGB.

Good dense features show object parts in consistent colours across images, so the
components are fitted on the patches of all images together by default (per image on
request). As in DINOv2, an optional first pass keeps the foreground: the first component
of all patches separates object from background, and the colours are then fitted on the
foreground patches only, with the background drawn black.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dinospec.models.vit import DinoVisionTransformer

QUANTILE = 0.01


@dataclass(frozen=True)
class PCAMaps:
    """rgb: (B, h, w, 3) in [0, 1], one pixel per patch; foreground: (B, h, w) bool."""

    rgb: Tensor
    foreground: Tensor


@torch.inference_mode()
def patch_features(model: DinoVisionTransformer, images: Tensor) -> Tensor:
    """Last-layer patch tokens after the final norm, as a (B, h, w, D) grid."""
    model.eval()
    tokens = model.forward_features(images)["x_norm_patchtokens"]
    b, _, height, width = images.shape
    p = model.patch_size
    return tokens.reshape(b, height // p, width // p, -1).float()


def principal_components(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Mean (D,) and the top-k components (k, D) of the rows of x. The sign of a component
    is arbitrary; it is fixed (largest loading positive) so a run gives the same colours
    every time."""
    x = x.double()
    mean = x.mean(dim=0)
    centred = x - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    components = vectors[:, -k:].flip(1).T
    biggest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    return mean, components * biggest.sign()


def unit_scale(values: Tensor) -> Tensor:
    """Each column mapped to [0, 1] between its 1% and 99% quantiles: a few outlier tokens
    (high-norm artifacts of models without registers) would otherwise wash out the rest."""
    low = torch.quantile(values, QUANTILE, dim=0)
    high = torch.quantile(values, 1 - QUANTILE, dim=0)
    return ((values - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)


def foreground_mask(features: Tensor, threshold: float) -> Tensor:
    """(B, h, w) patches whose scaled first component exceeds `threshold`. The component's
    sign is oriented so the image border, mostly background, scores low."""
    flat = features.reshape(-1, features.shape[-1])
    mean, component = principal_components(flat, 1)
    score = unit_scale(((flat.double() - mean) @ component.T)[:, 0:1])[:, 0]
    score = score.reshape(features.shape[:-1])
    border = torch.ones_like(score, dtype=torch.bool)
    border[:, 1:-1, 1:-1] = False
    if score[border].mean() > score[~border].mean():
        score = 1 - score
    return score > threshold


def _pca_rgb_joint(features: Tensor, threshold: float | None) -> PCAMaps:
    grid = features.shape[:-1]
    flat = features.reshape(-1, features.shape[-1])
    keep = (
        torch.ones(flat.shape[0], dtype=torch.bool)
        if threshold is None
        else foreground_mask(features, threshold).reshape(-1)
    )
    fit = flat[keep] if keep.sum() >= 2 else flat
    mean, components = principal_components(fit, 3)
    projected = (flat.double() - mean) @ components.T
    rgb = torch.zeros_like(projected)
    if keep.any():
        rgb[keep] = unit_scale(projected[keep])
    return PCAMaps(rgb.float().reshape(*grid, 3), keep.reshape(grid))


def pca_rgb(features: Tensor, threshold: float | None = None, per_image: bool = False) -> PCAMaps:
    """RGB maps of (B, h, w, D) patch features; `threshold` in [0, 1] turns on foreground
    selection; `per_image` fits each image on its own instead of all together."""
    if features.shape[-1] < 3:
        raise ValueError(f"need at least 3 feature channels, got {features.shape[-1]}")
    if not per_image:
        return _pca_rgb_joint(features, threshold)
    maps = [_pca_rgb_joint(f.unsqueeze(0), threshold) for f in features]
    return PCAMaps(torch.cat([m.rgb for m in maps]), torch.cat([m.foreground for m in maps]))
