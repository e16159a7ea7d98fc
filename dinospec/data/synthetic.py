"""Procedural scenes: the built-in dataset, so training and evaluation run with no files.

A useful stand-in for photos must reward what self-supervised features should learn
(shape, texture, object extent) and defeat shortcuts. Each scene is painted in two grey
levels drawn at random, shared by its background and its objects, so neither brightness
nor contrast says anything about the class and only a regular pattern and its outline
mark an object. Grey rather than colour on purpose: with a colour palette per scene, a
short self-supervised run learns to recognise each scene by its palette (which survives
colour jitter) and nothing else; without it, texture and shape are what views of one
scene share. Each scene is a pure function of (seed, index), so any worker can render any
item and a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dinospec.data.transforms import normalize

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]
Fill = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _polygon(sides: int) -> Mask:
    """Regular polygon with circumradius 1, as the intersection of its edge half-planes."""
    normals = 2 * np.pi * np.arange(sides) / sides
    inradius = np.cos(np.pi / sides)

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        dist = np.multiply.outer(u, np.cos(normals)) + np.multiply.outer(v, np.sin(normals))
        return (dist <= inradius).all(axis=-1)

    return inside


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    phase = (np.arctan2(v, u) * 5 / (2 * np.pi)) % 1.0
    return np.hypot(u, v) <= 0.4 + 0.6 * np.abs(1 - 2 * phase)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.hypot(u, v) <= 1) & (np.hypot(u - 0.45, v) > 0.75)


@dataclass(frozen=True)
class ObjectClass:
    """A shape (inside test on object coordinates, radius about 1) and a texture (the
    share of the second colour at each point, in object coordinates so that the texture
    turns and scales with its object)."""

    name: str
    inside: Mask
    fill: Fill


def _stripes(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(u * rng.uniform(2.5, 3.5)) % 2


def _checker(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    freq = rng.uniform(2.0, 3.0)
    return (np.floor(u * freq) + np.floor(v * freq)) % 2


def _dots(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    freq = rng.uniform(2.5, 3.5)
    return (np.hypot((u * freq) % 1 - 0.5, (v * freq) % 1 - 0.5) > 0.3).astype(np.float64)


def _rings(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(np.hypot(u, v) * rng.uniform(3.0, 4.0)) % 2


def _spokes(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.floor(np.arctan2(v, u) * int(rng.integers(5, 8)) / np.pi) % 2


def _grid(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    freq = rng.uniform(2.5, 3.5)
    return (((u * freq) % 1 < 0.3) | ((v * freq) % 1 < 0.3)).astype(np.float64)


def _waves(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2.0, 3.0) * u)


def _zigzag(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    freq = rng.uniform(2.5, 3.5)
    return np.floor((u + np.abs((v * freq) % 1 - 0.5)) * freq) % 2


CLASSES = (
    ObjectClass("ringed disc", lambda u, v: np.hypot(u, v) <= 1, _rings),
    ObjectClass("checkered square", lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8, _checker),
    ObjectClass("striped triangle", _polygon(3), _stripes),
    ObjectClass("dotted hexagon", _polygon(6), _dots),
    ObjectClass("spoked star", _star, _spokes),
    ObjectClass("gridded cross", _cross, _grid),
    ObjectClass("wavy ellipse", lambda u, v: np.hypot(u, v / 0.55) <= 1, _waves),
    ObjectClass("zigzag diamond", lambda u, v: np.abs(u) + np.abs(v) / 0.6 <= 1, _zigzag),
    ObjectClass("striped crescent", _crescent, _stripes),
    ObjectClass("checkered ring", lambda u, v: np.abs(np.hypot(u, v) - 0.75) <= 0.25, _checker),
)


def _two_greys(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two grey levels at least 80 apart (mod 256), so textures stay visible while each
    level alone is still uniform over [0, 255]."""
    first = rng.integers(0, 256)
    second = (first + rng.integers(80, 177)) % 256
    return np.full(3, first, dtype=np.float64), np.full(3, second, dtype=np.float64)


