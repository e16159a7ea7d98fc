"""Depth datasets: NYU Depth v2 as DINOv2's evaluation reads it, and any folder pair of
images and depth maps.

Every dataset yields (uint8 RGB image (3, H, W), float32 depth (H, W) in metres), with 0
where nothing was measured.

Depth maps are single-channel 16-bit PNGs holding depth x `depth_scale`. NYU's, as the
BTS / depth-toolbox split files list them, hold millimetres (depth_scale 1000, DINOv2's
config); KITTI's hold depth x 256. Any other file (8-bit, RGB, JPEG) is refused with its
name: 8 bits cannot hold metric depth, and a misread map gives plausible-looking but
meaningless scores.

NYU layout (DINOv2's `NYUDataset`): a split file under `root` whose lines read
`rgb_path depth_path [focal]`, paths relative to `root` (a leading '/' is ignored). Lines
whose depth is `None` have no ground truth and are skipped, as there; pairs are sorted by
image path. NYU frames must be 480 x 640, the frame the NYU crops are defined on.

Folder layout: an image folder and a depth folder whose files share stems (maps `.png`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dinospec.data.datasets import open_image
from eval.depth_metrics import NYU_SIZE
from eval.seg_data import PairTransform, find_pairs, read_image

DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")
"""PIL modes of a 16-bit greyscale PNG ("I" is how Pillow before 10 opens one; PNG has no
32-bit integer format, so from a PNG it can only mean 16 bits)."""
NO_DEPTH = "None"
Pair = tuple[Path, Path]


def read_depth(path: Path, depth_scale: float) -> torch.Tensor:
    """Depth (H, W) in metres of a 16-bit PNG storing depth x `depth_scale`."""
    try:
        with open_image(path) as img:
            if img.format != "PNG" or img.mode not in DEPTH_MODES:
                raise ValueError(
                    f"depth map {path} is a {img.format} of mode {img.mode}; expected a "
                    "single-channel 16-bit PNG"
                )
            values = np.array(img)
    except OSError as err:
        raise ValueError(f"cannot decode depth map {path}: {err}") from err
    return torch.from_numpy(values.astype(np.float32) / depth_scale)


class DepthDataset(Dataset):
    """Image / depth-map pairs decoded lazily; `frame` (H, W), when given, is the size every
    image must have."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        depth_scale: float,
        frame: tuple[int, int] | None = None,
        transform: PairTransform | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.depth_scale = depth_scale
        self.frame = frame
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, depth_path = self.pairs[index]
        image = read_image(image_path)
        depth = read_depth(depth_path, self.depth_scale)
        if image.shape[1:] != depth.shape:
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[1:])} but its depth map "
                f"{depth_path} is {tuple(depth.shape)} (H, W)"
            )
        if self.frame is not None and tuple(depth.shape) != self.frame:
            raise ValueError(
                f"image {image_path} is {tuple(depth.shape)} (H, W); this layout needs {self.frame}"
            )
        if self.transform is not None:
            image, depth = self.transform(image, depth)
        return image, depth


def _relative(root: Path, name: str) -> Path:
    return root / name.lstrip("/\\")


def split_pairs(root: Path, split_file: Path) -> list[Pair]:
    """(image, depth) paths listed by a split file, sorted by image path."""
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    pairs = []
    for number, line in enumerate(split_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (2, 3):
            raise ValueError(
                f"{split_file} line {number}: expected 'rgb_path depth_path [focal]', got {line!r}"
            )
        if fields[1] == NO_DEPTH:
            continue
        pair = (_relative(root, fields[0]), _relative(root, fields[1]))
        missing = [path for path in pair if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"{split_file} line {number}: file not found: {missing[0]}")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"split file {split_file} lists no image with a depth map")
    return sorted(pairs)


def nyu(root: Path | str, split: str, depth_scale: float = 1000.0) -> DepthDataset:
    """NYU Depth v2 from `root` and the split file `split` (relative to `root`, e.g.
    nyu_train.txt / nyu_test.txt)."""
    root = Path(root)
    return DepthDataset(split_pairs(root, root / split), depth_scale, frame=NYU_SIZE)


def depth_folders(
    image_dir: Path | str, depth_dir: Path | str, depth_scale: float = 1000.0
) -> DepthDataset:
    """Images and same-stem 16-bit PNG depth maps in two folders."""
    pairs = find_pairs(Path(image_dir), Path(depth_dir), what="depth map")
    return DepthDataset(pairs, depth_scale)
