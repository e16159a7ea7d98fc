"""`dinospec sweep`: the sweep file expands into cells, every problem is refused before
anything runs (naming its entry), the shipped sweep files validate and plan, the SLURM path
submits one array and a report job after it, a second sweep into a directory is refused,
and a tiny sweep on synthetic data runs, survives an interruption and a failed cell,
resumes without redoing finished work and writes its table and plot."""

from __future__ import annotations

import csv
import json
import math
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SHARED
from train_helpers import tiny_config

from dinospec.config import config_to_yaml
from launch.sweep import slurm
from launch.sweep.cell import CellJob
from launch.sweep.cli import main
from launch.sweep.record import read_record
from launch.sweep.report import stats
from launch.sweep.spec import read_sweep
from launch.sweep.stages import MetricError, cell_is_done, metric_value

IMAGENETTE = SHARED / "data" / "imagenette"
CLASSES = ("n01440764", "n02102040", "n02979186")
VANILLA = [
    "model.specialize.norm1_blocks=none",
    "model.specialize.norm2_blocks=none",
    "model.specialize.qkv_blocks=none",
]
HOLD = """
import sys, time
from pathlib import Path
from dinospec.run.lock import lock_run_dir

lock = lock_run_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def small_imagenette(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of Imagenette, linked (not copied) into a train/val tree."""
    root = tmp_path_factory.mktemp("imagenette")
    for split in ("train", "val"):
        (root / split).mkdir()
        for wnid in CLASSES:
            (root / split / wnid).symlink_to(IMAGENETTE / split / wnid)
    return root


def sweep_dict(tmp_path: Path, images: Path) -> dict:
    """A tiny sweep: 2 variants x 2 seeds of 4 iterations, k-NN on 3 Imagenette classes."""
    train = tmp_path / "train.yaml"
    train.write_text(config_to_yaml(tiny_config(tmp_path / "unused")))
    return {
        "name": "tiny",
        "train_config": str(train),
        "output_dir": str(tmp_path / "sweep"),
        "overrides": ["optim.epochs=2", "train.epoch_length=2", "train.checkpoint_every=2"],
        "variants": {"vanilla": VANILLA, "paper": []},
        "seeds": [0, 1],
        "random_init": False,
        "evaluations": {
            "knn": {
                "kind": "cls",
                "config": str(REPO / "configs" / "eval" / "imagenette_knn_linear.yaml"),
                "overrides": [
                    f"dataset.root={images}",
                    "dataset.train_per_class=6",
                    "dataset.val_per_class=3",
                    "dataset.num_workers=0",
                    "cls.image_size=32",
                    "cls.resize_size=36",
                    "cls.ks=[5]",
                    "cls.linear=false",
                ],
                "metrics": {"top1": "knn.5.top1", "top5": "knn.5.top5"},
            }
        },
        "report": {"plot": "knn.top1"},
    }


