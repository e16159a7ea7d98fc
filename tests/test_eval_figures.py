"""What the evaluation figures show: examples spread over the split, a colour legend that
names the classes, and titles and units on every panel. Figures are inspected as
matplotlib objects, not as pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers import tiny_vit
from PIL import Image

from eval.config import EvalConfig
from eval.depth_metrics import DepthScores
from eval.metrics import IGNORE_INDEX
from eval.run_depth import predictions_figure as depth_figure
from eval.run_seg import IGNORED_NAME, class_iou_figure, evaluate, predictions_figure
from eval.runner import Console
from eval.seg_data import folder_pairs
from eval.seg_head import LinearSegmenter
from eval.sharding import Ranks
from eval.subsets import image_name, spread_indices

NAMES = ["sky", "road", "car"]


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def test_spread_indices_cover_the_split() -> None:
    assert spread_indices(100, 4) == [0, 25, 50, 75]
    assert spread_indices(10, 3) == [0, 3, 6]
    assert spread_indices(3, 5) == [0, 1, 2]
    assert spread_indices(4, None) == [0, 1, 2, 3]
    assert image_name(Path("/data/nyu/kitchen_0028b/rgb_00045.jpg")) == "kitchen_0028b/rgb_00045"


def test_segmentation_examples_are_spread_over_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(10):
        for folder, values in (
            ("images", rng.integers(0, 255, (16, 16, 3))),
            ("labels", rng.integers(0, 3, (16, 16))),
        ):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(values.astype(np.uint8)).save(tmp_path / folder / f"{i:02d}.png")
    (tmp_path / "classes.txt").write_text("\n".join(NAMES))
    val = folder_pairs(tmp_path / "images", tmp_path / "labels", tmp_path / "classes.txt")
    config = EvalConfig()
    config.seg.crop_size = config.seg.stride = config.seg.base_size = 16
    config.seg.num_visualized = 3
    segmenter = LinearSegmenter(tiny_vit(), len(NAMES))
    ranks = Ranks(0, 1, torch.device("cpu"))
    _, examples = evaluate(segmenter, val, config, Console("test", quiet=True), ranks)
    assert [index for index, _ in examples] == [0, 3, 6]


def test_segmentation_grid_has_a_legend_of_the_classes_shown() -> None:
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    label = torch.tensor([[0, 0, 2, 2]] * 3 + [[IGNORE_INDEX] * 4])
    examples = [("val/f007", (image, label, torch.zeros(4, 4, dtype=torch.long)))]
    fig = predictions_figure(examples, NAMES)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["sky", "car", IGNORED_NAME]
    assert titles(fig) == [f"val/f007: {t}" for t in ("image", "ground truth", "prediction")]
    assert "spread over the split" in fig.get_suptitle()


def test_iou_chart_names_its_axes() -> None:
    ax = class_iou_figure(NAMES, [0.5, float("nan"), 1.0]).axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("class", "IoU (%)")
    assert ax.get_title()


def test_depth_grid_has_a_colourbar_in_metres() -> None:
    target = torch.full((4, 6), 2.0)
    mask = torch.ones(4, 6, dtype=torch.bool)
    example = (
        torch.zeros(3, 4, 6, dtype=torch.uint8),
        target,
        target * 1.1,
        mask,
        DepthScores(0.2, 0.1, 1.0),
    )
    fig = depth_figure([("room/rgb_3", example), ("room/rgb_9", (*example[:4], None))])
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["depth (m)"]
    assert titles(fig)[:3] == [
        "room/rgb_3",
        "ground truth (grey: not scored)",
        "prediction (RMSE 0.200 m)",
    ]
    assert titles(fig)[5] == "prediction (no scored pixel)"
    assert "spread over the split" in fig.get_suptitle()
