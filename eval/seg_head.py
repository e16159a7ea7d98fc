"""Linear segmentation probe on a frozen backbone, and its test-time inference.

The probe measures what the patch tokens already contain: one BatchNorm and one 1x1
convolution per token, nothing that mixes neighbouring tokens. The backbone is any
module with DINOv2's `get_intermediate_layers`, `patch_size` and `embed_dim`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

Segmenter = Callable[[torch.Tensor], torch.Tensor]


def center_pad(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad H and W up to a multiple of the patch size, split evenly on both sides so
    border pixels keep patches of their own; returns the padded batch and (top, left)."""
    height, width = images.shape[-2:]
    pad_h = -height % multiple
    pad_w = -width % multiple
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(images, (left, pad_w - left, top, pad_h - top))
    return padded, (top, left)


class FrozenBackbone(nn.Module):
    """A backbone that stays in eval mode and outside autograd whatever the caller does
    with `train()`, so a probe's training loop cannot update it or its norm statistics.
    Subclasses say which tokens of which blocks the probe reads."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.patch_size = int(backbone.patch_size)

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.backbone.eval()
        return self


class FrozenPatchFeatures(FrozenBackbone):
    """Normalised patch tokens of the last `n_layers` blocks, concatenated on channels."""

    def __init__(self, backbone: nn.Module, n_layers: int = 1) -> None:
        super().__init__(backbone)
        self.n_layers = n_layers
        self.out_dim = int(backbone.embed_dim) * n_layers

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        layers = self.backbone.get_intermediate_layers(
            images, self.n_layers, reshape=True, return_class_token=True, norm=True
        )
        return torch.cat([patch_tokens for patch_tokens, _ in layers], dim=1)


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv: BN puts every backbone's features on one scale, so a single
    learning rate suits backbones whose token norms differ by orders of magnitude."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(features))


class LinearSegmenter(nn.Module):
    """Frozen features + linear head, logits at the input resolution.

    Logits are upsampled to the padded size and the padding is cut off again, so every
    output pixel is read at the place its patch covered rather than stretched over the
    padding; only `head` has trainable parameters.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, n_layers: int = 1) -> None:
        super().__init__()
        self.features = FrozenPatchFeatures(backbone, n_layers)
        self.head = LinearHead(self.features.out_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        padded, (top, left) = center_pad(images, self.features.patch_size)
        logits = self.head(self.features(padded))
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., top : top + height, left : left + width]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Offsets of windows along one axis; the last is moved back to end at the border so
    that every window has the full crop size and every pixel is covered."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


@torch.no_grad()
def slide_inference(
    model: Segmenter, images: torch.Tensor, crop_size: int, stride: int
) -> torch.Tensor:
    """Logits of overlapping crop_size windows, averaged where windows overlap.

    A ViT sees at test time the crop size it was trained on; an image smaller than the
    crop along an axis is taken whole along it.
    """
    height, width = images.shape[-2:]
    total: torch.Tensor | None = None
    count = images.new_zeros(height, width)
    for top in window_starts(height, crop_size, stride):
        for left in window_starts(width, crop_size, stride):
            window = (slice(top, top + crop_size), slice(left, left + crop_size))
            logits = model(images[..., window[0], window[1]])
            if total is None:
                total = images.new_zeros(images.shape[0], logits.shape[1], height, width)
            total[..., window[0], window[1]] += logits
            count[window] += 1
    return total / count


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_probabilities(
    model: Segmenter,
    images: torch.Tensor,
    out_size: Sequence[int],
    crop_size: int = 512,
    stride: int = 341,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities (B, K, *out_size), averaged over scales and flips.

    Each view's logits are resized to the label's size before the softmax and the
    probabilities (not logits) are averaged, as in mmseg's aug_test, so every view votes
    with the same weight however confident it is.
    """
    height, width = images.shape[-2:]
    flips = (False, True) if flip else (False,)
    total = None
    for scale in scales:
        scaled = _resize(images, (round(height * scale), round(width * scale)))
        for flipped in flips:
            view = scaled.flip(-1) if flipped else scaled
            logits = slide_inference(model, view, crop_size, stride)
            logits = logits.flip(-1) if flipped else logits
            probs = _resize(logits, out_size).softmax(dim=1)
            total = probs if total is None else total + probs
    return total / (len(scales) * len(flips))