def write_sweep(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_cells_are_variants_by_grid_points_by_seeds(tmp_path):
    spec = sweep_dict(tmp_path, tmp_path)
    spec["grid"] = {"optim.base_lr": [0.001, 0.002], "model.specialize.qkv_blocks": [[0, 1]]}
    spec["random_init"] = True
    sweep = read_sweep(write_sweep(tmp_path, spec))
    cells = sweep.cells()
    assert len(cells) == 2 * 2 * 1 * 2 * 2
    assert [c.key for c in cells[:4]] == [
        "vanilla_optim.base_lr-0.001_model.specialize.qkv_blocks-0+1/init_seed0",
        "vanilla_optim.base_lr-0.001_model.specialize.qkv_blocks-0+1/seed0",
        "vanilla_optim.base_lr-0.001_model.specialize.qkv_blocks-0+1/init_seed1",
        "vanilla_optim.base_lr-0.001_model.specialize.qkv_blocks-0+1/seed1",
    ]
    cell = sweep.cell("paper_optim.base_lr-0.002_model.specialize.qkv_blocks-0+1/seed1")
    assert cell.directory == tmp_path / "sweep" / cell.key
    assert cell.label == "paper_optim.base_lr-0.002_model.specialize.qkv_blocks-0+1"
    assert sweep.train_overrides(cell) == [
        *spec["overrides"],
        "optim.base_lr=0.002",
        "model.specialize.qkv_blocks=[0,1]",
        "train.seed=1",
        f"train.output_dir={cell.run_dir}",
    ]
    assert cells[0].random_init and cells[0].label.endswith("(init)")
    assert sweep.columns() == ["knn.top1", "knn.top5"]


def _break(spec: dict, change: str) -> None:
    """Apply one bad edit to a valid sweep dict."""
    if change == "unknown override key":
        spec["variants"]["paper"] = ["model.specialize.qkv_blockz=1"]
    elif change == "empty grid axis":
        spec["grid"] = {"optim.base_lr": []}
    elif change == "no seeds":
        spec["seeds"] = []
    elif change == "no variants":
        spec["variants"] = {}
    elif change == "unknown eval kind":
        spec["evaluations"]["knn"]["kind"] = "normals"
    elif change == "unknown sweep key":
        spec["variant"] = spec.pop("variants")
    elif change == "seed in a variant":
        spec["variants"]["paper"] = ["train.seed=3"]
    elif change == "bad eval override":
        spec["evaluations"]["knn"]["overrides"].append("cls.kss=[5]")
    elif change == "unknown slurm option":
        spec["slurm"] = {"gpus": 8}
    elif change == "bad value for a cell":
        spec["grid"] = {"optim.warmup_epochs": [5]}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("unknown override key", ["variants.paper", "model.specialize.qkv_blockz"]),
        ("empty grid axis", ["grid.optim.base_lr", "non-empty list"]),
        ("no seeds", ["seeds", "non-empty"]),
        ("no variants", ["variants", "empty"]),
        ("unknown eval kind", ["evaluations.knn.kind", "'normals'", "cls", "seg", "depth"]),
        ("unknown sweep key", ["variant:", "unknown key"]),
        ("seed in a variant", ["variants.paper", "train.seed is set by seeds"]),
        ("bad eval override", ["evaluations.knn", "cls.kss"]),
        ("unknown slurm option", ["slurm.gpus", "unknown option"]),
        ("bad value for a cell", ["grid.optim.warmup_epochs", "exceeds optim.epochs"]),
    ],
)
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, capsys, change, expected):
    spec = sweep_dict(tmp_path, tmp_path)
    _break(spec, change)
    path = write_sweep(tmp_path, spec)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dinospec sweep: error: {path}: ")
    assert all(word in err for word in expected), err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("name", "options"),
    [("specialization_cpu.yaml", []), ("specialization_vits14_in1k.yaml", ["--slurm"])],
)
def test_shipped_sweep_files_validate_and_plan_one_line_per_cell(
    monkeypatch, capsys, name, options
):
    """Every cell's training config and every evaluation config load; the dry run lists
    4 variants x 3 seeds, trained and at initialization, and creates nothing."""
    monkeypatch.chdir(REPO)
    path = Path("configs/sweeps") / name
    sweep = read_sweep(path)
    assert not sweep.output_dir.exists()
    assert main([str(path), "--dry-run", *options]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [line for line in lines if line.startswith("cell ")]
    assert len(cells) == 24 and all("[to run]" in line for line in cells)
    assert sum("initialize:" in line for line in cells) == 12
    assert any(line.startswith("cell all/seed2 ") and "final_norm=true" in line for line in cells)
    if options:
        assert "4 node(s) x 8 task(s), 8 GPU(s) per node, 2880 min" in lines[0]
        assert lines[-1].startswith("report job") or "report job" in "\n".join(lines)
    assert not sweep.output_dir.exists()


class FakeExecutor:
    """Stands in for submitit's AutoExecutor: records what would have been submitted."""

    def __init__(self, first_id: str, parameters: dict) -> None:
        self.first_id = first_id
        self.parameters = parameters
        self.submitted: list = []
        self.batched = False

    def batch(self):
        self.batched = True
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, function):
        self.submitted.append(function)
        suffix = f"_{len(self.submitted) - 1}" if self.batched else ""
        return type("Job", (), {"job_id": f"{self.first_id}{suffix}"})()


