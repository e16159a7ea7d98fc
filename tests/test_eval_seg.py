"""Segmentation datasets, paired transforms, the linear head and sliding-window inference.

The backbone is a stand-in with DINOv2's `get_intermediate_layers` API made of convs, so
these tests do not depend on the ViT and can use geometric facts exactly: with patch size
1 and 1x1 convs every output pixel depends only on its own input pixel.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from eval.metrics import IGNORE_INDEX
from eval.seg_data import (
    ADE20K_CLASSES,
    LabelEncoding,
    ade20k,
    camvid,
    folder_pairs,
    read_label,
)
from eval.seg_head import (
    LinearSegmenter,
    center_pad,
    predict_probabilities,
    slide_inference,
    window_starts,
)
from eval.seg_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SegTestTransform,
    SegTrainTransform,
    normalize,
    random_crop,
)

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


class ConvBackbone(nn.Module):
    """Patchify conv then 1x1-conv blocks; [CLS] is the mean patch token."""

    def __init__(self, patch_size: int = 4, embed_dim: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(nn.Conv2d(embed_dim, embed_dim, 1) for _ in range(depth))
        self.norm = nn.GroupNorm(1, embed_dim)

    def get_intermediate_layers(self, x, n, reshape, return_class_token, norm):
        assert reshape and return_class_token and norm
        x = self.patch_embed(x)
        outputs = []
        for block in self.blocks:
            x = x + torch.tanh(block(x))
            outputs.append(x / (1 + x.norm(dim=1, keepdim=True)))
        return tuple((out, out.mean(dim=(2, 3))) for out in outputs[-n:])


def _per_pixel_segmenter(num_classes: int = 5, n_layers: int = 1) -> LinearSegmenter:
    model = LinearSegmenter(ConvBackbone(patch_size=1), num_classes, n_layers).eval()
    nn.init.normal_(model.head.classifier.weight)
    return model


def _save_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)


def _image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------- datasets


def _make_ade(root: Path, split: str, label: np.ndarray) -> None:
    base = root / "ADEChallengeData2016"
    _save_png(base / "images" / split / "ADE_0001.jpg", _image(*label.shape))
    _save_png(base / "annotations" / split / "ADE_0001.png", label)


def test_ade20k_shifts_labels_and_ignores_zero(tmp_path: Path) -> None:
    label = np.array([[0, 1, 2], [149, 150, 0]], dtype=np.uint8)
    _make_ade(tmp_path, "validation", label)
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        data = ade20k(root, "val")
        image, target = data[0]
        assert image.shape == (3, 2, 3) and image.dtype == torch.uint8
        expected = torch.tensor([[IGNORE_INDEX, 0, 1], [148, 149, IGNORE_INDEX]])
        assert torch.equal(target, expected)
    assert data.num_classes == 150 and data.class_names == list(ADE20K_CLASSES)


def test_ade20k_missing_split_names_the_path(tmp_path: Path) -> None:
    _make_ade(tmp_path, "validation", np.zeros((2, 2), dtype=np.uint8))
    missing = tmp_path / "ADEChallengeData2016" / "images" / "training"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ade20k(tmp_path, "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        ade20k(tmp_path, "test")


def test_ade20k_out_of_range_label_names_file_value_and_range(tmp_path: Path) -> None:
    _make_ade(tmp_path, "training", np.array([[1, 151]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"ADE_0001\.png contains value 151; allowed: 1\.\.150"):
        ade20k(tmp_path, "train")[0]


def test_camvid_real_files_map_void_to_ignore() -> None:
    data = camvid(CAMVID, "val")
    assert len(data) == 101 and data.num_classes == 11
    image, target = data[0]
    assert image.shape == (3, 360, 480) and target.shape == (360, 480)
    raw = read_label(data.pairs[0][1])
    assert torch.equal(target == IGNORE_INDEX, raw == 11)
    assert torch.equal(target[raw != 11], raw[raw != 11])
    assert int(target[target != IGNORE_INDEX].max()) <= 10


def _make_camvid(root: Path, label: np.ndarray) -> None:
    _save_png(root / "train" / "a.png", _image(*label.shape))
    _save_png(root / "trainannot" / "a.png", label)


def test_camvid_out_of_range_label(tmp_path: Path) -> None:
    _make_camvid(tmp_path, np.array([[3, 12]], dtype=np.uint8))
    with pytest.raises(
        ValueError, match=r"a\.png contains value 12; allowed: 0\.\.10 \(classes\), 11"
    ):
        camvid(tmp_path, "train")[0]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val")):
        camvid(tmp_path, "val")


def _make_folder(root: Path, label: np.ndarray) -> Path:
    _save_png(root / "img" / "x.jpg", _image(*label.shape))
    _save_png(root / "lbl" / "x.png", label)
    class_file = root / "classes.txt"
    class_file.write_text("# three classes\nroad\n\ncar\nsky\n")
    return class_file


def test_folder_pairs_with_class_file(tmp_path: Path) -> None:
    class_file = _make_folder(tmp_path, np.array([[0, 1], [2, 255]], dtype=np.uint8))
    data = folder_pairs(tmp_path / "img", tmp_path / "lbl", class_file)
    assert data.class_names == ["road", "car", "sky"]
    assert torch.equal(data[0][1], torch.tensor([[0, 1], [2, IGNORE_INDEX]]))


def test_folder_pairs_label_beyond_class_list(tmp_path: Path) -> None:
    class_file = _make_folder(tmp_path, np.array([[0, 3]], dtype=np.uint8))
    data = folder_pairs(tmp_path / "img", tmp_path / "lbl", class_file)
    with pytest.raises(ValueError, match=r"x\.png contains value 3; allowed: 0\.\.2"):
        data[0]


def test_folder_pairs_missing_label_and_size_mismatch(tmp_path: Path) -> None:
    class_file = _make_folder(tmp_path, np.zeros((4, 4), dtype=np.uint8))
    _save_png(tmp_path / "img" / "y.jpg", _image(4, 4))
    with pytest.raises(FileNotFoundError, match=r"no label, first: .*y\.png"):
        folder_pairs(tmp_path / "img", tmp_path / "lbl", class_file)
    _save_png(tmp_path / "lbl" / "y.png", np.zeros((4, 5), dtype=np.uint8))
    data = folder_pairs(tmp_path / "img", tmp_path / "lbl", class_file)
    with pytest.raises(ValueError, match=r"y\.jpg is \(4, 4\) but its label"):
        data[1]


def test_colour_label_is_rejected(tmp_path: Path) -> None:
    _save_png(tmp_path / "rgb.png", _image(3, 3))
    with pytest.raises(ValueError, match="single-channel"):
        read_label(tmp_path / "rgb.png")


def test_encoding_refuses_ignore_value_inside_class_range() -> None:
    with pytest.raises(ValueError, match="also class values"):
        LabelEncoding(num_classes=5, ignore_values=(3,))


# --------------------------------------------------------------- transforms


def test_train_transform_shapes_on_camvid() -> None:
    transform = SegTrainTransform(base_size=64, crop_size=48, generator=torch.Generator())
    image, label = camvid(CAMVID, "train", transform)[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert label.shape == (48, 48) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= set(range(11)) | {IGNORE_INDEX}


def test_train_transform_pads_with_ignore() -> None:
    # 40x60 image, base 20 at ratio 1 -> 20x30, smaller than the 32 crop in both axes.
    transform = SegTrainTransform(base_size=20, crop_size=32, ratio_range=(1.0, 1.0))
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image, label = transform(image, torch.zeros(40, 60, dtype=torch.long))
    assert image.shape == (3, 32, 32)
    assert (label[20:] == IGNORE_INDEX).all() and (label[:, 30:] == IGNORE_INDEX).all()
    assert (label[:20, :30] == 0).all()
    assert (image[:, 20:] == 0).all() and (image[:, :20, :30] != 0).all()


def _blocky_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Label of 8x8 blocks with the class written into the image, to check alignment."""
    blocks = torch.randint(0, 10, (8, 12))
    label = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)
    return (label * 20).to(torch.uint8).expand(3, -1, -1).clone(), label


