"""The linear depth probe: metrics against hand-computed values, the Eigen crop, the losses,
the head, both dataset layouts and their errors, and whole jobs on generated scenes whose
depth is a known function of the image (so a trained head must beat predicting the mean).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from helpers import tiny_vit
from PIL import Image

from dinospec.config import ConfigError
from dinospec.models.checkpoints import save_backbone
from eval.cli import main as eval_main
from eval.config import DepthSettings, load_eval_config
from eval.depth_data import depth_folders, nyu, read_depth
from eval.depth_head import LinearDepther, LinearDepthHead, probe_blocks
from eval.depth_loss import gradient_loss, sig_loss
from eval.depth_metrics import (
    DepthScores,
    eigen_crop_mask,
    image_scores,
    mean_scores,
    valid_mask,
)
from eval.depth_transforms import rotate
from eval.run_depth import evaluate_depth

# ----------------------------------------------------------------- generated scenes


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A brightness ramp down the image and depth = 1 m + 5 m x brightness at every pixel."""
    level, slope = rng.uniform(0.05, 0.65), rng.uniform(0.0, 0.3)
    brightness = level + slope * np.linspace(0, 1, height)[:, None] * np.ones((1, width))
    rgb = (brightness[..., None] * 255 * np.array([1.0, 0.9, 0.8])).astype(np.uint8)
    return rgb, 1 + 5 * brightness


def save_pair(image: Path, depth: Path, rgb: np.ndarray, metres: np.ndarray) -> None:
    for path in (image, depth):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(image)
    Image.fromarray((metres * 1000).round().astype(np.uint16)).save(depth)


def make_folders(root: Path, counts: dict[str, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for i in range(n):
            rgb, metres = scene(rng, *size)
            save_pair(
                root / split / "images" / f"{i:03d}.png",
                root / split / "depth" / f"{i:03d}.png",
                rgb,
                metres,
            )


def make_nyu(root: Path, counts: dict[str, int]) -> None:
    """NYU layout: scene folders, split files with a focal column and leading slashes."""
    rng = np.random.default_rng(1)
    for split, n in counts.items():
        lines = []
        for i in range(n):
            rgb, metres = scene(rng, 480, 640)
            rgb_name, depth_name = (
                f"room_{split}/rgb_{i:05d}.jpg",
                f"room_{split}/sync_depth_{i:05d}.png",
            )
            save_pair(root / rgb_name, root / depth_name, rgb, metres)
            lines.append(f"/{rgb_name} /{depth_name} 518.8579")
        (root / f"nyu_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_backbone(tiny_vit(depth=4).eval(), path)
    return path


# ----------------------------------------------------------------- metrics


def test_image_scores_match_hand_computed_values() -> None:
    target = torch.tensor([1.0, 2.0, 4.0])
    pred = torch.tensor([1.0, 1.0, 5.0])
    scores = image_scores(pred, target, torch.ones(3, dtype=torch.bool))
    # errors 0, 1, 1 m; relative 0, 1/2, 1/4; ratios 1, 2, 1.25 (1.25 is not below 1.25)
    assert scores.rmse == pytest.approx(math.sqrt(2 / 3))
    assert scores.abs_rel == pytest.approx(0.25)
    assert scores.delta1 == pytest.approx(1 / 3)


def test_scores_are_averaged_per_image_and_unscored_images_left_out() -> None:
    one = image_scores(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([True]))
    many = image_scores(torch.full((3,), 1.0), torch.full((3,), 1.0), torch.ones(3, dtype=bool))
    assert one == DepthScores(rmse=1.0, abs_rel=1.0, delta1=0.0)
    none = image_scores(torch.ones(2), torch.ones(2), torch.zeros(2, dtype=torch.bool))
    assert none is None
    # pooled over the 4 pixels RMSE would be 0.5; per image it is (1 + 0) / 2
    assert mean_scores([one, many, none]) == DepthScores(rmse=0.5, abs_rel=0.5, delta1=0.5)
    assert math.isnan(mean_scores([None]).rmse)


def test_valid_mask_is_strictly_inside_the_range() -> None:
    target = torch.tensor([0.0, 0.001, 0.5, 10.0, 12.0])
    assert valid_mask(target, 0.001, 10.0).tolist() == [False, False, True, False, False]


def test_eigen_crop_indices() -> None:
    mask = eigen_crop_mask(480, 640)
    assert int(mask.sum()) == (471 - 45) * (601 - 41)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])) == (45, 470, 41, 600)
    target = torch.full((480, 640), 3.0)
    assert torch.equal(valid_mask(target, 0.001, 10.0, eigen_crop=True), mask)
    with pytest.raises(ValueError, match="480 x 640"):
        eigen_crop_mask(32, 32)