def test_slurm_submits_the_cells_as_one_array_and_the_report_after_it(
    tmp_path, monkeypatch, capsys
):
    executors: list[FakeExecutor] = []

    def fake_executor(folder, parameters, timeouts):
        executors.append(FakeExecutor(str(500 + len(executors)), parameters))
        return executors[-1]

    monkeypatch.setattr(slurm, "make_executor", fake_executor)
    monkeypatch.setattr(slurm, "active_jobs", lambda ids: [])
    spec = sweep_dict(tmp_path, SHARED / "data" / "imagenette")
    spec["slurm"] = {"nodes": 2, "gpus_per_node": 4, "timeout": 600, "partition": "gpu"}
    path = write_sweep(tmp_path, spec)
    assert main([str(path), "--slurm", "--nodes", "3", "--qos", "high"]) == 0
    array, report = executors
    assert [job.key for job in array.submitted] == [
        "vanilla/seed0",
        "vanilla/seed1",
        "paper/seed0",
        "paper/seed1",
    ]
    assert all(isinstance(pickle.loads(pickle.dumps(j)), CellJob) for j in array.submitted)
    params = array.parameters
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (3, 4, 4)
    assert (params["timeout_min"], params["slurm_partition"], params["slurm_qos"]) == (
        600,
        "gpu",
        "high",
    )
    dependency = report.parameters["slurm_additional_parameters"]["dependency"]
    assert dependency == "afterany:500" and report.parameters["nodes"] == 1
    record = json.loads((tmp_path / "sweep" / "job.json").read_text())["submissions"][-1]
    assert record["job_id"] == "501" and record["cells"]["paper/seed1"] == "500_3"
    assert "submitted the job array 500 (4 cell(s)" in capsys.readouterr().out
    monkeypatch.setattr(slurm, "active_jobs", lambda ids: list(ids)[:1])
    assert main([str(path), "--slurm"]) == 2
    assert "still queued or running" in capsys.readouterr().err


