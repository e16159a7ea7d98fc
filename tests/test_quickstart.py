"""The quickstart's learning signal, at two thirds of its budget: pretraining must make
the frozen backbone's patch tokens better for a linear segmentation probe than the same
backbone at initialization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinospec.config import load_config
from eval.config import SegSettings
from eval.quickstart import run_quickstart

REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "optim.epochs=20",
    "optim.warmup_epochs=2",
    "optim.freeze_last_layer_epochs=20",
    "train.checkpoint_every=1000",
]


@pytest.mark.slow
def test_pretraining_beats_initialization_on_the_segmentation_probe(tmp_path: Path) -> None:
    config = load_config(
        REPO / "configs" / "quickstart.yaml", [*SHORT, f"train.output_dir={tmp_path / 'run'}"]
    )
    probe = SegSettings(iterations=1500, batch_size=16, lr=0.01, warmup_iterations=150, n_layers=4)
    run_dir, scores = run_quickstart(config, probe, n_train=512, n_val=256)

    trained, initial = scores["trained"]["miou"], scores["random_init"]["miou"]
    assert trained > 1.5 * initial and trained - initial > 0.03, scores
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    assert records[-1]["iteration"] == 1000
    # One step's loss is noisy (4.6 to 7.2 in neighbouring log lines), so both ends are
    # window means: iterations 1-50 against the last 250.
    last = records[-5:]
    first_window = records[0]["loss_window_mean"]
    assert sum(r["loss_window_mean"] for r in last) / len(last) < 0.75 * first_window
    assert sum(r["teacher_entropy"] for r in last) / len(last) < 0.5  # no uniform collapse
    assert (run_dir / "probe_results.json").is_file()
    assert (run_dir / "training_curves.png").is_file()
    # The evaluation during training (configs/quickstart.yaml: every 250 iterations) draws
    # the k-NN curve of the teacher, from before the first step to the end, and it rises.
    curve = [r for r in map(json.loads, lines) if "eval_knn_top1" in r]
    assert [r["iteration"] for r in curve] == [0, 250, 500, 750, 1000]
    assert curve[-1]["eval_knn_top1"] > curve[0]["eval_knn_top1"], curve
    assert curve[0]["eval_knn_top1"] == pytest.approx(scores["random_init"]["knn20_top1"])
    assert curve[-1]["eval_knn_top1"] == pytest.approx(scores["trained"]["knn20_top1"])