# ----------------------------------------------------------------- losses


def test_sig_loss_is_scale_aware_and_ignores_missing_depth() -> None:
    target = torch.tensor([[[1.0, 2.0, 3.0, 0.0]]])
    assert float(sig_loss(target.clone(), target)) == pytest.approx(0.0, abs=1e-6)
    doubled = target * 2 + torch.tensor([0.0, 0.0, 0.0, 7.0])
    # log(2d + eps) - log(d + eps) is log 2 up to eps / d: no variance, mean log 2
    expected = math.sqrt(0.15) * math.log(2)
    assert float(sig_loss(doubled, target)) == pytest.approx(expected, rel=1e-3)
    assert float(sig_loss(doubled, target, warming_up=True)) == pytest.approx(expected, rel=1e-3)


def test_gradient_loss_compares_pixels_two_apart() -> None:
    target = torch.ones(1, 1, 3)
    assert float(gradient_loss(target * 3, target)) == pytest.approx(0.0, abs=1e-6)
    pred = torch.tensor([[[1.0, 1.0, 2 * 1.001 - 0.001]]])
    # log errors (0, 0, log 2): one pair two columns apart, 3 valid pixels; coarser
    # scales have no pair
    assert float(gradient_loss(pred, target)) == pytest.approx(math.log(2) / 3, rel=1e-5)
    target[0, 0, 2] = 0.0
    assert float(gradient_loss(pred, target)) == 0.0


# ----------------------------------------------------------------- head


def test_probe_blocks_follow_dinov2() -> None:
    assert probe_blocks(12, 1) == [11]
    assert probe_blocks(12, 4) == [2, 5, 8, 11]
    assert probe_blocks(24, 4) == [4, 11, 17, 23]
    assert probe_blocks(40, 4) == [9, 19, 29, 39]
    assert probe_blocks(6, 4) == [0, 2, 3, 5]


def test_head_equals_upsampling_features_first_and_stays_in_range() -> None:
    torch.manual_seed(0)
    head = LinearDepthHead(6, n_bins=5, min_depth=1.0, max_depth=3.0)
    features = torch.randn(2, 6, 3, 4)
    depth = head(features)
    # DINOv2's order: upsample the features by 4, then the 1x1 conv
    logits = head.conv(F.interpolate(features, size=(12, 16), mode="bilinear"))
    weights = torch.relu(logits) + 0.1
    expected = (weights / weights.sum(1, keepdim=True) * head.bins[:, None, None]).sum(1)
    assert torch.allclose(depth[:, 0], expected, atol=1e-6)
    assert depth.min() >= 1.0 and depth.max() <= 3.0
    torch.nn.init.zeros_(head.conv.weight)
    torch.nn.init.zeros_(head.conv.bias)
    assert torch.allclose(head(features), torch.full((2, 1, 12, 16), 2.0))


def test_depther_features_and_output_size() -> None:
    backbone = tiny_vit(depth=4, patch_size=8, embed_dim=16)
    depther = LinearDepther(backbone, n_layers=4, n_bins=8)
    features = depther.features(torch.randn(1, 3, 16, 24))
    assert features.shape == (1, 2 * 16 * 4, 2, 3)
    cls_channels = features[:, 16:32]
    assert torch.equal(cls_channels, cls_channels[..., :1, :1].expand_as(cls_channels))
    assert depther(torch.randn(2, 3, 20, 30)).shape == (2, 20, 30)
    assert [n for n, p in depther.named_parameters() if p.requires_grad] == [
        "head.conv.weight",
        "head.conv.bias",
    ]