def _blend(weight: np.ndarray, colours: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return colours[0] + weight[..., None] * (colours[1] - colours[0])


def _smooth_weights(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    cells = int(rng.integers(3, 8))
    grid = rng.uniform(0, 1, (cells, cells))
    pos = np.linspace(0, cells - 1, size)
    low = np.minimum(pos.astype(int), cells - 2)
    frac = pos - low
    rows = grid[low] * (1 - frac[:, None]) + grid[low + 1] * frac[:, None]
    return rows[:, low] * (1 - frac) + rows[:, low + 1] * frac


@dataclass
class Scene:
    """image (H, W, 3) uint8; label_map (H, W) int64, 0 = background, c + 1 = class c;
    instance_map (H, W) int64, 0 = background, k + 1 = k-th object drawn; label = class
    of the object with the most visible pixels."""

    image: np.ndarray
    label_map: np.ndarray
    instance_map: np.ndarray
    label: int

    def image_tensor(self) -> Tensor:
        """(3, H, W) uint8, the layout torchvision transforms take."""
        return torch.from_numpy(self.image).permute(2, 0, 1).contiguous()


class SyntheticScenes(Dataset):
    """1 to `max_objects` shapes on a noise, gradient or stripe background.

    Items are (image, label_map, label): image a uint8 (3, H, W) tensor, or whatever
    `transform` makes of it; label_map an int64 (H, W) tensor with 0 for background and
    c + 1 for class c; label the class index (0 .. num_classes - 1) of the largest object.
    """

    def __init__(
        self,
        size: int = 10_000,
        image_size: int = 64,
        seed: int = 0,
        num_classes: int = 8,
        transform: Callable[[Tensor], Any] | None = None,
        max_objects: int = 4,
    ) -> None:
        if not 2 <= num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {num_classes}")
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.classes = CLASSES[:num_classes]
        self.transform = transform
        self.max_objects = max_objects
        centres = np.arange(image_size) + 0.5
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Any, Tensor, int]:
        scene = self.render(index)
        image = scene.image_tensor()
        image = image if self.transform is None else self.transform(image)
        return image, torch.from_numpy(scene.label_map), scene.label

    def render(self, index: int) -> Scene:
        """The whole scene, instance map included, for probes and checks that need more
        than a training item carries."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} scenes")
        rng = np.random.default_rng([self.seed, index])
        palette = _two_greys(rng)
        canvas = self._background(rng, palette)
        instances = np.zeros(canvas.shape[:2], dtype=np.int64)
        n_objects = int(rng.integers(1, self.max_objects + 1))
        labels = rng.integers(0, len(self.classes), n_objects)
        for k, label in enumerate(labels):
            colours = palette[:: rng.choice((-1, 1))]
            self._draw(canvas, instances, k + 1, self.classes[label], colours, rng)
        canvas += rng.normal(0, 4, canvas.shape)
        label_map = np.concatenate([[0], labels + 1])[instances]
        visible = np.bincount(instances.ravel(), minlength=n_objects + 1)[1:]
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        return Scene(image, label_map, instances, int(labels[np.argmax(visible)]))

    def _background(
        self, rng: np.random.Generator, palette: tuple[np.ndarray, np.ndarray]
    ) -> np.ndarray:
        """Aperiodic textures (soft blobs or a gradient, with grain) in the scene's two
        grey levels, so that only a regular pattern and its outline mark an object."""
        if rng.integers(0, 2) == 0:
            weight = _smooth_weights(rng, self.image_size)
        else:
            angle = rng.uniform(0, 2 * np.pi)
            along = (self._x * np.cos(angle) + self._y * np.sin(angle)) / self.image_size
            weight = np.clip(along + 0.5 - along.mean(), 0, 1)
        grain = rng.uniform(5, 30) * rng.standard_normal(weight.shape)
        return _blend(weight, palette) + grain[..., None]

    def _draw(
        self,
        canvas: np.ndarray,
        instances: np.ndarray,
        instance_id: int,
        object_class: ObjectClass,
        palette: tuple[np.ndarray, np.ndarray],
        rng: np.random.Generator,
    ) -> None:
        """Paint one object over what is there; later objects occlude earlier ones."""
        radius = rng.uniform(0.25, 0.45) * self.image_size
        cy, cx = rng.uniform(0.15, 0.85, 2) * self.image_size
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = self._x - cx, self._y - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
        v = (dy * np.cos(angle) - dx * np.sin(angle)) / radius
        inside = object_class.inside(u, v)
        weight = object_class.fill(u[inside], v[inside], rng)
        canvas[inside] = _blend(weight, palette)
        instances[inside] = instance_id

    def segmentation_view(
        self, transform: Callable[[Tensor], Tensor] | None = None
    ) -> SegmentationView:
        return SegmentationView(self, transform)


class SegmentationView(Dataset):
    """(image, label_map) pairs for a linear segmentation probe. The image is normalized
    float32 like the pretraining crops unless another `transform` is given. The background
    is a real class here (index 0, so `num_classes` counts it): unlike ADE20K's 'other'
    label, it is well defined and a probe should learn it."""

    def __init__(
        self, scenes: SyntheticScenes, transform: Callable[[Tensor], Tensor] | None
    ) -> None:
        self.scenes = scenes
        self.transform = normalize() if transform is None else transform
        self.num_classes = len(scenes.classes) + 1
        self.class_names = ["background", *scenes.class_names]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        scene = self.scenes.render(index)
        return self.transform(scene.image_tensor()), torch.from_numpy(scene.label_map)
