"""DINOv2 multi-crop augmentation (SPEC section 3).

Every input is first turned into a uint8 CHW tensor, so PIL images and tensors take the
same kernels and give the same crops for the same seed, and thresholds such as the
solarization level 128 keep their uint8 meaning until the final float conversion.

The recipe is built from torchvision v2 transforms, which draw the random parameters; four
of them swap in their own kernel, because torchvision's uint8 kernels for hue (an HSV
round trip), Gaussian blur (a 9x9 depthwise convolution), solarization and normalization
took most of the time of a crop. The replacements compute the same functions (hue and blur
may differ by one uint8 level through float rounding) and draw no extra random numbers.

Randomness: torchvision's v2 transforms draw from torch's global RNG and accept no
generator. A result is therefore reproducible by seeding that RNG: call
`torch.manual_seed(s)` before the augmentation in a single process; in a DataLoader each
worker's torch RNG is already seeded with `base_seed + worker_id`, and `base_seed` follows
the `generator` given to the DataLoader (or the main process's seed), so seeding the main
process makes a whole run's crops reproducible.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as nn_functional
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
# Blur probabilities of global crop 1, global crop 2 and the local crops as DINOv2's code
# executes them: its GaussianBlur hands 1 - p to RandomApply, so its stated 1.0 / 0.1 / 0.5
# (BLUR_PROBABILITIES_STATED) run as 0.0 / 0.9 / 0.5, which the released checkpoints had.
BLUR_PROBABILITIES = (0.0, 0.9, 0.5)
BLUR_PROBABILITIES_STATED = (1.0, 0.1, 0.5)
# Blur tiles of at least this many rows (and columns): the fastest of 8-28 on a CPU at 96,
# 98 and 224 px.
BLUR_TILE_MIN = 16
SOLARIZE_THRESHOLD = 128
UINT8_MAX = 255.0
# torchvision's float -> uint8 conversion scales by 256 - eps and truncates; kept so the
# fast hue kernel rounds as torchvision's does.
TO_UINT8_SCALE = (UINT8_MAX + 1.0 - 1e-3) / UINT8_MAX
HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)


def gaussian_kernel1d(sigma: float, size: int = BLUR_KERNEL_SIZE) -> Tensor:
    """torchvision's Gaussian weights (normalized to sum 1), one axis of its 2-D kernel."""
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    return torch.softmax(-(offsets**2) / (2.0 * sigma**2), dim=0)


def _tile_side(size: int) -> int:
    """The smallest divisor of `size` of at least BLUR_TILE_MIN pixels (the whole side when
    there is none, e.g. a prime side)."""
    return next((d for d in range(BLUR_TILE_MIN, size) if size % d == 0), size)


def correlation_matrix(weights: Tensor, outputs: int) -> Tensor:
    """M (outputs x outputs + len(weights) - 1) with M @ x equal to correlating x with
    weights over x's first axis, 'valid' mode: row j holds the weights from column j on."""
    width = outputs + len(weights) - 1
    matrix = torch.zeros(outputs, width)
    matrix.as_strided((outputs, len(weights)), (width + 1, 1)).copy_(weights)
    return matrix


def gaussian_blur_uint8(image: Tensor, sigma: float, kernel_size: int = BLUR_KERNEL_SIZE) -> Tensor:
    """torchvision's gaussian_blur with a square kernel (reflect padding, the 2-D kernel the
    outer product of two 1-D ones), rounded back to uint8 likewise.

    Computed separably, as matrix products over tiles: each tile of a few rows (then
    columns) is one small product with a banded matrix applied to the tile and its margin.
    On a CPU that is several times faster than the 9 x 9 depthwise convolution, and at 224 px
    2.9 times faster (0.47 against 1.35 ms, one thread) than one product with a banded matrix
    as large as the side, whose work grows with the cube of the side, the tiles' with its
    square."""
    radius = kernel_size // 2
    height, width = image.shape[-2:]
    if min(height, width) <= radius:
        raise ValueError(
            f"cannot reflect-pad {radius} pixels of an image of {height} x {width} pixels"
        )
    weights = gaussian_kernel1d(sigma, kernel_size)
    tile_rows, tile_cols = _tile_side(height), _tile_side(width)
    rows = correlation_matrix(weights, tile_rows)
    cols = rows if tile_cols == tile_rows else correlation_matrix(weights, tile_cols)
    padded = nn_functional.pad(image.to(torch.float32), (radius,) * 4, mode="reflect")
    # (..., row tiles, padded width, tile rows), then (..., row tiles, column tiles, rows, cols)
    by_rows = padded.unfold(-2, tile_rows + 2 * radius, tile_rows) @ rows.T
    blurred = by_rows.unfold(-2, tile_cols + 2 * radius, tile_cols) @ cols.T
    return blurred.transpose(-3, -2).reshape(image.shape).round_().to(torch.uint8)