def _aligned_transform(flip_prob: float) -> SegTrainTransform:
    """Scale ratio 1 at base 64 leaves a 64-pixel-high image unresized, so any mismatch
    between image and label can only come from cropping or flipping."""
    return SegTrainTransform(
        base_size=64,
        crop_size=40,
        ratio_range=(1.0, 1.0),
        flip_prob=flip_prob,
        cat_max_ratio=1.0,
        generator=torch.Generator().manual_seed(3),
    )


def test_train_transform_keeps_image_and_label_aligned() -> None:
    image, label = _blocky_pair()
    kept_image, kept = _aligned_transform(0.0)(image, label)
    flipped_image, flipped = _aligned_transform(1.0)(image, label)
    for out_image, out_label in ((kept_image, kept), (flipped_image, flipped)):
        pixels = out_image[0] * 255 * IMAGENET_STD[0] + 255 * IMAGENET_MEAN[0]
        assert torch.allclose(pixels, out_label.float() * 20, atol=1e-3)
    assert torch.equal(flipped, kept.flip(-1))
    assert not torch.equal(flipped, kept)


def test_crop_retries_towards_varied_crops() -> None:
    # Class 1 fills only the bottom-right 40x40 corner of 100x100: few 50x50 crops hold
    # both classes with neither above 75%, so redrawing must find them more often.
    label = torch.zeros(100, 100, dtype=torch.long)
    label[60:, 60:] = 1
    image = torch.zeros(3, 100, 100)

    def varied_count(ratio: float) -> int:
        count = 0
        for seed in range(40):
            gen = torch.Generator().manual_seed(seed)
            crop = random_crop(image, label, 50, ratio, generator=gen)[1]
            share = float((crop == 1).float().mean())
            count += 0.25 < share < 0.75
        return count

    assert varied_count(0.75) > 2 * varied_count(1.0)


