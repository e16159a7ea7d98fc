"""Jobs that span two nodes of the local SLURM cluster (tests/cluster/start.sh): dsnode1
and dsnode2, each a slurmd in its own network and UTS namespace, reached over a private
link, sharing this machine's filesystem as a cluster shares its own.

`launch.submit ... --nodes 2` (CPU, gloo, one task per node) must put rank 0 and rank 1 on
different hosts, meet at the first host of the node list, shard the model across the
nodes (FSDP2) and train exactly as one node with two tasks does; preempted, it checkpoints,
requeues and ends with the weights of an uninterrupted run; when a node dies mid-run, the
surviving rank names the lost one and ends, and the job resumes from its checkpoint once
the node is back. An evaluation job on two nodes gives the metrics of one process.

CI starts the cluster, so there a missing cluster or node fails these tests. Elsewhere
they are skipped with the command that starts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import randomize, tiny_vit
from test_launch_cluster import (
    FINAL_STATES,
    START,
    cluster_problem,
    job_fields,
    losses_by_iteration,
    read_job_ids,
)
from train_helpers import read_metrics, tiny_config

from dinospec.config import config_to_yaml
from dinospec.models.checkpoints import load_backbone, save_backbone
from dinospec.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NODE_SCRIPT = REPO / "tests" / "cluster" / "node.sh"
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"
NODES = ("dsnode1", "dsnode2")
ITERATIONS = 12
OVERRIDES = ("train.checkpoint_every=2", "dino.koleo_loss_weight=0")
JOB_TIMEOUT_S = 400
PEER_TIMEOUT_S = 10
"""The node-failure job's DINOSPEC_PEER_TIMEOUT."""
PER_RUN_KEYS = {"config", "date", "num_processes"}
"""Keys of an evaluation's results that name the run, not its result."""