def test_rotation_moves_depth_without_inventing_values() -> None:
    image = torch.rand(3, 20, 20) * 255
    depth = torch.randint(1, 4, (20, 20)).float()
    _, rotated = rotate(image, depth, 2.5)
    assert set(rotated.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


# ----------------------------------------------------------------- datasets


def test_nyu_layout_reads_the_split_file(tmp_path: Path) -> None:
    make_nyu(tmp_path, {"train": 2})
    split = tmp_path / "nyu_train.txt"
    split.write_text("# comment\n\n" + split.read_text() + "/room_x/rgb_9.jpg None 518.8\n")
    data = nyu(tmp_path, "nyu_train.txt")
    assert [p[0].name for p in data.pairs] == ["rgb_00000.jpg", "rgb_00001.jpg"]
    image, depth = data[0]
    assert image.shape == (3, 480, 640) and image.dtype == torch.uint8
    assert depth.dtype == torch.float32 and 1.0 < float(depth.mean()) < 6.0


def test_nyu_layout_errors_name_the_file(tmp_path: Path) -> None:
    make_nyu(tmp_path, {"train": 1})
    with pytest.raises(FileNotFoundError, match="split file not found"):
        nyu(tmp_path, "nyu_val.txt")
    (tmp_path / "bad.txt").write_text("a.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.txt line 1: expected"):
        nyu(tmp_path, "bad.txt")
    (tmp_path / "missing.txt").write_text("room_train/rgb_00000.jpg room_train/nope.png\n")
    with pytest.raises(
        FileNotFoundError, match=r"missing\.txt line 1: file not found: .*nope\.png"
    ):
        nyu(tmp_path, "missing.txt")
    small = tmp_path / "small"
    save_pair(small / "a.png", small / "a_depth.png", *scene(np.random.default_rng(0), 8, 8))
    (tmp_path / "small.txt").write_text("small/a.png small/a_depth.png\n")
    with pytest.raises(ValueError, match=r"a\.png is \(8, 8\) .*needs \(480, 640\)"):
        nyu(tmp_path, "small.txt")[0]


def test_depth_maps_must_be_16_bit_pngs_in_the_given_scale(tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    Image.fromarray(np.array([[0, 1500]], dtype=np.uint16)).save(path)
    assert read_depth(path, 1000.0).tolist() == [[0.0, 1.5]]
    assert read_depth(path, 256.0).tolist() == [[0.0, 1500 / 256]]
    Image.fromarray(np.array([[0, 150]], dtype=np.uint8)).save(path)
    with pytest.raises(
        ValueError, match=r"d\.png is a PNG of mode L; expected a single-channel 16"
    ):
        read_depth(path, 1000.0)
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "d.jpg")
    with pytest.raises(ValueError, match=r"d\.jpg is a JPEG"):
        read_depth(tmp_path / "d.jpg", 1000.0)


def test_folder_layout_errors_name_the_files(tmp_path: Path) -> None:
    make_folders(tmp_path, {"train": 2}, (8, 8))
    images, depths = tmp_path / "train" / "images", tmp_path / "train" / "depth"
    Image.fromarray(np.zeros((6, 8), dtype=np.uint16)).save(depths / "001.png")
    with pytest.raises(
        ValueError, match=r"001\.png is \(8, 8\) but its depth map .*001\.png is \(6, 8\)"
    ):
        depth_folders(images, depths)[1]
    (depths / "000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"have no depth map, first: .*000\.png"):
        depth_folders(images, depths)


# ----------------------------------------------------------------- configs and jobs


def folder_overrides(backbone: Path, root: Path, out: Path) -> list[str]:
    return [
        f"backbone.path={backbone}",
        "dataset.kind=depth_folders",
        f"dataset.train_images={root / 'train' / 'images'}",
        f"dataset.train_labels={root / 'train' / 'depth'}",
        f"dataset.val_images={root / 'val' / 'images'}",
        f"dataset.val_labels={root / 'val' / 'depth'}",
        "dataset.num_workers=0",
        "depth.iterations=40",
        "depth.batch_size=8",
        "depth.lr=5.0e-2",
        "depth.n_bins=16",
        "depth.warmup_iterations=10",
        "depth.crop_size=[32,32]",
        "depth.max_depth=8.0",
        "depth.num_visualized=2",
        f"output_dir={out}",
    ]


def test_nyu_config_holds_the_default_recipe() -> None:
    config = load_eval_config(REPO / "configs" / "eval" / "nyu_linear.yaml", ["backbone.path=x"])
    assert config.depth == DepthSettings()
    assert (config.dataset.kind, config.dataset.depth_scale) == ("nyu", 1000.0)


def test_depth_config_errors_name_the_keys() -> None:
    bad = ["backbone.path=x", "dataset.kind=depth_folders", "depth.crop_size=[1,2,3]"]
    bad += ["depth.min_depth=5", "depth.max_depth=2", "depth.n_layers=2"]
    with pytest.raises(ConfigError) as err:
        load_eval_config(None, bad)
    for key in ("dataset.train_images", "dataset.val_labels", "depth.crop_size", "depth.min_depth"):
        assert key in str(err.value)
    assert "depth.n_layers" in str(err.value)


def test_trained_head_beats_the_mean_on_generated_scenes(
    backbone_file: Path, tmp_path: Path
) -> None:
    make_folders(tmp_path, {"train": 16, "val": 6}, (32, 32))
    results = evaluate_depth(
        load_eval_config(None, folder_overrides(backbone_file, tmp_path, tmp_path / "out"))
    )
    train = depth_folders(tmp_path / "train" / "images", tmp_path / "train" / "depth")
    val = depth_folders(tmp_path / "val" / "images", tmp_path / "val" / "depth")
    mean = float(torch.stack([train[i][1] for i in range(len(train))]).mean())
    baseline = mean_scores(
        image_scores(torch.full_like(depth, mean), depth, depth > 0) for _, depth in val
    )
    assert results["metrics"]["rmse"] < 0.5 * baseline.rmse
    assert results["metrics"]["abs_rel"] < 0.5 * baseline.abs_rel
    assert results["metrics"]["delta1"] > baseline.delta1
    per_image = results["per_image"]
    assert len(per_image) == 6
    assert results["metrics"]["rmse"] == pytest.approx(np.mean([p["rmse"] for p in per_image]))
    assert results["protocol"]["scored_region"] == "whole image"
    assert (tmp_path / "out" / "depth_predictions.png").stat().st_size > 0
    assert (tmp_path / "out" / "linear_depth_head.pt").is_file()


def test_eval_depth_on_the_nyu_layout_from_the_cli(backbone_file: Path, tmp_path: Path) -> None:
    make_nyu(tmp_path, {"train": 2, "test": 2})
    config = tmp_path / "nyu.yaml"
    config.write_text(f"dataset:\n  kind: nyu\n  root: {tmp_path}\n  train_split: nyu_train.txt\n")
    overrides = [
        f"backbone.path={backbone_file}",
        "dataset.val_split=nyu_test.txt",
        "dataset.num_workers=0",
        "depth.iterations=2",
        "depth.batch_size=2",
        "depth.warmup_iterations=1",
        "depth.crop_size=[32,48]",
        "depth.n_layers=4",
        "depth.flip=false",
        f"output_dir={tmp_path / 'out'}",
    ]
    assert eval_main(["eval-depth", str(config), *overrides]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["metrics"]) == {"rmse", "abs_rel", "delta1"}
    assert results["protocol"]["scored_region"] == "Eigen crop"
    assert results["num_scored_images"] == 2 and results["config"]["depth"]["n_layers"] == 4
    assert len(results["checkpoint"]["sha256"]) == 64
    with pytest.raises(SystemExit):
        eval_main(["eval-depth", str(config), *overrides, "dataset.kind=camvid"])
