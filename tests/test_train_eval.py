"""Evaluation during training (config section `evaluation`): what it measures and logs,
that training is the same with it, bit for bit, resumed or not, and that one process, a
sharded teacher and two processes measure the same."""

import json
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from train_helpers import read_metrics, run_cli, tiny_config

from dinospec.analysis.cli import read_metrics as read_merged
from dinospec.analysis.plots import metrics_figure
from dinospec.config import ConfigError
from dinospec.distributed import DistInfo
from dinospec.models import build_backbone
from dinospec.models.checkpoints import load_backbone
from dinospec.train.evaluation import untouched
from dinospec.train.loop import Trainer, train
from eval.during_training import KnnEvaluator
from launch.local import free_port, join_as_rank

EVAL = [
    "evaluation.dataset=synthetic",
    "evaluation.image_size=32",
    "evaluation.train_per_class=6",
    "evaluation.val_per_class=3",
    "evaluation.k=5",
    "evaluation.batch_size=7",
    "evaluation.num_workers=0",
    "evaluation.seg.dataset=synthetic",
    "evaluation.seg.crop_size=32",
    "evaluation.seg.max_train_images=15",
    "evaluation.seg.max_val_images=7",
    "evaluation.seg.iterations=10",
]
EVAL_KEYS = {"eval_knn_top1", "eval_knn_top5", "eval_seg_miou", "eval_seg_pixel_accuracy"}


def _teacher(run_dir):
    return load_backbone(run_dir / "teacher_backbone.safetensors").state_dict()


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _training_records(run_dir):
    return [
        {k: v for k, v in r.items() if not k.endswith("_s") and k != "peak_memory_mb"}
        for r in read_metrics(run_dir)
        if "loss" in r
    ]


def test_evaluation_changes_nothing_in_training_and_resumes_exactly(tmp_path):
    """Eval off, eval on, and eval on stopped at 3 and resumed: the same losses, schedules
    and monitor at every iteration and the same teacher, bit for bit."""
    off = train(tiny_config(tmp_path / "off", "train.max_iterations=6"))
    on = train(tiny_config(tmp_path / "on", "train.max_iterations=6", "evaluation.every=2", *EVAL))
    resumed = tmp_path / "resumed"
    for stop in (3, 6):
        overrides = [f"train.max_iterations={stop}", "train.checkpoint_every=3"]
        train(tiny_config(resumed, *overrides, "evaluation.every=2", *EVAL))
    assert _training_records(on) == _training_records(off) == _training_records(resumed)
    assert _same_weights(_teacher(on), _teacher(off))
    assert _same_weights(_teacher(resumed), _teacher(off))
    evaluated = [r for r in read_metrics(on) if "eval_knn_top1" in r]
    assert [r["iteration"] for r in evaluated] == [0, 2, 4, 6]
    assert all(r.keys() >= EVAL_KEYS and 0 <= r["eval_seg_miou"] <= 1 for r in evaluated)
    # the resumed run evaluated at 0, 2, 3 (its first stop) and 4, 6 after resuming at 3;
    # each iteration once, with the values of the straight run where both evaluated
    again = {r["iteration"]: r for r in read_metrics(resumed) if "eval_knn_top1" in r}
    assert sorted(again) == [0, 2, 3, 4, 6]
    for r in evaluated:
        assert again[r["iteration"]]["eval_knn_top1"] == r["eval_knn_top1"]


def test_evaluation_records_merge_with_training_records_and_are_plotted(tmp_path):
    run_dir = train(
        tiny_config(tmp_path / "run", "train.max_iterations=2", "evaluation.every=1", *EVAL[:7])
    )
    merged = read_merged(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in merged] == [0, 1, 2]
    assert "loss" not in merged[0] and "eval_knn_top1" in merged[0]
    assert {"loss", "eval_knn_top1", "eval_time_s"} <= merged[2].keys()
    figure = metrics_figure({"run": merged})
    titles = [ax.get_title() for ax in figure.axes]
    knn_panel = figure.axes[titles.index("k-NN top-1 (teacher [CLS], evaluation set)")]
    assert list(knn_panel.lines[0].get_xdata()) == [0, 1, 2]


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws():
    return torch.rand(2), np.random.rand(), random.random()


