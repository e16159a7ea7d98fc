"""The evaluation jobs on two gloo processes give the results of one process.

The reference runs in this process and the two ranks are spawned with torchrun's
variables, all with one CPU thread, on shards of uneven size (7 train / 5 val
segmentation images, 15 / 9 classification images, 5 val depth scenes, a global batch of
3) so that the padding of the gathers and the uneven split of a global batch are
exercised. A feature does not depend on which other images share its batch (MKL's strict
reproducibility mode, set by conftest and inherited by the ranks), so k-NN, linear-probe,
cached-feature and depth results (whose head rank 0 trains alone) must be identical to
the bit. Augmented segmentation training sums a global batch over ranks in another order
than one process does, so its head may differ by float rounding only.

The backbone has random values in every parameter: a freshly initialised one (LayerScale
1e-5) gives nearly the same [CLS] for every image, with exactly tied similarities, and
which of several tied neighbours k-NN keeps is arbitrary (torch.topk's choice) both in
one process and when candidates are merged across ranks.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import SHARED
from helpers import randomize, tiny_vit
from test_eval_depth import make_folders

from dinospec.models.checkpoints import save_backbone
from eval.config import load_eval_config
from eval.global_bn import GlobalBatchNorm2d
from eval.run_cls import evaluate_classification
from eval.run_depth import evaluate_depth
from eval.run_seg import evaluate_segmentation
from eval.seg_augmented import GlobalBatches
from eval.sharding import Ranks
from launch.local import free_port, join_as_rank

CAMVID = SHARED / "data" / "camvid"
IMAGENETTE = SHARED / "data" / "imagenette"
CLS_CLASSES = ("n01440764", "n02102040", "n02979186")
PER_RUN_KEYS = {"config", "date", "num_processes"}
"""Keys that name the run (output directory, time, process count), not its result."""

JOBS = {"cls": evaluate_classification, "seg": evaluate_segmentation, "depth": evaluate_depth}
Job = tuple[str, str, list[str]]
"""(name, a key of JOBS, config overrides)"""


def _run_job(rank: int, job: Job, out: Path) -> None:
    """Run a job into out/<name>/; keep there what this rank returned and printed."""
    name, kind, overrides = job
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = JOBS[kind](load_eval_config(None, [*overrides, f"output_dir={out / name}"]))
    report = {"results": results, "stdout": printed.getvalue()}
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / f"report{rank}.json").write_text(json.dumps(report))


def _worker(rank: int, port: int, jobs: list[Job], out: Path) -> None:
    """One of two ranks, joined through torchrun's variables; the jobs run one after the
    other in the process group the first one joins."""
    join_as_rank(rank, 2, port)
    torch.set_num_threads(1)
    for job in jobs:
        _run_job(rank, job, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> list[Job]:
    torch.manual_seed(0)
    backbone = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_backbone(randomize(tiny_vit(depth=4)).eval(), backbone)
    imagenette = tmp_path_factory.mktemp("imagenette")
    for split in ("train", "val"):
        (imagenette / split).mkdir()
        for wnid in CLS_CLASSES:
            (imagenette / split / wnid).symlink_to(IMAGENETTE / split / wnid)
    common = [f"backbone.path={backbone}", "dataset.num_workers=0"]
    seg = [
        *common,
        "dataset.kind=camvid",
        f"dataset.root={CAMVID}",
        "dataset.max_train_images=7",
        "dataset.max_val_images=5",
        "seg.iterations=5",
        "seg.warmup_iterations=2",
        "seg.crop_size=32",
        "seg.stride=24",
        "seg.base_size=48",
        "seg.num_visualized=3",
    ]
    cls = [
        *common,
        "dataset.kind=class_folders",
        f"dataset.root={imagenette}",
        "dataset.train_per_class=5",
        "dataset.val_per_class=3",
        "cls.image_size=32",
        "cls.resize_size=36",
        "cls.n_last_blocks=4",
        "cls.avgpool=true",
        "cls.feature_batch_size=4",
        "cls.ks=[2,5]",
        "cls.lrs=[0.01,0.1]",
        "cls.epochs=3",
        "cls.holdout_fraction=0.2",
    ]
    scenes = tmp_path_factory.mktemp("scenes")
    make_folders(scenes, {"train": 4, "val": 5}, (16, 24))
    depth = [
        *common,
        "dataset.kind=depth_folders",
        *(
            f"dataset.{split}_{kind}={scenes / split / folder}"
            for split in ("train", "val")
            for kind, folder in (("images", "images"), ("labels", "depth"))
        ),
        "depth.iterations=3",
        "depth.batch_size=2",
        "depth.warmup_iterations=1",
        "depth.crop_size=[16,16]",
        "depth.num_visualized=3",
    ]
    return [
        ("cls", "cls", cls),
        ("depth", "depth", depth),
        ("cached", "seg", [*seg, "seg.cache_features=true", "seg.batch_size=4"]),
        ("augmented", "seg", [*seg, "seg.batch_size=3", "seg.flip=true"]),
    ]


def _one_process(jobs: list[Job], out: Path) -> list[dict[str, Any]]:
    """The reference, run here with one thread like each of the two ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job in jobs:
            _run_job(0, job, out)
    finally:
        torch.set_num_threads(threads)
    return [_reports(out, jobs, rank=0)]


