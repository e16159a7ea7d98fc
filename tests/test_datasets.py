"""Datasets on disk: layouts, labels, skipping and counting unreadable files, bad paths."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dinospec.data import NO_LABEL, ImageList, ImageNetFolder, ImageTree, TooManyBadImagesError


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a JPEG file")
    return path


def write_truncated(path: Path, seed: int) -> Path:
    full = write_jpeg(path, seed, size=(64, 64)).read_bytes()
    path.write_bytes(full[: len(full) // 2])
    return path


@pytest.fixture
def imagenet(tmp_path: Path) -> Path:
    """Two classes; n02 holds a corrupt JPEG, a text file and a hidden file."""
    root = tmp_path / "train"
    for k in range(3):
        write_jpeg(root / "n01" / f"a{k}.JPEG", seed=k)
    write_jpeg(root / "n02" / "b0.JPEG", seed=10)
    write_corrupt(root / "n02" / "b1.JPEG")
    write_jpeg(root / "n02" / "b2.JPEG", seed=12)
    (root / "n02" / "notes.txt").write_text("not an image")
    write_corrupt(root / "n02" / "._b0.JPEG")
    return root


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_imagenet_layout_labels_and_files(imagenet: Path) -> None:
    dataset = ImageNetFolder(imagenet)
    assert dataset.classes == ["n01", "n02"]
    assert len(dataset) == 6
    assert [label for _, label in dataset.samples] == [0, 0, 0, 1, 1, 1]
    assert all(p.suffix == ".JPEG" and not p.name.startswith(".") for p, _ in dataset.samples)
    image, label = dataset[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (20, 16)
    assert label == 1


def test_transform_is_applied(imagenet: Path) -> None:
    dataset = ImageNetFolder(imagenet, transform=lambda im: torch.tensor(im.size))
    assert dataset[0][0].tolist() == [20, 16]


def test_grayscale_and_png_are_decoded_as_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 77, dtype=np.uint8)).save(tmp_path / "gray.png")
    image, label = ImageTree(tmp_path)[0]
    assert image.mode == "RGB" and pixels(image)[0, 0].tolist() == [77, 77, 77]
    assert label == NO_LABEL


def test_corrupt_file_is_skipped_logged_and_counted(
    imagenet: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = ImageNetFolder(imagenet, max_bad_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        image, label = dataset[4]
    assert np.array_equal(pixels(image), pixels(dataset[5][0])) and label == 1
    assert "b1.JPEG" in caplog.text
    assert dataset.bad.count == 1
    dataset[4]
    assert dataset.bad.count == 1, "a file read twice is still one bad file"
    assert dataset.bad.bad_paths() == [imagenet / "n02" / "b1.JPEG"]


def test_skip_wraps_around_to_the_first_file(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "a.jpg", seed=0)
    write_jpeg(tmp_path / "b.jpg", seed=1)
    write_corrupt(tmp_path / "c.jpg")
    dataset = ImageTree(tmp_path, max_bad_fraction=0.5)
    assert np.array_equal(pixels(dataset[2][0]), pixels(dataset[0][0]))


def test_truncated_jpeg_counts_as_unreadable(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "good.jpg", seed=0)
    write_truncated(tmp_path / "half.jpg", seed=1)
    dataset = ImageTree(tmp_path, max_bad_fraction=0.5)
    dataset[1]
    assert dataset.bad.bad_paths() == [tmp_path / "half.jpg"]


def test_too_many_bad_files_raise_a_clear_error(tmp_path: Path) -> None:
    for k in range(8):
        write_jpeg(tmp_path / f"good{k}.jpg", seed=k)
    write_corrupt(tmp_path / "bad0.jpg")
    write_corrupt(tmp_path / "zbad1.jpg")
    dataset = ImageTree(tmp_path, max_bad_fraction=0.1)
    dataset[0]
    assert dataset.bad.count == 1, "one bad file is within the limit"
    with pytest.raises(TooManyBadImagesError) as info:
        dataset[9]
    message = str(info.value)
    for part in ("2 of 10", "limit of 1", "max_bad_fraction=0.1", "bad0.jpg", "zbad1.jpg"):
        assert part in message


def test_zero_tolerance_fails_on_the_first_bad_file(imagenet: Path) -> None:
    with pytest.raises(TooManyBadImagesError, match="1 of 6"):
        ImageNetFolder(imagenet, max_bad_fraction=0.0)[4]


def test_dataloader_workers_share_the_bad_file_count(tmp_path: Path) -> None:
    for k in range(6):
        write_jpeg(tmp_path / f"good{k}.jpg", seed=k)
    write_corrupt(tmp_path / "bad0.jpg")
    write_corrupt(tmp_path / "bad1.jpg")
    dataset = ImageTree(
        tmp_path, transform=lambda im: torch.from_numpy(pixels(im).copy()), max_bad_fraction=0.5
    )
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    assert len(list(loader)) == 8
    assert dataset.bad.count == 2


def test_image_tree_is_recursive_and_unlabelled(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "x" / "y" / "deep.jpeg", seed=0)
    write_jpeg(tmp_path / "top.png", seed=1)
    write_jpeg(tmp_path / ".cache" / "hidden.jpg", seed=2)
    (tmp_path / "x" / "readme.md").write_text("text")
    dataset = ImageTree(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p, _ in dataset.samples] == [
        "top.png",
        "x/y/deep.jpeg",
    ]
    assert {label for _, label in dataset.samples} == {NO_LABEL}


def test_image_list_resolves_relative_and_absolute_paths(tmp_path: Path) -> None:
    relative = write_jpeg(tmp_path / "data" / "a.jpg", seed=0)
    absolute = write_jpeg(tmp_path / "elsewhere" / "b.jpg", seed=1)
    list_file = tmp_path / "data" / "list.txt"
    list_file.write_text(f"# training images\na.jpg\n\n{absolute}\n  notes.txt \n")
    dataset = ImageList(list_file)
    assert [p for p, _ in dataset.samples] == [relative, absolute]
    assert np.array_equal(pixels(dataset[1][0]), pixels(Image.open(absolute).convert("RGB")))
    assert dataset[0][1] == NO_LABEL


def test_image_list_entry_that_is_missing_counts_as_bad(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "a.jpg", seed=0)
    list_file = tmp_path / "list.txt"
    list_file.write_text("gone.jpg\na.jpg\n")
    dataset = ImageList(list_file, max_bad_fraction=0.5)
    dataset[0]
    assert dataset.bad.bad_paths() == [tmp_path / "gone.jpg"]


@pytest.mark.parametrize("kind", [ImageNetFolder, ImageTree, ImageList])
def test_missing_path_is_named_at_construction(tmp_path: Path, kind: type) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        kind(missing)


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageTree(tmp_path)


def test_max_bad_fraction_must_be_below_one(imagenet: Path) -> None:
    with pytest.raises(ValueError, match="max_bad_fraction"):
        ImageNetFolder(imagenet, max_bad_fraction=1.0)