def _hue_times_six(
    red: Tensor, green: Tensor, blue: Tensor, high: Tensor, chroma: Tensor
) -> Tensor:
    """HSV hue in [-1, 5) sixths of a turn, as torchvision computes it (red wins ties, then
    green). Comparisons, bool masks and torch.where are slow on CPU, so the masks come from
    arithmetic: levels are whole numbers, so high - channel is 0 where the channel is the
    max and at least 1 elsewhere, and clamping it to 1 gives a 0/1 mask. Likewise chroma is
    0 or at least 1, and where it is 0 the hue does not matter, so clamping it to 1 only
    avoids dividing by zero."""
    red_not_max = (high - red).clamp_(max=1.0)
    is_blue = (high - green).clamp_(max=1.0).mul_(red_not_max)
    is_green = red_not_max - is_blue
    is_red = 1.0 - red_not_max
    hue6 = (red - green).mul_(is_blue)
    hue6.addcmul_(is_red, green - blue).addcmul_(is_green, blue - red)
    hue6.div_(chroma.clamp(min=1.0))
    return hue6.add_(is_green, alpha=2.0).add_(is_blue, alpha=4.0)


def adjust_hue_uint8(image: Tensor, hue_factor: float) -> Tensor:
    """torchvision's adjust_hue (rotate the HSV hue, keep saturation and value) without its
    HSV round trip. Max, min and chroma = max - min do not change, and each channel is
    min + chroma * clamp(|u| - 1, 0, 1) with u = n + 6 hue - 2 wrapped into [-2, 4) and
    n = 5, 3, 1 for R, G, B (the hexcone formula). Per-operation overhead dominates on
    small crops, so the operations are few, and mostly in place."""
    pixels = image.to(torch.float32)
    red, green, blue = pixels.unbind(0)
    high = torch.maximum(red, green)
    torch.maximum(high, blue, out=high)
    low = torch.minimum(red, green)
    torch.minimum(low, blue, out=low)
    chroma = high - low
    shift = torch.tensor(HUE_CHANNEL_OFFSETS).add_(6.0 * hue_factor - 2.0).view(3, 1, 1)
    position = _hue_times_six(red, green, blue, high, chroma) + shift
    position.sub_(torch.div(position, 6.0).add_(1.0 / 3.0).floor_(), alpha=6.0)
    rotated = position.abs_().sub_(1.0).clamp_(0.0, 1.0).mul_(chroma).add_(low)
    return rotated.mul_(TO_UINT8_SCALE).to(torch.uint8)


def solarize_uint8(image: Tensor, threshold: int) -> Tensor:
    """Invert levels >= threshold with an XOR mask; torch.where costs 40 times more here."""
    return image ^ image.ge(threshold).to(torch.uint8).mul_(255)


class FastColorJitter(v2.ColorJitter):
    """v2.ColorJitter (same parameters, same random order of the four adjustments) with the
    hue step replaced by adjust_hue_uint8."""

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        steps = (
            (F.adjust_brightness, params["brightness_factor"]),
            (F.adjust_contrast, params["contrast_factor"]),
            (F.adjust_saturation, params["saturation_factor"]),
            (adjust_hue_uint8, params["hue_factor"]),
        )
        for index in params["fn_idx"].tolist():
            adjust, factor = steps[index]
            if factor is not None:
                inpt = adjust(inpt, factor)
        return inpt


class FastGaussianBlur(v2.GaussianBlur):
    """v2.GaussianBlur (same sigma draw) with a square kernel, computed by
    gaussian_blur_uint8."""

    def __init__(self, kernel_size: int, sigma: Sequence[float]) -> None:
        super().__init__(kernel_size, sigma=sigma)

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return gaussian_blur_uint8(inpt, params["sigma"][0], self.kernel_size[0])


class FastSolarize(v2.RandomSolarize):
    """v2.RandomSolarize computed by solarize_uint8."""

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return solarize_uint8(inpt, int(self.threshold))


def standardize_uint8(images: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) in [0, 255] to float32 standardized with the ImageNet statistics,
    (x / 255 - mean) / std folded into x * scale - offset. On whatever device the images
    are: the training loader ships uint8 crops, a quarter of the bytes to pin and copy, and
    standardizes them on the accelerator. Float input is refused, as its range (0-1 or
    0-255) cannot be told."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got dtype {images.dtype}")
    scale, offset = _standardization(images.device)
    return images.to(torch.float32).mul_(scale).sub_(offset)