def test_test_transform_resizes_image_only() -> None:
    image = torch.full((3, 360, 480), 0, dtype=torch.uint8)
    image[:] = torch.tensor([round(255 * m) for m in IMAGENET_MEAN])[:, None, None]
    label = torch.zeros(360, 480, dtype=torch.long)
    out_image, out_label = SegTestTransform(base_size=96)(image, label)
    assert out_image.shape == (3, 96, 128) and out_label is label
    assert out_image.abs().max() < 0.01


def test_normalize_uses_imagenet_statistics() -> None:
    white = torch.full((3, 1, 1), 255, dtype=torch.uint8)
    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    assert torch.allclose(normalize(white).flatten(), expected)


# ----------------------------------------------------------- head and inference


def test_segmenter_output_matches_input_size_and_trains_only_the_head() -> None:
    model = LinearSegmenter(ConvBackbone(patch_size=4), num_classes=6, n_layers=4).train()
    images = torch.randn(2, 3, 30, 37)
    logits = model(images)
    assert logits.shape == (2, 6, 30, 37)
    F.cross_entropy(logits, torch.randint(0, 6, (2, 30, 37))).backward()
    assert model.head.bn.num_features == 4 * 8
    assert all(p.grad is None for p in model.features.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert not model.features.backbone.training


def test_center_pad_splits_padding() -> None:
    padded, (top, left) = center_pad(torch.ones(1, 3, 30, 37), 4)
    assert padded.shape[-2:] == (32, 40) and (top, left) == (1, 1)
    assert float(padded.sum()) == 3 * 30 * 37


@pytest.mark.parametrize(("length", "crop", "stride"), [(50, 16, 11), (16, 16, 5), (9, 16, 4)])
def test_windows_cover_every_position(length: int, crop: int, stride: int) -> None:
    starts = window_starts(length, crop, stride)
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start : start + crop] = True
        assert start + min(crop, length) <= length
    assert covered.all()
    assert all(b - a <= stride for a, b in itertools.pairwise(starts))


def test_sliding_window_equals_whole_image_for_a_per_pixel_model() -> None:
    model = _per_pixel_segmenter()
    images = torch.randn(2, 3, 37, 53)
    whole = model(images)
    slid = slide_inference(model, images, crop_size=16, stride=11)
    assert slid.shape == whole.shape
    assert torch.allclose(slid, whole, atol=1e-5)


def test_sliding_window_feeds_crop_sized_windows() -> None:
    seen = []

    def model(window: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(window.shape[-2:]))
        return torch.zeros(window.shape[0], 2, *window.shape[-2:])

    slide_inference(model, torch.zeros(1, 3, 30, 20), crop_size=16, stride=8)
    assert set(seen) == {(16, 16)} and len(seen) == 3 * 2


def test_flip_and_scales_agree_for_an_equivariant_model() -> None:
    model = _per_pixel_segmenter()
    images = torch.randn(1, 3, 20, 24)
    plain = predict_probabilities(model, images, (20, 24), crop_size=16, stride=8)
    assert torch.allclose(plain, model(images).softmax(dim=1), atol=1e-5)
    flipped = predict_probabilities(model, images, (20, 24), crop_size=16, stride=8, flip=True)
    assert torch.allclose(flipped, plain, atol=1e-5)
    constant = torch.randn(1, 3, 1, 1).expand(1, 3, 20, 24)
    single = predict_probabilities(model, constant, (40, 48), 16, 8)
    multi = predict_probabilities(model, constant, (40, 48), 16, 8, (0.5, 1.0, 1.75), True)
    assert multi.shape == (1, 5, 40, 48)
    assert torch.allclose(multi, single, atol=1e-5)
    assert torch.allclose(multi.sum(dim=1), torch.ones(1, 40, 48))
