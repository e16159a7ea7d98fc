"""High-bit-depth images keep their contrast, decompression bombs are refused by name, and
too many unreadable images end training with one clean line."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import TINY

from dinospec.data.datasets import ImageTree, load_rgb, load_rgb_tensor
from eval.seg_data import read_image

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png16(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit RGB): grey for (H, W),
    RGB for (H, W, 3)."""
    height, width = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b""))
    return path


def write_bomb(path: Path, side: int) -> Path:
    """A PNG of a few bytes that declares side x side pixels (and holds none)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    return path


def as_rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


GREY16 = np.random.default_rng(0).integers(0, 65536, (12, 10)).astype(np.uint16)
GREY16[0, :4] = [0, 257, 65535, 128]
SCALED = np.round(GREY16 / 257).astype(np.int64)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = write_png16(tmp_path / "depth.png", GREY16)
    assert Image.open(path).mode == "I;16"
    expected = np.repeat(SCALED[..., None], 3, axis=2)
    assert np.array_equal(as_rgb_array(load_rgb(path)), expected)
    assert np.array_equal(load_rgb_tensor(path).permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(read_image(path).permute(1, 2, 0).numpy(), expected)


def test_32_bit_integer_image_holding_16_bit_values_is_scaled(tmp_path):
    path = tmp_path / "grey.tif"
    Image.fromarray(GREY16.astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert np.array_equal(as_rgb_array(load_rgb(path))[..., 0], SCALED)


def test_float_image_in_unit_range_is_scaled(tmp_path):
    values = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    path = tmp_path / "float.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    assert np.array_equal(as_rgb_array(load_rgb(path))[..., 1], np.round(values * 255))


@pytest.mark.parametrize(
    "values, mode",
    [(np.full((4, 4), 70000, np.int32), "I"), (np.full((4, 4), 3.0, np.float32), "F")],
)
def test_pixel_values_with_no_known_scale_are_refused_by_name(tmp_path, values, mode):
    path = tmp_path / f"odd_{mode}.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(ValueError, match=rf"{path}: mode {mode}"):
        load_rgb(path)


def test_16_bit_rgb_png_keeps_its_contrast(tmp_path):
    values = np.random.default_rng(1).integers(0, 65536, (6, 5, 3))
    path = write_png16(tmp_path / "rgb48.png", values)
    assert np.abs(as_rgb_array(load_rgb(path)) - np.round(values / 257)).max() <= 1


def test_decompression_bomb_is_refused_naming_the_file(tmp_path):
    path = write_bomb(tmp_path / "bomb.png", 100_000)
    with pytest.raises(Image.DecompressionBombError, match=str(path)):
        load_rgb(path)


def test_image_over_the_pixel_limit_is_an_error_not_a_warning(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (12, 12)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError, match=rf"{path}.*144 pixels"):
        load_rgb(path)


def test_bomb_in_a_training_set_counts_as_unreadable(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (12, 12)).save(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    dataset = ImageTree(tmp_path, max_bad_fraction=0.5, loader=load_rgb_tensor)
    assert dataset[1][0].shape == (3, 8, 8)
    assert dataset.bad.bad_paths() == [tmp_path / "b.png"]


@pytest.mark.parametrize(
    ("command", "workers"),
    [
        (["dinospec.cli", "train"], 0),
        (["dinospec.cli", "train"], 2),
        (["launch.local", "train"], 2),
    ],
)
def test_too_many_bad_images_is_one_clean_line_from_the_cli(tmp_path, command, workers):
    root = tmp_path / "imagenet"
    for k in range(4):
        path = root / "train" / f"n0{k % 2}" / f"img{k}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a JPEG")
    overrides = [*TINY, "data.dataset=imagenet", f"data.path={root}"]
    overrides += [f"data.num_workers={workers}", f"train.output_dir={tmp_path / 'run'}"]
    result = subprocess.run(
        [sys.executable, "-m", *command, str(CONFIG), *overrides],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    [error] = [line for line in lines if not line.startswith("WARNING ")]
    assert error.startswith(("dinospec: ", "python -m launch.local: "))
    assert "4 images are unreadable" in error
    assert f"for example: {root / 'train'}" in error
