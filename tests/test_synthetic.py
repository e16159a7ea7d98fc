"""Synthetic scenes: determinism, label maps that match the pixels, no colour shortcut."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dinospec.data import MultiCropAugmentation, SyntheticScenes
from dinospec.data.synthetic import CLASSES, Scene

N_CLASSES = 8


@pytest.fixture(scope="module")
def single_object_scenes() -> tuple[list[Scene], np.ndarray]:
    dataset = SyntheticScenes(size=1200, seed=3, num_classes=N_CLASSES, max_objects=1)
    scenes = [dataset.render(i) for i in range(1200)]
    return scenes, np.array([s.label for s in scenes])


def nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Fit class means on the first half, classify the second half."""
    features = (features - features.mean(0)) / (features.std(0) + 1e-9)
    half = len(labels) // 2
    train, test = slice(0, half), slice(half, None)
    centroids = np.stack([features[train][labels[train] == c].mean(0) for c in range(N_CLASSES)])
    distances = ((features[test][:, None] - centroids[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == labels[test]).mean())


def shape_features(scene: Scene) -> list[float]:
    """Rotation-invariant descriptors of the object mask plus inner-texture contrast."""
    mask = scene.instance_map == 1
    ys, xs = np.nonzero(mask)
    radius = np.hypot(ys - ys.mean(), xs - xs.mean())
    gray = scene.image.astype(np.float64).mean(-1)
    contrast = np.abs(gray[2:, 1:-1] - gray[:-2, 1:-1]) + np.abs(gray[1:-1, 2:] - gray[1:-1, :-2])
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    texture = contrast[inner].mean() if inner.any() else 0.0
    max_r = radius.max() + 1e-9
    return [mask.sum() / (np.pi * max_r**2), radius.mean() / max_r, radius.std() / max_r, texture]


def test_same_seed_and_index_give_identical_scenes() -> None:
    a = SyntheticScenes(size=50, seed=7)
    b = SyntheticScenes(size=50, seed=7)
    b.render(3)
    for index in (0, 5, 49):
        first, second = a.render(index), b.render(index)
        assert np.array_equal(first.image, second.image)
        assert np.array_equal(first.label_map, second.label_map)
        assert first.label == second.label


def test_other_index_or_seed_gives_another_scene() -> None:
    a = SyntheticScenes(size=50, seed=7)
    assert not np.array_equal(a.render(0).image, a.render(1).image)
    assert not np.array_equal(a.render(0).image, SyntheticScenes(size=50, seed=8).render(0).image)


def test_item_types_shapes_and_ranges() -> None:
    dataset = SyntheticScenes(size=20, image_size=48, num_classes=N_CLASSES)
    assert len(dataset) == 20
    image, label_map, label = dataset[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 48)
    assert label_map.dtype == torch.int64 and label_map.shape == (48, 48)
    assert isinstance(label, int) and 0 <= label < N_CLASSES
    assert int(label_map.min()) >= 0 and int(label_map.max()) <= N_CLASSES
    with pytest.raises(IndexError):
        dataset[20]


def test_at_least_eight_distinct_classes() -> None:
    names = [c.name for c in CLASSES]
    assert len(set(names)) == len(names) >= 8
    assert SyntheticScenes(num_classes=10).class_names == names[:10]
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenes(num_classes=len(CLASSES) + 1)


def test_label_maps_agree_with_objects_and_image_label() -> None:
    dataset = SyntheticScenes(size=200, seed=1, num_classes=N_CLASSES)
    seen_classes = set()
    for index in range(200):
        scene = dataset.render(index)
        object_ids = np.unique(scene.instance_map)
        assert np.array_equal(scene.label_map > 0, scene.instance_map > 0)
        visible = np.bincount(scene.instance_map.ravel())[1:]
        largest = int(np.argmax(visible)) + 1
        assert scene.label + 1 == int(scene.label_map[scene.instance_map == largest][0])
        for object_id in object_ids[1:]:
            assert len(np.unique(scene.label_map[scene.instance_map == object_id])) == 1
        seen_classes.update(np.unique(scene.label_map).tolist())
    assert seen_classes == set(range(N_CLASSES + 1))


def test_label_boundaries_are_edges_in_the_image() -> None:
    """Pixels where the label changes have stronger image gradients than the rest."""
    dataset = SyntheticScenes(size=100, seed=2)
    at_boundary, elsewhere = [], []
    for index in range(100):
        scene = dataset.render(index)
        image = scene.image.astype(np.float64)
        gradient = np.abs(np.diff(image, axis=1)).sum(-1)
        boundary = np.diff(scene.instance_map, axis=1) != 0
        at_boundary.append(gradient[boundary].mean())
        elsewhere.append(gradient[~boundary].mean())
    assert np.mean(at_boundary) > 2 * np.mean(elsewhere)


def test_colour_does_not_reveal_the_class(single_object_scenes) -> None:
    scenes, labels = single_object_scenes
    chance = 1 / N_CLASSES
    image_rgb = np.array([s.image.reshape(-1, 3).mean(0) for s in scenes])
    object_rgb = np.array([s.image[s.instance_map == 1].mean(0) for s in scenes])
    assert nearest_centroid_accuracy(image_rgb, labels) < chance + 0.06
    assert nearest_centroid_accuracy(object_rgb, labels) < chance + 0.06


def test_shape_and_texture_reveal_the_class(single_object_scenes) -> None:
    scenes, labels = single_object_scenes
    features = np.array([shape_features(s) for s in scenes])
    assert nearest_centroid_accuracy(features, labels) > 0.6
    assert np.bincount(labels, minlength=N_CLASSES).min() > 0.5 * len(labels) / N_CLASSES


def test_rendering_is_fast() -> None:
    dataset = SyntheticScenes(size=100)
    start = time.perf_counter()
    for index in range(100):
        dataset.render(index)
    assert (time.perf_counter() - start) / 100 < 0.01


def test_transform_receives_the_uint8_image() -> None:
    augmentation = MultiCropAugmentation(
        local_crops_number=2, global_crops_size=32, local_crops_size=16
    )
    crops, label_map, _ = SyntheticScenes(size=4, transform=augmentation)[0]
    assert crops["global_crops"][0].shape == (3, 32, 32) and len(crops["local_crops"]) == 2
    assert label_map.shape == (64, 64)


def test_segmentation_view_pairs_normalized_images_with_label_maps() -> None:
    scenes = SyntheticScenes(size=10, image_size=32, num_classes=N_CLASSES)
    view = scenes.segmentation_view()
    assert len(view) == 10 and view.num_classes == N_CLASSES + 1
    assert view.class_names[0] == "background" and len(view.class_names) == N_CLASSES + 1
    image, target = view[3]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert image.min() < 0 < image.max() and image.abs().max() < 3
    assert torch.equal(target, torch.from_numpy(scenes.render(3).label_map))
    custom = scenes.segmentation_view(transform=lambda im: im.float())
    assert torch.equal(custom[3][0], scenes[3][0].float())
