"""The fast training data path: decoding to tensors, the kernels swapped into the recipe,
and the DataLoader settings, each checked against what it replaces."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from train_helpers import tiny_config

from dinospec.config import load_config
from dinospec.data import IMAGENET_MEAN, IMAGENET_STD, ImageNetFolder, ImageTree
from dinospec.data.collate import stack_crops
from dinospec.data.datasets import load_rgb, load_rgb_tensor
from dinospec.data.samplers import InfiniteDistributedSampler
from dinospec.data.transforms import (
    MultiCropAugmentation,
    NormalizeUint8,
    adjust_hue_uint8,
    gaussian_blur_uint8,
    solarize_uint8,
)
from dinospec.train import data as train_data


@pytest.fixture(autouse=True)
def _one_thread():
    """As in a DataLoader worker; also keeps matrix products reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photo_like(seed: int, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    """Smooth gradients plus noise: JPEG-compressible, with real chroma to subsample."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def random_image(seed: int, shape: tuple[int, ...] = (3, 48, 64)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    image[:, :4] = image[:1, :4]
    return image


def write_corrupt_jpeg(path: Path) -> Path:
    """A JPEG header PIL accepts with its data cut short: only the decoder can tell."""
    Image.fromarray(photo_like(2, (64, 64))).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_corrupt_jpeg_is_counted_logged_and_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Image.fromarray(photo_like(3)).save(tmp_path / "a.jpg", format="JPEG")
    bad = write_corrupt_jpeg(tmp_path / "b.jpg")
    Image.fromarray(photo_like(4)).save(tmp_path / "c.jpg", format="JPEG")
    dataset = ImageTree(tmp_path, max_bad_fraction=0.5, loader=load_rgb_tensor)
    with caplog.at_level(logging.WARNING):
        image, _ = dataset[1]
    assert torch.equal(image, dataset[2][0])
    assert dataset.bad.bad_paths() == [bad]
    assert "b.jpg" in caplog.text


def test_decompression_bomb_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(photo_like(5, (64, 64))).save(tmp_path / "big.jpg", format="JPEG")
    Image.fromarray(photo_like(6, (8, 8))).save(tmp_path / "small.jpg", format="JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)
    dataset = ImageTree(tmp_path, max_bad_fraction=0.5, loader=load_rgb_tensor)
    assert dataset[0][0].shape == (3, 8, 8)
    assert dataset.bad.bad_paths() == [tmp_path / "big.jpg"]


def test_training_dataset_decodes_to_tensors(tmp_path: Path) -> None:
    train = tmp_path / "train" / "n01"
    train.mkdir(parents=True)
    Image.fromarray(photo_like(7)).save(train / "a.JPEG", format="JPEG")
    config = load_config(None, ["data.dataset=imagenet", f"data.path={tmp_path}"])
    images = train_data.build_image_dataset(config)
    assert isinstance(images, ImageNetFolder) and images.loader is load_rgb_tensor
    image, label = images[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 40) and label == 0


def test_crops_are_the_same_from_pil_images_and_tensors(tmp_path: Path) -> None:
    path = tmp_path / "image.jpg"
    Image.fromarray(photo_like(8, (80, 60))).save(path, format="JPEG")
    augmentation = MultiCropAugmentation(global_crops_size=32, local_crops_size=16)
    crops = []
    for loader in (load_rgb, load_rgb_tensor):
        torch.manual_seed(3)
        out = augmentation(loader(path))
        crops.append(torch.cat([c.flatten() for c in out["global_crops"] + out["local_crops"]]))
    assert torch.equal(crops[0], crops[1])


@pytest.mark.parametrize("hue", [-0.5, -0.1, -0.03, 0.0, 0.02, 0.1, 0.37, 0.5])
def test_hue_matches_torchvision_within_one_level(hue: float) -> None:
    image = random_image(0)
    ours, reference = adjust_hue_uint8(image, hue), F.adjust_hue(image, hue)
    difference = (ours.int() - reference.int()).abs()
    assert ours.dtype == torch.uint8 and difference.max() <= 1
    assert (difference > 0).float().mean() < 0.01


def test_hue_keeps_grays_and_rotates_primaries() -> None:
    gray = torch.full((3, 4, 4), 90, dtype=torch.uint8)
    assert torch.equal(adjust_hue_uint8(gray, 0.25), gray)
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    assert adjust_hue_uint8(red, 1 / 3).flatten().tolist() == [0, 255, 0]
    assert adjust_hue_uint8(red, -1 / 3).flatten().tolist() == [0, 0, 255]


# Blur tiles: 14 x 14 of 16 px; 2 x 4 of 18 x 16 px; 2 x 2 of 49 px; a single tile for
# prime sides and for sides with no divisor from 16 up.
@pytest.mark.parametrize(
    "shape", [(3, 224, 224), (3, 36, 64), (3, 98, 98), (3, 97, 101), (3, 9, 30)]
)
@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_torchvision_within_one_level(shape: tuple[int, ...], sigma: float) -> None:
    image = random_image(1, shape)
    ours = gaussian_blur_uint8(image, sigma)
    reference = F.gaussian_blur(image, [9, 9], [sigma, sigma])
    difference = (ours.int() - reference.int()).abs()
    assert ours.dtype == torch.uint8 and ours.shape == image.shape
    # Only the rounding of a near-tie may differ: here one pixel at most, as with one
    # product per side before the tiles.
    assert difference.max() <= 1 and (difference > 0).sum() <= 1


def test_blur_refuses_sides_too_short_to_reflect() -> None:
    with pytest.raises(ValueError, match="reflect"):
        gaussian_blur_uint8(random_image(2, (3, 4, 16)), 1.0)


def test_solarize_matches_torchvision() -> None:
    image = random_image(3)
    assert torch.equal(solarize_uint8(image, 128), F.solarize(image, 128))


def test_fused_normalize_matches_torchvision_and_refuses_floats() -> None:
    image = random_image(4)
    normalize = NormalizeUint8()
    scaled = F.to_dtype(image, torch.float32, scale=True)
    reference = F.normalize(scaled, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(normalize(image), reference, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        normalize(scaled)


def test_loader_ships_uint8_crops_that_to_device_standardizes_bit_exactly(
    tmp_path: Path,
) -> None:
    """The loader's crops are uint8; once on the device they equal, bit for bit, the float
    crops of the standardizing augmentation drawn from the same seeds."""
    config = tiny_config(tmp_path)
    images = train_data.build_image_dataset(config)
    batch = next(train_data.build_loader(config, images, rank=0, world_size=1, start_step=0))
    assert batch["collated_global_crops"].dtype == torch.uint8
    assert batch["collated_local_crops"].dtype == torch.uint8
    moved = train_data.to_device(batch, torch.device("cpu"))
    standardizing = train_data.build_augmentation(config, standardize=True)
    views = train_data.AugmentedImages(images, standardizing, config.train.seed)
    sampler = InfiniteDistributedSampler(len(images), 0, 1, config.train.seed)
    keys = itertools.islice(sampler.with_positions(), config.train.batch_size_per_gpu)
    expected = [(views[key][1], None) for key in keys]
    for name in ("global_crops", "local_crops"):
        assert torch.equal(moved[f"collated_{name}"], stack_crops(expected, name))


def test_dataloader_pins_memory_keeps_workers_and_prefetches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    def recording_loader(*args: Any, **kwargs: Any) -> list:
        seen.update(kwargs)
        return []

    monkeypatch.setattr(train_data, "DataLoader", recording_loader)
    config = load_config(None, ["data.num_workers=3"])
    train_data.build_loader(config, list(range(10)), rank=0, world_size=1, start_step=0)
    assert seen["num_workers"] == 3 and seen["persistent_workers"] is True
    assert seen["prefetch_factor"] == 2
    assert seen["pin_memory"] == torch.cuda.is_available()
