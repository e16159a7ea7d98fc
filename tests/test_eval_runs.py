"""End-to-end evaluation jobs on a few real images with a tiny random backbone.

The numbers are meaningless (random weights, a handful of iterations); what is checked is
that a job runs from a YAML config to its results file and figures, that the reported
scores follow from the saved confusion matrix, and that bad configs fail early and say
where the bad value came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from helpers import tiny_vit
from PIL import Image

from dinospec.config import ConfigError
from dinospec.data.datasets import ImageNetFolder
from dinospec.models.checkpoints import save_backbone
from eval.cli import main as eval_main
from eval.config import load_eval_config
from eval.metrics import scores_from_confusion
from eval.run_cls import evaluate_classification, limit_per_class
from eval.run_seg import evaluate_segmentation

CAMVID = SHARED / "data" / "camvid"
IMAGENETTE = SHARED / "data" / "imagenette"
CLS_CLASSES = ("n01440764", "n02102040", "n02979186")
SEG_KEYS = {"task", "metrics", "per_class", "confusion_matrix", "training", "config"}
RECORD_KEYS = {"checkpoint", "date"}


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_backbone(tiny_vit(depth=4).eval(), path)
    return path


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def seg_overrides(backbone: Path, out: Path) -> list[str]:
    return [
        f"backbone.path={backbone}",
        "dataset.kind=camvid",
        f"dataset.root={CAMVID}",
        "dataset.max_train_images=8",
        "dataset.max_val_images=4",
        "dataset.num_workers=0",
        "seg.iterations=6",
        "seg.batch_size=4",
        "seg.warmup_iterations=2",
        "seg.crop_size=32",
        "seg.stride=24",
        "seg.base_size=48",
        "seg.num_visualized=2",
        f"output_dir={out}",
    ]


def check_seg_outputs(out: Path, results: dict) -> None:
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= SEG_KEYS | RECORD_KEYS
    assert on_disk == results
    assert (out / "per_class_iou.png").stat().st_size > 0
    assert (out / "predictions.png").stat().st_size > 0
    assert [c["name"] for c in on_disk["per_class"]][:2] == ["Sky", "Building"]
    assert len(on_disk["checkpoint"]["sha256"]) == 64
    miou = on_disk["metrics"]["miou"]
    assert 0.0 <= miou <= 1.0
    recomputed = scores_from_confusion(torch.tensor(on_disk["confusion_matrix"]))
    assert recomputed.miou == pytest.approx(miou)
    assert int(torch.tensor(on_disk["confusion_matrix"]).sum()) > 0


def test_eval_seg_on_cached_features(backbone_file: Path, tmp_path: Path) -> None:
    overrides = [*seg_overrides(backbone_file, tmp_path), "seg.cache_features=true"]
    results = evaluate_segmentation(load_eval_config(None, overrides))
    check_seg_outputs(tmp_path, results)
    assert results["training"]["mode"] == "cached_features"


def test_eval_seg_augmented_multiscale_from_cli(backbone_file: Path, tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "seg.yaml", "seg:\n  n_layers: 3\n")
    overrides = [*seg_overrides(backbone_file, tmp_path), "seg.multiscale=true", "seg.flip=true"]
    with pytest.raises(ConfigError, match=r"seg\.yaml: seg\.n_layers=3"):
        load_eval_config(config, overrides)
    config.write_text("seg:\n  n_layers: 4\n")
    assert eval_main(["eval-seg", str(config), *overrides]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    check_seg_outputs(tmp_path, results)
    assert results["training"]["mode"] == "augmented"
    assert results["config"]["seg"]["n_layers"] == 4


@pytest.fixture(scope="module")
def small_imagenette(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of Imagenette, linked (not copied) into a train/val tree."""
    root = tmp_path_factory.mktemp("imagenette")
    for split in ("train", "val"):
        for wnid in CLS_CLASSES:
            (root / split).mkdir(exist_ok=True)
            (root / split / wnid).symlink_to(IMAGENETTE / split / wnid)
    return root


def test_eval_cls_knn_and_linear(
    backbone_file: Path, small_imagenette: Path, tmp_path: Path
) -> None:
    overrides = [
        f"backbone.path={backbone_file}",
        "dataset.kind=class_folders",
        f"dataset.root={small_imagenette}",
        "dataset.train_per_class=6",
        "dataset.val_per_class=3",
        "dataset.num_workers=0",
        "cls.image_size=32",
        "cls.resize_size=36",
        "cls.n_last_blocks=4",
        "cls.avgpool=true",
        "cls.ks=[2,5]",
        "cls.lrs=[0.01,0.1]",
        "cls.epochs=3",
        "cls.holdout_fraction=0.2",
        f"output_dir={tmp_path}",
    ]
    results = evaluate_classification(load_eval_config(None, overrides))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    assert set(on_disk["knn"]) == {"2", "5"}
    for scores in on_disk["knn"].values():
        assert 0.0 <= scores["top1"] <= scores["top5"] <= 1.0
    assert on_disk["linear"]["best_lr"] in (0.01, 0.1)
    assert set(on_disk["linear"]) >= {"top1", "top5", "holdout_top1"}
    assert on_disk["feature_dim"] == 5 * 32
    assert on_disk["num_train_images"] == 18
    assert sum(map(sum, on_disk["confusion_matrix"]["counts"])) == 9
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0


def test_config_errors_name_source_and_key(tmp_path: Path) -> None:
    base = write_yaml(tmp_path / "base.yaml", "dataset:\n  kind: camvid\n  root: somewhere\n")
    child = write_yaml(tmp_path / "child.yaml", "extends: base.yaml\ncls:\n  ks: []\n")
    with pytest.raises(ConfigError) as err:
        load_eval_config(child, ["seg.stride=600", "dataset.kind=coco"])
    message = str(err.value)
    assert f"{child}: cls.ks=[]" in message
    assert "command line: seg.stride=600" in message
    assert "command line: dataset.kind='coco'" in message
    assert "backbone.path=None: is required" in message
    with pytest.raises(ConfigError, match=r"command line: seg\.itrations"):
        load_eval_config(base, ["seg.itrations=5"])


def test_eval_cli_reports_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_yaml(tmp_path / "c.yaml", f"backbone:\n  path: {tmp_path / 'none.pth'}\n")
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["eval-seg", str(config), f"dataset.root={CAMVID}"])
    assert exit_info.value.code == 2
    assert "none.pth" in capsys.readouterr().err


def test_per_class_limit_reports_unreadable_images_by_their_own_path(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / name / f"{i}.jpg")
    corrupt = tmp_path / "b" / "2.jpg"
    corrupt.write_bytes(b"not a jpeg")
    dataset = limit_per_class(ImageNetFolder(tmp_path, max_bad_fraction=0.5), 2)
    assert [path.name for path, _ in dataset.samples] == ["0.jpg", "2.jpg", "0.jpg", "2.jpg"]
    dataset[3]
    assert dataset.bad.bad_paths() == [corrupt]
