"""Paired image/label transforms of the linear segmentation protocol (SPEC section 5).

Geometry is applied to image and label together; the label is always resized with
nearest neighbour because interpolating class ids would invent classes at boundaries.
Padding carries the ignore label so that it never counts in the loss or the metrics.
Images arrive as uint8 (3, H, W) and leave as float, ImageNet-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinospec.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from eval.metrics import IGNORE_INDEX

LONG_SIDE_FACTOR = 4
CROP_ATTEMPTS = 10


def rescaled_size(height: int, width: int, short_side: float, long_side: float) -> tuple[int, int]:
    """Keep-ratio size whose short side is `short_side` unless the long side would pass
    `long_side` (mmseg's rule for img_scale=(2048, 512)): panoramas stay bounded."""
    scale = min(short_side / min(height, width), long_side / max(height, width))
    return round(height * scale), round(width * scale)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing, so down-scaling by up to 2x does not alias."""
    resized = F.interpolate(
        image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0]


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def normalize(
    image: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Pixel values in 0..255 to the statistics the backbone was trained with."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None] * 255
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None] * 255
    return (image.float() - mean_t) / std_t


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _crop_is_varied(label: torch.Tensor, cat_max_ratio: float, ignore_index: int) -> bool:
    """True when no single class covers `cat_max_ratio` of the crop: crops of pure sky or
    wall teach the head little, so mmseg's ADE20K recipe redraws them."""
    counts = torch.bincount(label[label != ignore_index].flatten())
    counts = counts[counts > 0]
    return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def _random_box(
    height: int, width: int, crop: int, generator: torch.Generator | None
) -> tuple[int, int]:
    top = int(torch.randint(max(height - crop, 0) + 1, (), generator=generator))
    left = int(torch.randint(max(width - crop, 0) + 1, (), generator=generator))
    return top, left


def random_crop(
    image: torch.Tensor,
    label: torch.Tensor,
    crop: int,
    cat_max_ratio: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop of at most `crop` x `crop` (smaller sides are kept whole, padded later).

    With `cat_max_ratio` < 1, up to ten boxes are drawn and the first varied one is kept.
    """
    height, width = label.shape
    for _ in range(CROP_ATTEMPTS):
        top, left = _random_box(height, width, crop, generator)
        label_crop = label[top : top + crop, left : left + crop]
        if cat_max_ratio >= 1.0 or _crop_is_varied(label_crop, cat_max_ratio, ignore_index):
            break
    return image[:, top : top + crop, left : left + crop], label_crop


def pad_to(
    image: torch.Tensor, label: torch.Tensor, size: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom and right to `size` x `size`: 0 in the (normalised) image is the mean
    colour, and the ignore label keeps the padding out of the loss."""
    pad_h = max(size - label.shape[0], 0)
    pad_w = max(size - label.shape[1], 0)
    padding = (0, pad_w, 0, pad_h)
    return F.pad(image, padding, value=0.0), F.pad(label, padding, value=ignore_index)


class SegTrainTransform:
    """Random rescale (ratio of `base_size`), random crop, flip, normalise, pad to crop.

    Leave `generator` as None inside DataLoader workers: torch seeds each worker's global
    generator differently, whereas a Generator object is copied into every worker with
    the same state and would give all workers the same augmentations.
    """

    def __init__(
        self,
        base_size: int = 512,
        crop_size: int = 512,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        generator: torch.Generator | None = None,
    ) -> None:
        self.base_size = base_size
        self.crop_size = crop_size
        self.ratio_range = ratio_range
        self.flip_prob = flip_prob
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.generator = generator

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = _uniform(*self.ratio_range, self.generator)
        size = rescaled_size(
            *label.shape, ratio * self.base_size, ratio * self.base_size * LONG_SIDE_FACTOR
        )
        image, label = resize_image(image, size), resize_label(label, size)
        image, label = random_crop(
            image, label, self.crop_size, self.cat_max_ratio, self.ignore_index, self.generator
        )
        if float(torch.rand((), generator=self.generator)) < self.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        return pad_to(normalize(image), label, self.crop_size, self.ignore_index)


class SegTestTransform:
    """Rescale to `base_size` short side and normalise; the label keeps its original size
    because scores are computed against the annotation as published, with the
    predicted logits resized to it."""

    def __init__(self, base_size: int = 512) -> None:
        self.base_size = base_size

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = rescaled_size(*label.shape, self.base_size, self.base_size * LONG_SIDE_FACTOR)
        return normalize(resize_image(image, size)), label