def two_node_problem() -> str | None:
    """Why the cluster cannot run two-node jobs, or None when it can."""
    problem = cluster_problem()
    if problem is not None:
        return problem
    states = subprocess.run(
        ["sinfo", "-h", "-p", "multi", "-N", "-o", "%N %T"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    usable = {line.split()[0] for line in states if line.split()[1:2] in (["idle"], ["mixed"])}
    if not set(NODES) <= usable:
        return f"partition multi lacks usable nodes {NODES} (sinfo: {states})"
    return None


@pytest.fixture(scope="module")
def two_nodes():
    problem = two_node_problem()
    if problem is None:
        return
    message = f"two-node SLURM cluster not available ({problem}); start it with {START}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Jobs:
    """Job ids submitted by a test, cancelled when it ends (a failed test leaves none)."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def submit(self, job_type: str, output_dir: Path, *args: str, env: dict | None = None) -> str:
        """`python -m launch.submit` as a user runs it, into the multi partition."""
        command = [sys.executable, "-m", "launch.submit", job_type, *args]
        command += ["--partition", "multi", "--timeout", "30"]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        job_id = read_job_ids(output_dir)[-1]
        self.ids.append(job_id)
        return job_id

    def train(self, run_dir: Path, *resources: str, env: dict | None = None) -> str:
        config = run_dir.parent / f"{run_dir.name}.yaml"
        config.write_text(config_to_yaml(tiny_config(run_dir, *OVERRIDES)))
        return self.submit("train", run_dir, str(config), *resources, env=env)

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], check=False)


@pytest.fixture(scope="module")
def module_jobs(two_nodes):
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()


@pytest.fixture
def jobs(two_nodes):
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()


def wait_until(predicate, what: str, job_id: str) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"{what} not seen after {JOB_TIMEOUT_S}s: {job_fields(job_id)}")


def wait_until_done(job_id: str) -> dict[str, str]:
    """A requeued job goes back to PENDING and is waited for too."""
    wait_until(lambda: job_fields(job_id)["JobState"] in FINAL_STATES, "the end", job_id)
    return job_fields(job_id)


def wait_for_checkpoint(run_dir: Path, job_id: str) -> None:
    wait_until(lambda: bool(list_checkpoints(run_dir / "checkpoints")), "a checkpoint", job_id)


def task_log(run_dir: Path, job_id: str, task: int) -> str:
    logs = run_dir / "submitit"
    return "".join(
        (logs / f"{job_id}_{task}_log.{kind}").read_text(errors="replace")
        for kind in ("out", "err")
        if (logs / f"{job_id}_{task}_log.{kind}").is_file()
    )


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / f"iter_{ITERATIONS:08d}"


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    """Teacher exports equal bit for bit, and so are the final checkpoints' shards."""
    a = load_backbone(reference / "teacher_backbone.safetensors").state_dict()
    b = load_backbone(run_dir / "teacher_backbone.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shards = sorted(final_checkpoint(reference).glob("*.distcp"))
    assert len(shards) == 2
    for shard in shards:
        assert shard.read_bytes() == (final_checkpoint(run_dir) / shard.name).read_bytes()


def completed(run_dir: Path, job_id: str) -> dict[str, str]:
    fields = wait_until_done(job_id)
    assert fields["JobState"] == "COMPLETED", task_log(run_dir, job_id, 0)
    return fields


@pytest.fixture(scope="module")
def two_node_run(module_jobs, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("multinode") / "two_nodes"
    completed(run_dir, module_jobs.train(run_dir, "--nodes", "2"))
    return run_dir


@pytest.fixture(scope="module")
def one_node_run(module_jobs, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("multinode") / "one_node"
    completed(run_dir, module_jobs.train(run_dir, "--nodes", "1", "--tasks-per-node", "2"))
    return run_dir


def test_two_node_job_runs_one_rank_on_each_node(two_node_run):
    [job_id] = read_job_ids(two_node_run)
    fields = job_fields(job_id)
    assert (fields["NumNodes"], fields["NumTasks"], fields["NodeList"]) == ("2", "2", "dsnode[1-2]")
    for rank, host in enumerate(NODES):
        assert f"rank {rank} of 2 on host {host} (rendezvous dsnode1:" in task_log(
            two_node_run, job_id, rank
        )
    metrics = read_metrics(two_node_run)
    assert [m["iteration"] for m in metrics] == list(range(1, ITERATIONS + 1))
    shards = {p.name: p.stat().st_size for p in final_checkpoint(two_node_run).glob("*.distcp")}
    assert set(shards) == {"__0_0.distcp", "__1_0.distcp"} and all(shards.values()), shards


def test_two_nodes_train_exactly_like_one_node_with_two_tasks(two_node_run, one_node_run):
    [job_id] = read_job_ids(one_node_run)
    assert job_fields(job_id)["NumNodes"] == "1"
    assert losses_by_iteration(two_node_run) == losses_by_iteration(one_node_run)
    assert_same_weights(two_node_run, one_node_run)


def submit_preemptor() -> str:
    """A short job in the high-priority partition that needs every CPU of both nodes."""
    cpus = sum(
        int(c)
        for c in subprocess.run(
            ["sinfo", "-h", "-p", "multi-urgent", "-N", "-o", "%c"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    )
    command = ["sbatch", "--parsable", "-p", "multi-urgent", "-N", "2", "-n", str(cpus)]
    submitted = subprocess.run(
        [*command, "--output=/dev/null", "--wrap", "sleep 2"],
        capture_output=True,
        text=True,
        check=True,
    )
    return submitted.stdout.strip()


def test_preempted_two_node_job_requeues_and_resumes_to_the_same_weights(
    jobs, two_node_run, tmp_path
):
    run_dir = tmp_path / "preempted"
    job_id = jobs.train(run_dir, "--nodes", "2")
    wait_for_checkpoint(run_dir, job_id)
    jobs.ids.append(submit_preemptor())
    fields = completed(run_dir, job_id)
    log = task_log(run_dir, job_id, 0)
    assert int(fields["Restarts"]) >= 1
    assert "Caught signal SIGUSR2" in log and "written, requeueing" in log
    assert f"Requeued job {job_id}" in log and "resumed from iteration" in log
    assert losses_by_iteration(run_dir) == losses_by_iteration(two_node_run)
    assert_same_weights(run_dir, two_node_run)


def node_script(action: str, node: str) -> None:
    result = subprocess.run(
        ["bash", str(NODE_SCRIPT), action, node], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def node_back(two_nodes):
    """dsnode2 is started again after the test, whatever happened in it."""
    yield
    node_script("start", "dsnode2")


def test_a_dead_node_ends_the_job_naming_its_rank_and_the_job_resumes(
    jobs, node_back, two_node_run, tmp_path
):
    """dsnode2 goes silent mid-run (link cut, every process killed): rank 0 names rank 1
    within the peer timeout instead of waiting in a collective, SLURM declares the node
    down and requeues the job, which resumes from its last checkpoint once the node is back
    and ends with the weights of an uninterrupted run."""
    run_dir = tmp_path / "node_lost"
    job_id = jobs.train(run_dir, "--nodes", "2", env={"DINOSPEC_PEER_TIMEOUT": str(PEER_TIMEOUT_S)})
    wait_for_checkpoint(run_dir, job_id)
    node_script("kill", "dsnode2")
    message = f"rank 1 (host {NODES[1]}) stopped answering: no heartbeat for"
    wait_until(lambda: message in task_log(run_dir, job_id, 0), "rank 0 naming rank 1", job_id)
    wait_until(lambda: job_fields(job_id)["JobState"] != "RUNNING", "the job ending", job_id)
    assert list_checkpoints(run_dir / "checkpoints")
    node_script("start", "dsnode2")
    fields = completed(run_dir, job_id)
    assert int(fields["Restarts"]) >= 1
    assert "resumed from iteration" in task_log(run_dir, job_id, 0)
    assert losses_by_iteration(run_dir) == losses_by_iteration(two_node_run)
    assert_same_weights(run_dir, two_node_run)


@pytest.fixture(scope="module")
def eval_args(tmp_path_factory) -> list[str]:
    """k-NN and linear classification of a backbone with random values in every parameter
    (no tied neighbours), on three Imagenette classes."""
    backbone = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_backbone(randomize(tiny_vit(depth=4)).eval(), backbone)
    return [
        str(REPO / "configs" / "eval" / "imagenette_knn_linear.yaml"),
        f"backbone.path={backbone}",
        f"dataset.root={IMAGENETTE}",
        "dataset.train_per_class=5",
        "dataset.val_per_class=3",
        "dataset.num_workers=0",
        "cls.image_size=32",
        "cls.resize_size=36",
        "cls.feature_batch_size=4",
        "cls.ks=[2,5]",
        "cls.lrs=[0.01,0.1]",
        "cls.epochs=3",
    ]


def eval_results(jobs: Jobs, out: Path, eval_args: list[str], *resources: str) -> dict:
    job_id = jobs.submit("eval-cls", out, *eval_args, f"output_dir={out}", *resources)
    completed(out, job_id)
    return json.loads((out / "results.json").read_text())


def test_eval_job_on_two_nodes_gives_the_metrics_of_one(jobs, eval_args, tmp_path):
    one = eval_results(jobs, tmp_path / "one", eval_args, "--nodes", "1")
    two = eval_results(jobs, tmp_path / "two", eval_args, "--nodes", "2")
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    without_run = [{k: v for k, v in r.items() if k not in PER_RUN_KEYS} for r in (one, two)]
    assert without_run[0] == without_run[1]