def test_a_second_sweep_into_a_directory_in_use_is_refused(tmp_path, capsys, small_imagenette):
    spec = sweep_dict(tmp_path, small_imagenette)
    path = write_sweep(tmp_path, spec)
    output_dir = tmp_path / "sweep"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(output_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert str(output_dir) in err and f"pid {holder.pid}" in err
        assert not (output_dir / "vanilla").exists()
    finally:
        holder.kill()
        holder.wait()
    other = write_sweep(tmp_path, {**spec, "name": "other"}, "other.yaml")
    (output_dir / "sweep.json").write_text(json.dumps({"name": "tiny"}))
    assert main([str(other)]) == 2
    assert "holds the sweep 'tiny', not 'other'" in capsys.readouterr().err


def test_metric_paths_and_statistics():
    results = {"knn": {"20": {"top1": 0.5}}, "per_class": [{"iou": None}]}
    assert metric_value(results, "knn.20.top1", "m") == 0.5
    assert math.isnan(metric_value(results, "per_class.0.iou", "m"))
    with pytest.raises(MetricError, match=r"no 'knn.10.top1' \(at knn: \['20'\]\)"):
        metric_value(results, "knn.10.top1", "m")
    s = stats([1.0, 2.0, 4.0, math.nan])
    assert (s.mean, s.n) == (7 / 3, 3) and s.std == pytest.approx(1.527525, rel=1e-6)
    assert math.isnan(stats([1.0]).std)


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _attempts(cell_dir: Path) -> int:
    """How many times the sweep started the cell (one header line per start)."""
    return (cell_dir / "cell.log").read_text().count("===== ")


def _stamps(cell_dir: Path) -> tuple[int, int]:
    return (
        (cell_dir / "run" / "teacher_backbone.json").stat().st_mtime_ns,
        (cell_dir / "eval" / "knn" / "results.json").stat().st_mtime_ns,
    )


@pytest.mark.slow
def test_sweep_runs_survives_interruption_and_failure_resumes_and_reports(
    tmp_path, capsys, small_imagenette
):
    spec = sweep_dict(tmp_path, small_imagenette)
    spec["random_init"] = True
    path = write_sweep(tmp_path, spec)
    out = tmp_path / "sweep"
    first, stale = out / "vanilla" / "seed0", out / "paper" / "seed1"
    # paper/seed1 finds a run of another seed in its directory: that cell must fail
    (stale / "run").mkdir(parents=True)
    stale_config = tiny_config(stale / "run", "train.seed=7")
    (stale / "run" / "config.yaml").write_text(config_to_yaml(stale_config))

    # 1. interrupted (SIGINT) once the first trained cell is done
    command = [sys.executable, "-m", "launch.sweep.cli", str(path)]
    sweep_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (read_record(read_sweep(path).cell("vanilla/seed0")) or {}).get(
            "status") == "done", 240, "the first trained cell")  # fmt: skip
        sweep_process.send_signal(signal.SIGINT)
        stdout, stderr = sweep_process.communicate(timeout=120)
    finally:
        sweep_process.kill()
    assert sweep_process.returncode == 1, stdout.decode() + stderr.decode()
    assert b"the same command resumes" in stderr
    stamps = _stamps(first)
    assert not (out / "paper").exists() or not (out / "paper" / "seed0" / "cell.json").exists()

    # 2. resumed two at a time: the failing cell is reported with its log, the rest finish
    assert main([str(path), "--parallel", "2"]) == 1
    printed = capsys.readouterr()
    assert f"failed: paper/seed1: SweepError: {stale / 'run'} holds a run of another" in (
        printed.out
    )
    assert f"(log: {stale / 'cell.log'})" in printed.out
    assert _stamps(first) == stamps and _attempts(first) == 1
    sweep = read_sweep(path)
    done = [c.key for c in sweep.cells() if cell_is_done(sweep, c, read_record(c))]
    assert len(done) == 7 and "paper/seed1" not in done
    markdown = (out / "results.md").read_text()
    assert "## Cells not done" in markdown and f"log: {stale / 'cell.log'}" in markdown

    # 3. fixed and rerun: only that cell runs
    for item in sorted((stale / "run").rglob("*"), reverse=True):
        item.unlink() if item.is_file() else item.rmdir()
    assert main([str(path)]) == 0
    assert _stamps(first) == stamps and _attempts(first) == 1
    assert _attempts(stale) == 2 and _attempts(out / "vanilla" / "seed1") == 1

    # 4. the report: per-seed and per-group rows, the plot
    markdown = (out / "results.md").read_text()
    assert "sample standard deviation (ddof=1)" in markdown
    assert "## Cells not done" not in markdown
    rows = list(csv.DictReader((out / "results.csv").open()))
    seeds = [r for r in rows if r["row"] == "seed"]
    means = [r for r in rows if r["row"] == "mean"]
    assert len(seeds) == 8 and {r["status"] for r in seeds} == {"done"}
    assert [(r["variant"], r["weights"]) for r in means] == [
        ("vanilla", "init"),
        ("vanilla", "trained"),
        ("paper", "init"),
        ("paper", "trained"),
    ]
    for mean in means:
        values = [float(r["knn.top1"]) for r in seeds if r["variant"] == mean["variant"]
                  and r["weights"] == mean["weights"]]  # fmt: skip
        assert mean["knn.top1_n"] == "2"
        assert float(mean["knn.top1"]) == pytest.approx(sum(values) / 2)
        assert float(mean["knn.top1_std"]) == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert markdown.count(" ± ") >= 8 and "(n=2)" in markdown
    assert (out / "knn.top1.png").stat().st_size > 0

    # 5. --report alone rewrites the same table, running nothing
    (out / "results.md").unlink()
    assert main([str(path), "--report"]) == 0
    assert (out / "results.md").read_text() == markdown
    assert _attempts(first) == 1

    # 6. a changed evaluation makes the cells' evaluations stale, not their training
    spec["evaluations"]["knn"]["overrides"].append("cls.temperature=0.1")
    changed = read_sweep(write_sweep(tmp_path, spec, "changed.yaml"))
    cell = changed.cell("vanilla/seed0")
    assert not cell_is_done(changed, cell, read_record(cell))