def test_untouched_restores_random_streams_and_module_modes():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
    model[1].eval()
    _seed_all(3)
    expected = _draws()
    _seed_all(3)
    with untouched(model, torch.device("cpu")):
        model.eval()
        _draws(), _draws()
        assert not torch.is_grad_enabled()
    after = _draws()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert model.training and model[0].training and not model[1].training


def _write_class_folders(root, per_class):
    """Two classes of noisy images, dark red and light blue, in ImageNet's layout."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for name, colour in (("n001", (120, 10, 10)), ("n002", (30, 60, 230))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 8, (40, 40, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_knn_on_an_imagenet_layout_folder(tmp_path):
    """Images of two colours: a random backbone's [CLS] tells them apart (without
    LayerScale, whose 1e-5 would give every image nearly the same [CLS]), so k-NN is
    perfect; the preview shows images spread over the query set (both classes)."""
    _write_class_folders(tmp_path / "data", {"train": 5, "val": 3})
    config = tiny_config(
        tmp_path / "run",
        "evaluation.dataset=imagenet",
        f"evaluation.path={tmp_path / 'data'}",
        "evaluation.image_size=32",
        "evaluation.resize_size=36",
        "evaluation.k=3",
        "evaluation.num_workers=0",
        "evaluation.pca_images=2",
        "model.init_values=null",
    )
    evaluator = KnnEvaluator(config, DistInfo(0, 1, 0, torch.device("cpu")))
    torch.manual_seed(0)
    output = evaluator(build_backbone(config.model))
    assert output.metrics == {"eval_knn_top1": 1.0}
    assert output.preview.shape == (2, 3, 32, 32)
    assert output.preview[0, 0].mean() > output.preview[0, 2].mean()  # red first
    assert output.preview[1, 2].mean() > output.preview[1, 0].mean()  # then blue


def test_missing_evaluation_data_stops_before_training(tmp_path):
    config = tiny_config(
        tmp_path / "run", "evaluation.dataset=imagenet", f"evaluation.path={tmp_path / 'nope'}"
    )
    with pytest.raises(ConfigError, match=r"evaluation\.path=.*nope.*train is not a directory"):
        Trainer(config)
    done = run_cli(
        tmp_path / "cli", "evaluation.dataset=imagenet", f"evaluation.path={tmp_path / 'nope'}"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "evaluation.path=" in done.stderr and not (tmp_path / "cli" / "checkpoints").exists()


@pytest.mark.slow
def test_a_sharded_teacher_measures_what_the_plain_one_does(tmp_path):
    """train.fsdp=true in one process: the teacher is an FSDP2 module whose root unit is
    gathered only around forward(); evaluation reads it through get_intermediate_layers."""
    scores = {}
    for fsdp in ("false", "true"):
        run_dir = tmp_path / fsdp
        done = run_cli(run_dir, "train.max_iterations=2", f"train.fsdp={fsdp}", *EVAL[:7])
        assert done.returncode == 0, done.stderr
        scores[fsdp] = [r["eval_knn_top1"] for r in read_metrics(run_dir) if "eval_knn_top1" in r]
    assert len(scores["true"]) == 2 and scores["true"] == scores["false"]


TWO_RANK_RUN = ["train.max_iterations=1", "model.init_values=null", *EVAL]
"""Without LayerScale, whose 1e-5 gives every image nearly the same [CLS] at the start:
neighbours would then be ranked by rounding, which differs between one bank and two."""


def _two_rank_worker(rank, world_size, port, output_dir):
    join_as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    train(tiny_config(output_dir, "train.batch_size_per_gpu=2", *TWO_RANK_RUN))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    """Before the first step both runs hold the same teacher. Two processes take shards
    of unequal length (the probe's 15 training scenes in batches of 7: 2 batches on rank
    0, 1 on rank 1), so rank 1 repeats a batch to keep the sharded teacher's forward
    passes in step; the scores are the one process's."""
    mp.spawn(_two_rank_worker, args=(2, free_port(), tmp_path / "two"), nprocs=2)
    one = train(tiny_config(tmp_path / "one", "train.batch_size_per_gpu=4", *TWO_RANK_RUN))
    first = [
        next(r for r in read_metrics(run) if r["iteration"] == 0) for run in (tmp_path / "two", one)
    ]
    for key in EVAL_KEYS:
        assert first[0][key] == pytest.approx(first[1][key], abs=1e-6), key
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
