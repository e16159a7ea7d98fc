"""Data for self-supervised training: datasets, multi-crop views, iBOT masks, batches."""

from dinospec.data.datasets import (
    NO_LABEL,
    ImageList,
    ImageNetFolder,
    ImageTree,
    TooManyBadImagesError,
)
from dinospec.data.masking import MaskingGenerator
from dinospec.data.samplers import InfiniteDistributedSampler
from dinospec.data.synthetic import SegmentationView, SyntheticScenes
from dinospec.data.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NO_LABEL",
    "ImageList",
    "ImageNetFolder",
    "ImageTree",
    "InfiniteDistributedSampler",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "SegmentationView",
    "SyntheticScenes",
    "TooManyBadImagesError",
]