def _two_processes(jobs: list[Job], out: Path) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(free_port(), jobs, out), nprocs=2)
    return [_reports(out, jobs, rank) for rank in (0, 1)]


def _reports(out: Path, jobs: list[Job], rank: int) -> dict[str, Any]:
    """{job name: report} of one rank."""
    return {
        name: json.loads((out / name / f"report{rank}.json").read_text()) for name, _, _ in jobs
    }


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ws1/ and ws2/: one output directory per job, and each rank's report."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def runs(jobs: list[Job], runs_dir: Path) -> dict[int, list[dict]]:
    """{world size: [report of each rank]}"""
    return {1: _one_process(jobs, runs_dir / "ws1"), 2: _two_processes(jobs, runs_dir / "ws2")}


def _heads(runs_dir: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(runs_dir / f"ws{w}" / name / "linear_head.pt") for w in (1, 2)]


def _result(report: dict, name: str) -> dict[str, Any]:
    return {k: v for k, v in report[name]["results"].items() if k not in PER_RUN_KEYS}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cls", "cached", "augmented", "depth"])
def test_ranks_agree_and_only_rank_0_speaks(runs: dict, name: str) -> None:
    rank0, rank1 = runs[2]
    assert rank0[name]["results"] == rank1[name]["results"]
    assert rank0[name]["results"]["num_processes"] == 2
    assert rank0[name]["stdout"] and rank1[name]["stdout"] == ""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cls", "cached", "depth"])
def test_two_processes_give_exactly_the_results_of_one(runs: dict, name: str) -> None:
    one, two = _result(runs[1][0], name), _result(runs[2][0], name)
    assert one == two
    if name == "cls":
        assert set(one) >= {"knn", "linear", "confusion_matrix"}
        assert one["num_train_images"] == 15 and one["num_val_images"] == 9
    elif name == "depth":
        assert one["num_scored_images"] == 5 and len(one["per_image"]) == 5
    else:
        assert sum(map(sum, one["confusion_matrix"])) > 0


@pytest.mark.slow
@pytest.mark.usefixtures("runs")
def test_cached_head_is_the_same_and_figures_are_written(runs_dir: Path) -> None:
    one, two = _heads(runs_dir, "cached")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    for figure in ("results.json", "per_class_iou.png", "predictions.png"):
        assert (runs_dir / "ws2" / "cached" / figure).stat().st_size > 0


@pytest.mark.slow
def test_augmented_training_splits_the_global_batch(runs: dict, runs_dir: Path) -> None:
    """Same crops, same global batches (3 images: 2 on rank 0, 1 on rank 1), the loss and
    BatchNorm over the global batch: only the order of float sums differs, by about 1e-8
    after a few steps. A pixel whose two best classes are that close may flip, so the
    confusion matrices agree up to a few pixels, and mIoU to far better than 1e-4."""
    one_head, two_head = _heads(runs_dir, "augmented")
    for key, value in one_head.items():
        torch.testing.assert_close(two_head[key], value, rtol=1e-5, atol=1e-6, msg=key)
    one, two = _result(runs[1][0], "augmented"), _result(runs[2][0], "augmented")
    assert two["training"]["final_loss"] == pytest.approx(one["training"]["final_loss"], rel=1e-5)
    matrices = torch.tensor(one["confusion_matrix"]), torch.tensor(two["confusion_matrix"])
    assert matrices[0].sum() == matrices[1].sum()
    assert (matrices[0] - matrices[1]).abs().sum() <= 1e-4 * matrices[0].sum()
    assert two["metrics"]["miou"] == pytest.approx(one["metrics"]["miou"], abs=1e-4)


def test_global_batches_do_not_depend_on_the_world_size() -> None:
    """Each global batch holds the same keys however many ranks share it, uneven splits
    included, and every rank gets a part of every batch."""
    size, batch = 7, 5

    def batches(rank: int, world: int) -> list[list[tuple[int, int]]]:
        ranks = Ranks(rank, world, torch.device("cpu"))
        return list(itertools.islice(GlobalBatches(size, batch, ranks, seed=3), 6))

    single = batches(0, 1)
    assert all(len(b) == batch for b in single)
    for world in (2, 3, 5):
        shares = [batches(rank, world) for rank in range(world)]
        for step, whole in enumerate(single):
            parts = [share[step] for share in shares]
            assert all(parts)
            assert sorted(key for part in parts for key in part) == sorted(whole)


def test_global_batch_norm_is_batch_norm_in_one_process() -> None:
    features = torch.randn(6, 4, 3, 5) * 3 + 1
    plain = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    synced = GlobalBatchNorm2d.replacing(plain)
    for _ in range(2):
        torch.testing.assert_close(synced(features), plain(features))
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(synced.state_dict()[name], value, msg=name)
    synced(features).sum().backward()
    assert synced.weight.grad is not None and synced.bias.grad is not None
    with pytest.raises(RuntimeError, match="without gradient"):
        synced(features.requires_grad_())
