"""`launch.submit` against the one-node SLURM cluster of tests/cluster/start.sh: a 2-task
CPU training job (gloo), requeued and preempted mid-run, must end with the weights of an
uninterrupted run; bad configs and missing paths never reach sbatch.

CI starts the cluster, so there a missing cluster fails these tests. Elsewhere they are
skipped with the command that starts it.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import read_metrics, tiny_config

from dinospec.config import config_to_yaml
from dinospec.models.checkpoints import load_backbone
from dinospec.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
START = REPO / "tests" / "cluster" / "start.sh"
ITERATIONS = 24
OVERRIDES = ("train.epoch_length=8", "train.checkpoint_every=2", "dino.koleo_loss_weight=0")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
JOB_TIMEOUT_S = 240


def cluster_problem() -> str | None:
    """Why the local cluster cannot take jobs, or None when it can."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "is UP" not in ping.stdout:
        return f"slurmctld does not answer: {(ping.stdout + ping.stderr).strip()}"
    states = subprocess.run(
        ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, check=False
    ).stdout.split()
    if not {"idle", "mixed", "allocated"} & set(states):
        return f"no usable node (states: {states})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = cluster_problem()
    if problem is None:
        return
    message = f"local SLURM cluster not available ({problem}); start it with {START}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Jobs:
    """Job ids submitted by a test, cancelled when it ends (a failed test leaves none)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def submit(self, run_dir: Path, *extra: str) -> str:
        """`python -m launch.submit` as a user runs it; returns the new job id."""
        config = run_dir.parent / f"{run_dir.name}.yaml"
        config.write_text(config_to_yaml(tiny_config(run_dir, *OVERRIDES)))
        result = launch_submit(str(config), "--tasks-per-node", "2", "--timeout", "30", *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        job_id = read_job_ids(run_dir)[-1]
        self.ids.append(job_id)
        return job_id

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], check=False)


@pytest.fixture(scope="module")
def module_jobs(cluster):
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()


@pytest.fixture
def jobs(cluster):
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()


def launch_submit(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "launch.submit", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)


def read_job_ids(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "job.json").read_text())["job_ids"]


def job_fields(job_id: str) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in shown.split() if "=" in item)


def known_job_ids() -> set[str]:
    shown = subprocess.run(
        ["scontrol", "show", "jobs", "-o"], capture_output=True, text=True, check=False
    ).stdout
    return {line.split()[0] for line in shown.splitlines() if line.startswith("JobId=")}


def wait_until_done(job_id: str) -> dict[str, str]:
    """Poll until the job reaches a final state; a requeued job goes back to PENDING and
    is waited for too."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        fields = job_fields(job_id)
        if fields["JobState"] in FINAL_STATES:
            return fields
        time.sleep(1)
    raise AssertionError(f"job {job_id} not done after {JOB_TIMEOUT_S}s: {job_fields(job_id)}")


