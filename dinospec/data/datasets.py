"""Image datasets read from disk: ImageNet class folders, any folder tree, a list file.

Large crawled collections always hold a few broken files, and one of them must not end a
multi-day run; a broken disk or a wrong path, though, must end it early instead of
silently training on a fraction of the data. So an unreadable image is logged and
replaced by the next readable one (the same replacement every time, for
reproducibility), and distinct bad files are counted in memory shared with the
DataLoader workers; past `max_bad_fraction` of the dataset, loading fails loudly.

Images come as PIL images (`load_rgb`, what evaluation transforms expect) or, for
training, as uint8 tensors (`load_rgb_tensor`), which the multi-crop augmentation works on.
Both go through `open_image` and `to_rgb`: PIL's own conversion clips 16-bit and float
pixels to 255 (a 16-bit PNG turns almost white) and only warns about an image over its
pixel limit, so high bit depths are scaled here and an oversized image is an error that
names its file.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from dinospec.config import ConfigError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)
NO_LABEL = -1
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
EXAMPLE_PATHS = 5
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
SIXTEEN_BIT_MAX = 65535


class TooManyBadImagesError(ConfigError):
    """More unreadable images than the dataset's max_bad_fraction allows.

    A ConfigError because the user fixes it like one (the data behind `data.path`, or
    `data.max_bad_fraction`), and so that every command that reports configuration errors as
    one line reports this one too. Raised in a DataLoader worker, it reaches the main process
    rebuilt from a message that embeds the worker's traceback; only the original message is
    kept, so the error still prints as one line.
    """

    WORKER_MARKER = "TooManyBadImagesError: "

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and self.WORKER_MARKER in message:
            message = message.rsplit(self.WORKER_MARKER, 1)[1].strip()
        super().__init__(message)


def is_image_file(path: str | Path) -> bool:
    """By extension only: opening every file of a large tree to sniff it would take hours.
    Hidden files are skipped too; on copied datasets they are mostly macOS '._' metadata."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(root: Path) -> list[Path]:
    """Every image file under root, recursively, in a sorted (machine-independent) order."""
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [Path(directory, f) for f in sorted(files) if is_image_file(f)]
    return found


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """PIL's open, with an image over Image.MAX_IMAGE_PIXELS refused as a decompression bomb.

    PIL raises only above twice its limit and merely warns between once and twice, then
    decodes anyway; its message does not name the file. Here both are one error naming it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Image.DecompressionBombError(f"{path}: {err}") from None
    with image:
        yield image


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """An 8-bit RGB image, high bit depths scaled down rather than clipped.

    16-bit grey (I;16*, e.g. PNG and TIFF) and 32-bit integer images (I, e.g. 16-bit PGM,
    32-bit TIFF) are read as 0..65535 and divided by 257; float images (F) as 0..1 and
    multiplied by 255. Values outside those scales have no known meaning and are refused
    (ValueError naming the file). 16-bit RGB(A) PNGs need nothing: PIL already keeps their
    high bytes.
    """
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        grey = _scaled(np.asarray(image, dtype=np.float64), SIXTEEN_BIT_MAX, image.mode, path)
    elif image.mode == "F":
        grey = _scaled(np.asarray(image, dtype=np.float64), 1.0, image.mode, path)
    else:
        return image.convert("RGB")
    return Image.fromarray(grey).convert("RGB")


def _scaled(values: np.ndarray, top: float, mode: str, path: Path) -> np.ndarray:
    """uint8 values of `values`, whose full scale is [0, top]."""
    if not (np.isfinite(values).all() and 0 <= values.min() <= values.max() <= top):
        found = f"[{values.min():g}, {values.max():g}]"
        raise ValueError(f"{path}: mode {mode} with pixel values {found}, outside [0, {top:g}]")
    return np.round(values * (255 / top)).astype(np.uint8)


def load_rgb(path: Path) -> Image.Image:
    """Decode fully now (PIL is lazy), so a truncated file fails here, not in a transform."""
    with open_image(path) as image:
        return to_rgb(image, path)


def load_rgb_tensor(path: Path) -> Tensor:
    """RGB uint8 (3, H, W) tensor, the input the training augmentation's tensor kernels take.

    PIL decodes (libjpeg-turbo for JPEGs): torchvision's own decoders are deprecated in
    favour of TorchCodec from 0.29 on and saved only 0.08 ms of a ~16 ms multi-crop image.
    """
    return pil_to_tensor(load_rgb(path))


def _require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found or not a directory: {root}")
    return root


class BadImageTracker:
    """Distinct unreadable files, counted in shared memory so DataLoader workers (forked or
    spawned) add to one tally that the main process can read."""

    def __init__(self, paths: list[Path], max_bad_fraction: float) -> None:
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        self.paths = paths
        self.max_bad_fraction = max_bad_fraction
        self.is_bad = torch.zeros(len(paths), dtype=torch.bool).share_memory_()

    @property
    def count(self) -> int:
        return int(self.is_bad.sum())

    @property
    def limit(self) -> int:
        """The number of bad files tolerated."""
        return int(self.max_bad_fraction * len(self.paths))

    def bad_paths(self) -> list[Path]:
        return [self.paths[i] for i in self.is_bad.nonzero().flatten().tolist()]

    def record(self, index: int, error: Exception) -> None:
        logger.warning("skipping unreadable image %s: %s", self.paths[index], error)
        self.is_bad[index] = True
        if self.count > self.limit:
            raise TooManyBadImagesError(self._message())

    def _message(self) -> str:
        examples = ", ".join(str(p) for p in self.bad_paths()[:EXAMPLE_PATHS])
        return (
            f"{self.count} of {len(self.paths)} images are unreadable, more than the limit of "
            f"{self.limit} (max_bad_fraction={self.max_bad_fraction}); for example: {examples}"
        )


Loader = Callable[[Path], Image.Image | Tensor]
Transform = Callable[[Image.Image | Tensor], Any]


class ImageFileDataset(Dataset):
    """(transform(image), label) pairs from a fixed list of files; subclasses find them.
    `loader` decodes a file and raises one of DECODE_ERRORS when it cannot."""

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        transform: Transform | None,
        max_bad_fraction: float,
        source: str | Path,
        loader: Loader = load_rgb,
    ) -> None:
        if not samples:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise FileNotFoundError(f"no image files ({extensions}) found in {source}")
        self.samples = samples
        self.transform = transform
        self.loader = loader
        self.bad = BadImageTracker([path for path, _ in samples], max_bad_fraction)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self._first_readable(index)
        return (image if self.transform is None else self.transform(image)), label

    def _first_readable(self, index: int) -> tuple[Image.Image | Tensor, int]:
        """Walk forward (wrapping) from index; ends because the tracker raises before every
        file can be bad, max_bad_fraction being below 1."""
        candidate = index
        while True:
            path, label = self.samples[candidate]
            try:
                return self.loader(path), label
            except DECODE_ERRORS as error:
                self.bad.record(candidate, error)
            candidate = (candidate + 1) % len(self)


class ImageNetFolder(ImageFileDataset):
    """root/<wnid>/*.JPEG; the label is the index of the class folder in sorted order, which
    matches the usual ImageNet-1k class indices."""

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        max_bad_fraction: float = 0.01,
        loader: Loader = load_rgb,
    ) -> None:
        root = _require_dir(root)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name[0] != ".")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = [(p, i) for i, name in enumerate(self.classes) for p in find_images(root / name)]
        super().__init__(samples, transform, max_bad_fraction, root, loader)


class ImageTree(ImageFileDataset):
    """Every image below root, at any depth; no labels (NO_LABEL) since folder names of an
    arbitrary tree carry no class meaning."""

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        max_bad_fraction: float = 0.01,
        loader: Loader = load_rgb,
    ) -> None:
        root = _require_dir(root)
        samples = [(p, NO_LABEL) for p in find_images(root)]
        super().__init__(samples, transform, max_bad_fraction, root, loader)


class ImageList(ImageFileDataset):
    """A text file with one image path per line; relative paths are taken from the list
    file's folder so a dataset directory can be moved with its list. Blank lines and lines
    starting with '#' are ignored. Listed files are not checked at construction (slow on
    network storage): a missing one counts as unreadable when it is read."""

    def __init__(
        self,
        list_file: str | Path,
        transform: Transform | None = None,
        max_bad_fraction: float = 0.01,
        loader: Loader = load_rgb,
    ) -> None:
        list_file = Path(list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"image list file not found: {list_file}")
        paths = [list_file.parent / line for line in _listed_paths(list_file)]
        samples = [(p, NO_LABEL) for p in paths if is_image_file(p)]
        super().__init__(samples, transform, max_bad_fraction, list_file, loader)


def _listed_paths(list_file: Path) -> list[str]:
    lines = (line.strip() for line in list_file.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]