@functools.cache
def _standardization(device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-channel scale and offset, made once per device so that a step copies no
    constants to its accelerator."""
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    scale = 1.0 / (UINT8_MAX * std)
    offset = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std
    return scale.to(device), offset.to(device)


class NormalizeUint8(v2.Normalize):
    """v2.Normalize with the ImageNet statistics, computed by standardize_uint8."""

    def __init__(self) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return standardize_uint8(inpt)


def gaussian_blur(p: float, sigma: Sequence[float] = BLUR_SIGMA) -> v2.Transform:
    """DINOv2 blurs with a fixed 9-pixel kernel whatever the crop size; only sigma varies."""
    return v2.RandomApply([FastGaussianBlur(BLUR_KERNEL_SIZE, sigma=sigma)], p=p)


def color_distortion() -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomApply([FastColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


def normalize() -> v2.Transform:
    """uint8 in [0, 255] to float32 standardized with the ImageNet statistics."""
    return NormalizeUint8()


def random_crop_and_flip(size: int, scale: Sequence[float]) -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    )


def to_uint8_image(image: Image.Image | Tensor) -> Tensor:
    """Accept what datasets produce; refuse float tensors because their value range (0-1 or
    0-255) cannot be told apart and the solarization threshold would silently be wrong.
    A plain tensor, not a tv_tensors.Image: v2 treats a lone tensor as an image anyway, and
    the subclass would only add wrapping and unwrapping around every kernel."""
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB tensor of shape (3, H, W), got {tuple(image.shape)}")
    return image.as_subclass(Tensor)


class MultiCropAugmentation:
    """Two global crops and N local crops of one image, as DINOv2's DataAugmentationDINO.

    The two global crops differ on purpose, so the student must match views of unequal
    quality: only the second may be solarized, and they are blurred with different
    probabilities (`blur_probabilities`: global crop 1, global crop 2, local crops). The
    default is what DINOv2's code executes (BLUR_PROBABILITIES: the first global crop is
    never blurred, the second 90% of the time); BLUR_PROBABILITIES_STATED gives what its
    paper states. The teacher sees the same global crops as the student; the key is kept
    separate because the training step reads them under that name. With
    `standardize=False` the crops stay uint8 for a loader that standardizes them on the
    accelerator (standardize_uint8), which is bit for bit the same computation.

    `gram_crops_size` (larger than the global size) adds `gram_teacher_crops`, DINOv3's
    high-resolution views for the Gram teacher: each global crop is cut and distorted at
    that size, which is then the Gram teacher's crop, and the student's and teacher's crop
    is the same image resized down to `global_crops_size` (bicubic, antialiased, on uint8
    levels). The Gram teacher thus sees the student's view rendered from the image with
    more detail, not an upsampled copy of it. Resizing draws no random numbers, so the crop
    boxes and distortions are those the same seed gives without Gram crops.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_sigma: Sequence[float] = BLUR_SIGMA,
        standardize: bool = True,
        blur_probabilities: Sequence[float] = BLUR_PROBABILITIES,
        gram_crops_size: int | None = None,
    ) -> None:
        if gram_crops_size is not None and gram_crops_size <= global_crops_size:
            raise ValueError(
                f"Gram crops of {gram_crops_size} px must be larger than the global crops "
                f"({global_crops_size} px); without high-resolution Gram crops pass None"
            )
        blur_global1, blur_global2, blur_local = blur_probabilities
        self.local_crops_number = local_crops_number
        self.global_geometry = random_crop_and_flip(
            gram_crops_size or global_crops_size, global_crops_scale
        )
        self.local_geometry = random_crop_and_flip(local_crops_size, local_crops_scale)
        last = [normalize()] if standardize else []
        # With Gram crops the global views are standardized after resizing, so that the
        # uint8 loader and standardize=True still compute the same crops.
        global_last = last if gram_crops_size is None else []
        self.finish = v2.Compose(last) if last else v2.Identity()
        self.downsize = (
            None
            if gram_crops_size is None
            else v2.Resize(
                global_crops_size, interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        )
        self.global_transform_1 = v2.Compose(
            [color_distortion(), gaussian_blur(blur_global1, blur_sigma), *global_last]
        )
        self.global_transform_2 = v2.Compose(
            [
                color_distortion(),
                gaussian_blur(blur_global2, blur_sigma),
                FastSolarize(threshold=SOLARIZE_THRESHOLD, p=0.2),
                *global_last,
            ]
        )
        self.local_transform = v2.Compose(
            [color_distortion(), gaussian_blur(blur_local, blur_sigma), *last]
        )

    def __call__(self, image: Image.Image | Tensor) -> dict[str, list[Tensor] | tuple]:
        image = to_uint8_image(image)
        global_crops = [
            self.global_transform_1(self.global_geometry(image)),
            self.global_transform_2(self.global_geometry(image)),
        ]
        local_crops = [
            self.local_transform(self.local_geometry(image)) for _ in range(self.local_crops_number)
        ]
        out = {"local_crops": local_crops, "offsets": ()}
        if self.downsize is not None:
            out["gram_teacher_crops"] = [self.finish(crop) for crop in global_crops]
            global_crops = [self.finish(self.downsize(crop)) for crop in global_crops]
        return {"global_crops": global_crops, "global_crops_teacher": global_crops, **out}