def wait_for_checkpoint(run_dir: Path, job_id: str) -> int:
    """The first periodic checkpoint, the moment the test interrupts the job."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        found = list_checkpoints(run_dir / "checkpoints")
        if found:
            return int(found[0].name.removeprefix("iter_"))
        assert job_fields(job_id)["JobState"] in ("PENDING", "RUNNING"), job_fields(job_id)
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint in {run_dir} after {JOB_TIMEOUT_S}s")


def rank0_log(run_dir: Path, job_id: str) -> str:
    logs = run_dir / "submitit"
    return (logs / f"{job_id}_0_log.out").read_text() + (logs / f"{job_id}_0_log.err").read_text()


def losses_by_iteration(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each iteration (a resumed run logs again what it redoes)."""
    return {m["iteration"]: m["loss"] for m in read_metrics(run_dir)}


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    """Teacher exports equal bit for bit, and so are the final checkpoints' shards (student,
    teacher, optimizer, centers)."""
    a = load_backbone(reference / "teacher_backbone.safetensors").state_dict()
    b = load_backbone(run_dir / "teacher_backbone.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = f"iter_{ITERATIONS:08d}"
    for shard in sorted((reference / "checkpoints" / final).glob("*.distcp")):
        other = run_dir / "checkpoints" / final / shard.name
        assert shard.read_bytes() == other.read_bytes(), shard.name


def submit_preemptor() -> str:
    """A short job in the high-priority partition that needs every CPU of the node."""
    cpus = subprocess.run(
        ["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    command = ["sbatch", "--parsable", "-p", "urgent", "-n", cpus, "--output=/dev/null"]
    submitted = subprocess.run(
        [*command, "--wrap", "sleep 2"], capture_output=True, text=True, check=True
    )
    return submitted.stdout.strip()


@pytest.fixture(scope="module")
def uninterrupted(module_jobs, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cluster") / "uninterrupted"
    job_id = module_jobs.submit(run_dir)
    fields = wait_until_done(job_id)
    assert fields["JobState"] == "COMPLETED", rank0_log(run_dir, job_id)
    return run_dir


def test_two_task_job_trains_checkpoints_and_logs(uninterrupted):
    [job_id] = read_job_ids(uninterrupted)
    fields = job_fields(job_id)
    assert (fields["NumTasks"], fields["Restarts"]) == ("2", "0")
    metrics = read_metrics(uninterrupted)
    assert [m["iteration"] for m in metrics] == list(range(1, ITERATIONS + 1))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert list_checkpoints(uninterrupted / "checkpoints")[-1].name == f"iter_{ITERATIONS:08d}"
    assert (uninterrupted / "config.yaml").is_file()
    assert (uninterrupted / "teacher_backbone.safetensors").is_file()
    logs = uninterrupted / "submitit"
    assert (logs / f"{job_id}_1_log.out").is_file()
    assert f"it {ITERATIONS}/{ITERATIONS} loss" in rank0_log(uninterrupted, job_id)


def test_scontrol_requeue_mid_run_resumes_to_the_same_weights(jobs, uninterrupted, tmp_path):
    run_dir = tmp_path / "requeued"
    job_id = jobs.submit(run_dir)
    wait_for_checkpoint(run_dir, job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    fields = wait_until_done(job_id)
    log = rank0_log(run_dir, job_id)
    assert fields["JobState"] == "COMPLETED", log
    assert int(fields["Restarts"]) >= 1
    assert "checkpoint at iteration" in log and "written, stopping" in log
    assert "resumed from iteration" in log
    assert losses_by_iteration(run_dir) == losses_by_iteration(uninterrupted)
    assert_same_weights(run_dir, uninterrupted)


def test_preemption_checkpoints_at_the_signal_and_requeues(jobs, uninterrupted, tmp_path):
    """A job in the high-priority partition takes every CPU: SLURM sends SIGUSR2
    (preempt_send_user_signal), the job checkpoints, submitit requeues it, and it resumes
    once the preemptor is done."""
    run_dir = tmp_path / "preempted"
    job_id = jobs.submit(run_dir)
    wait_for_checkpoint(run_dir, job_id)
    jobs.ids.append(submit_preemptor())
    fields = wait_until_done(job_id)
    log = rank0_log(run_dir, job_id)
    assert fields["JobState"] == "COMPLETED", log
    assert "Caught signal SIGUSR2" in log and "written, requeueing" in log
    assert f"Requeued job {job_id}" in log
    assert losses_by_iteration(run_dir) == losses_by_iteration(uninterrupted)
    assert_same_weights(run_dir, uninterrupted)


def test_bad_config_and_missing_paths_never_reach_sbatch(cluster, tmp_path):
    before = known_job_ids()
    config = tmp_path / "c.yaml"
    config.write_text(config_to_yaml(tiny_config(tmp_path / "run", *OVERRIDES)))
    bad_key = launch_submit(str(config), "--tasks-per-node", "2", "optim.no_such_key=1")
    missing = tmp_path / "images"
    no_data = launch_submit(str(config), "data.dataset=folder", f"data.path={missing}")
    for result, expected in ((bad_key, "optim.no_such_key"), (no_data, str(missing))):
        assert result.returncode == 2
        assert expected in result.stderr and "nothing was submitted" in result.stderr
    assert not (tmp_path / "run").exists()
    assert known_job_ids() == before


def submit_job(job_type: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "launch.submit", job_type, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)


def test_eval_job_on_the_trained_checkpoint(jobs, uninterrupted, tmp_path):
    out = tmp_path / "eval"
    result = submit_job(
        "eval-cls",
        str(REPO / "configs" / "eval" / "imagenette_knn_linear.yaml"),
        f"backbone.path={uninterrupted}",
        f"dataset.root={REPO.parent / 'shared' / 'data' / 'imagenette'}",
        "dataset.train_per_class=3",
        "dataset.val_per_class=2",
        "dataset.num_workers=0",
        "cls.ks=[5,10]",
        "cls.image_size=32",
        "cls.resize_size=32",
        "cls.epochs=5",
        f"output_dir={out}",
        "--tasks-per-node",
        "2",
        "--timeout",
        "30",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [job_id] = read_job_ids(out)
    jobs.ids.append(job_id)
    fields = wait_until_done(job_id)
    assert fields["JobState"] == "COMPLETED", rank0_log(out, job_id)
    results = json.loads((out / "results.json").read_text())
    assert set(results["knn"]) == {"5", "10"} and 0 <= results["linear"]["top1"] <= 1
    assert results["num_processes"] == 2


def test_sweep_is_one_job_array_with_a_run_directory_per_point(jobs, tmp_path):
    base = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(config_to_yaml(tiny_config(base, *OVERRIDES, "train.max_iterations=2")))
    result = submit_job("train", str(config), "--sweep", "train.seed=1,2", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [base / "train.seed-1", base / "train.seed-2"]
    ids = [read_job_ids(run)[-1] for run in runs]
    jobs.ids.extend(ids)
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids)
    for run, job_id in zip(runs, ids, strict=True):
        assert wait_until_done(job_id)["JobState"] == "COMPLETED", rank0_log(base, job_id)
        assert [m["iteration"] for m in read_metrics(run)] == [1, 2]
    seeds = [json.loads((run / "job.json").read_text()) for run in runs]
    assert [s["submissions"][-1]["sweep"] for s in seeds] == [["train.seed=1"], ["train.seed=2"]]
    assert read_metrics(runs[0])[0]["loss"] != read_metrics(runs[1])[0]["loss"]
