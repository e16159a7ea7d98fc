"""DINOv2 multi-crop augmentation (SPEC section 3).

Every input is first turned into a uint8 CHW tensor, so PIL images and tensors take the
same kernels and give the same crops for the same seed, and thresholds such as the
solarization level 128 keep their uint8 meaning until the final float conversion.

Randomness: torchvision's v2 transforms draw from torch's global RNG and accept no
generator. A result is therefore reproducible by seeding that RNG: call
`torch.manual_seed(s)` before the augmentation in a single process; in a DataLoader each
worker's torch RNG is already seeded with `base_seed + worker_id`, and `base_seed` follows
the `generator` given to the DataLoader (or the main process's seed), so seeding the main
process makes a whole run's crops reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128


def gaussian_blur(p: float) -> v2.Transform:
    """DINOv2 blurs with a fixed 9-pixel kernel whatever the crop size; only sigma varies."""
    return v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL_SIZE, sigma=BLUR_SIGMA)], p=p)


def color_distortion() -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


def normalize() -> v2.Transform:
    """uint8 in [0, 255] to float32 standardized with the ImageNet statistics."""
    return v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def random_crop_and_flip(size: int, scale: Sequence[float]) -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    )


def to_uint8_image(image: Image.Image | Tensor) -> tv_tensors.Image:
    """Accept what datasets produce; refuse float tensors because their value range (0-1 or
    0-255) cannot be told apart and the solarization threshold would silently be wrong."""
    if isinstance(image, Image.Image):
        return v2.functional.to_image(image.convert("RGB"))
    if not isinstance(image, Tensor):
        raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image tensor, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB tensor of shape (3, H, W), got {tuple(image.shape)}")
    return tv_tensors.Image(image)


class MultiCropAugmentation:
    """Two global crops and N local crops of one image, as DINOv2's DataAugmentationDINO.

    The two global crops differ on purpose: the first is always blurred, the second is rarely
    blurred but sometimes solarized, so the student must match views of unequal quality.
    The teacher sees the same global crops as the student; the key is kept separate because
    the training step reads them under that name.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
    ) -> None:
        self.local_crops_number = local_crops_number
        self.global_geometry = random_crop_and_flip(global_crops_size, global_crops_scale)
        self.local_geometry = random_crop_and_flip(local_crops_size, local_crops_scale)
        self.global_transform_1 = v2.Compose([color_distortion(), gaussian_blur(1.0), normalize()])
        self.global_transform_2 = v2.Compose(
            [
                color_distortion(),
                gaussian_blur(0.1),
                v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=0.2),
                normalize(),
            ]
        )
        self.local_transform = v2.Compose([color_distortion(), gaussian_blur(0.5), normalize()])

    def __call__(self, image: Image.Image | Tensor) -> dict[str, list[Tensor] | tuple]:
        image = to_uint8_image(image)
        global_crops = [
            self._plain(self.global_transform_1(self.global_geometry(image))),
            self._plain(self.global_transform_2(self.global_geometry(image))),
        ]
        local_crops = [
            self._plain(self.local_transform(self.local_geometry(image)))
            for _ in range(self.local_crops_number)
        ]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }

    @staticmethod
    def _plain(crop: Tensor) -> Tensor:
        """Drop the tv_tensors subclass so downstream torch code sees ordinary tensors."""
        return crop.as_subclass(Tensor)
