"""Training views of DINOv2's NYU depth pipeline, on (uint8 image, depth in metres) pairs.

In DINOv2's order: NYU's border crop (NYU layout only), rotation by up to 2.5 degrees
(p = 0.5), horizontal flip (p = 0.5), a random crop (416 x 544 on NYU), colour jitter
(p = 0.5: gamma 0.9-1.1, brightness 0.75-1.25, per-channel colour 0.9-1.1), ImageNet
normalisation. Depth moves with the image by nearest neighbour, so no depth is invented
between a near and a far surface, and pixels rotated or padded in get depth 0, which the
loss ignores.

One difference: the toolbox applies the gamma to pixel values 0-255, where 200 ** 1.1 =
339 saturates every pixel above 154; the gamma is applied to values scaled to 0-1 here,
the photometric jitter of BTS and AdaBins that the pipeline copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from eval.seg_transforms import normalize

NYU_BORDER = (slice(45, 472), slice(43, 608))
"""Rows and columns of a 480 x 640 NYU frame kept for training (DINOv2's `NYUCrop`): the
rest is the white border left by the RGB-depth registration."""
ROTATE_PROB = 0.5
MAX_DEGREES = 2.5
FLIP_PROB = 0.5
COLOUR_PROB = 0.5
GAMMA = (0.9, 1.1)
BRIGHTNESS = (0.75, 1.25)
COLOUR = (0.9, 1.1)


def _chance(p: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < p


def _uniform(low: float, high: float, generator: torch.Generator, size: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def rotate(
    image: torch.Tensor, depth: torch.Tensor, degrees: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counter-clockwise about the centre, same size: bilinear image, nearest depth, zeros
    rotated in."""
    image = TF.rotate(image, degrees, InterpolationMode.BILINEAR, fill=[0.0])
    depth = TF.rotate(depth[None], degrees, InterpolationMode.NEAREST, fill=[0.0])[0]
    return image, depth


def random_crop(
    image: torch.Tensor, depth: torch.Tensor, size: tuple[int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop of at most `size`; a side shorter than the crop is kept whole."""
    top = int(torch.randint(max(depth.shape[0] - size[0], 0) + 1, (), generator=generator))
    left = int(torch.randint(max(depth.shape[1] - size[1], 0) + 1, (), generator=generator))
    window = (slice(top, top + size[0]), slice(left, left + size[1]))
    return image[:, window[0], window[1]], depth[window]


def colour_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma, brightness and per-channel gain on a 0-255 image, clipped to 0-255."""
    gamma = _uniform(*GAMMA, generator)
    brightness = _uniform(*BRIGHTNESS, generator)
    colours = _uniform(*COLOUR, generator, size=3)[:, None, None]
    scaled = (image / 255) ** gamma * brightness * colours
    return scaled.clamp(0, 1) * 255


def pad_to(
    image: torch.Tensor, depth: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom and right to `size`: 0 is the mean colour of a normalised image and no
    measurement in a depth map, so padding stays out of the loss."""
    padding = (0, max(size[1] - depth.shape[1], 0), 0, max(size[0] - depth.shape[0], 0))
    return F.pad(image, padding), F.pad(depth, padding)


class DepthTrainTransform:
    """One random training view; a batch's views all have size `crop_size` (H, W)."""

    def __init__(
        self, crop_size: tuple[int, int], border_crop: bool, generator: torch.Generator
    ) -> None:
        self.crop_size = crop_size
        self.border_crop = border_crop
        self.generator = generator

    def __call__(
        self, image: torch.Tensor, depth: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.generator
        image = image.float()
        if self.border_crop:
            image, depth = image[:, NYU_BORDER[0], NYU_BORDER[1]], depth[NYU_BORDER]
        if _chance(ROTATE_PROB, g):
            image, depth = rotate(image, depth, float(_uniform(-MAX_DEGREES, MAX_DEGREES, g)))
        if _chance(FLIP_PROB, g):
            image, depth = image.flip(-1), depth.flip(-1)
        image, depth = random_crop(image, depth, self.crop_size, g)
        if _chance(COLOUR_PROB, g):
            image = colour_jitter(image, g)
        return pad_to(normalize(image), depth, self.crop_size)
