"""The launchers without a cluster: argument parsing, checks before submission, job.json,
resume detection, the checkpoint taken at a signal, and `launch.local` with two processes."""

import contextlib
import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_helpers import read_metrics, tiny_config

from dinospec.config import config_to_yaml, load_config
from dinospec.models.checkpoints import load_backbone
from dinospec.train.checkpoint import MARKER, list_checkpoints
from dinospec.train.loop import train
from dinospec.train.reporting import RunReporter
from launch import local, submit
from launch.cli import LaunchError, split_job_type
from launch.jobs import JOB_TYPES, TrainJobType
from launch.preemption import REQUEUE, StopRequest
from launch.submissions import read_job_file, record_submission, resume_message
from launch.train_job import TrainJob

TRAIN = JOB_TYPES["train"]


def write_tiny_yaml(path: Path, output_dir: Path, *overrides: str) -> Path:
    """A config file as a user would pass it: the tiny CPU model, fully spelled out."""
    path.write_text(config_to_yaml(tiny_config(output_dir, *overrides)))
    return path


def parse_submit(*argv: str):
    job, rest = split_job_type(argv, submit.PROG)
    return job, submit.build_parser(job).parse_intermixed_args(rest)


class FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class FakeExecutor:
    """Stands in for submitit's AutoExecutor: records what would have been submitted."""

    def __init__(self, job_ids: list[str]) -> None:
        self.job_ids = job_ids
        self.submitted: list = []

    def submit(self, function):
        self.submitted.append(function)
        return FakeJob(self.job_ids[len(self.submitted) - 1])

    def batch(self):
        return contextlib.nullcontext()


@pytest.fixture
def fake_slurm(monkeypatch):
    """submit.py with a fake executor and an empty queue; returns the executor."""
    executor = FakeExecutor(["41", "42"])
    monkeypatch.setattr(submit, "make_executor", lambda folder, params, timeouts: executor)
    monkeypatch.setattr(submit, "active_jobs", lambda ids: [])
    return executor


@pytest.fixture
def no_submission(monkeypatch):
    def refuse(*args):
        raise AssertionError("an executor was created although the checks failed")

    monkeypatch.setattr(submit, "make_executor", refuse)


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_job_type_comes_first_and_unknown_ones_are_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        split_job_type(["eval", "c.yaml"], submit.PROG)
    assert exit_info.value.code == 2
    known = "(known: train, eval-seg, eval-cls, eval-depth)"
    assert f"unknown job type 'eval' {known}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        split_job_type(["--help"], submit.PROG)
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("train", "eval-seg", "eval-cls", "eval-depth"))


def test_overrides_and_options_may_be_intermixed():
    job, args = parse_submit(
        "train", "c.yaml", "train.seed=1", "--nodes", "2", "optim.epochs=5",
        "--gpus-per-node", "8", "--partition", "gpu", "--qos", "high",
    )  # fmt: skip
    assert job is TRAIN
    assert args.config == "c.yaml"
    assert args.overrides == ["train.seed=1", "optim.epochs=5"]
    assert (args.nodes, args.gpus_per_node, args.partition, args.qos) == (2, 8, "gpu", "high")


def test_gpu_jobs_run_one_task_per_gpu():
    _, args = parse_submit(
        "train", "c.yaml", "--nodes", "4", "--gpus-per-node", "8", "--partition", "p",
        "--account", "a", "--constraint", "volta32gb", "--exclude", "n[1-2]",
        "--comment", "c", "--timeout", "60", "--mem", "400", "--cpus-per-task", "10",
    )  # fmt: skip
    params = submit.executor_parameters(TRAIN, args)
    assert params["nodes"] == 4 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["cpus_per_task"] == 10 and params["mem_gb"] == 400 and params["timeout_min"] == 60
    expected = {"partition": "p", "account": "a", "constraint": "volta32gb", "exclude": "n[1-2]"}
    assert all(params[f"slurm_{k}"] == v for k, v in expected.items())
    assert params["slurm_comment"] == "c" and "slurm_qos" not in params
    assert params["slurm_additional_parameters"] == {"requeue": True}


def test_cpu_jobs_take_tasks_per_node_and_bad_counts_are_refused():
    _, args = parse_submit("train", "c.yaml", "--tasks-per-node", "2")
    params = submit.executor_parameters(TRAIN, args)
    assert params["tasks_per_node"] == 2 and "gpus_per_node" not in params
    for bad, message in [
        (("--gpus-per-node", "8", "--tasks-per-node", "2"), "one task per GPU"),
        (("--nodes", "0"), "--nodes must be >= 1"),
        (("--tasks-per-node", "0"), "--tasks-per-node must be >= 1"),
    ]:
        _, args = parse_submit("train", "c.yaml", *bad)
        with pytest.raises(LaunchError, match=message):
            submit.executor_parameters(TRAIN, args)


def test_bad_config_is_rejected_before_submission(tmp_path, capsys, no_submission):
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "run")
    assert submit.main(["train", str(config), "model.num_heads=5"]) == 2
    err = capsys.readouterr().err
    assert "model.num_heads=5" in err and "command line" in err
    assert "nothing was submitted" in err
    assert submit.main(["train", str(config), "model.no_such_key=1"]) == 2
    assert "model.no_such_key" in capsys.readouterr().err
    assert submit.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_data_path_is_rejected_before_submission(tmp_path, capsys, no_submission):
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "run")
    missing = tmp_path / "imagenet"
    args = ["train", str(config), "data.dataset=imagenet", f"data.path={missing}"]
    assert submit.main(args) == 2
    err = capsys.readouterr().err
    assert f"{missing}/train is not a directory" in err and "nothing was submitted" in err
    assert not (tmp_path / "run").exists()


def test_data_path_checks_name_what_is_missing(tmp_path):
    def problems(*overrides):
        return TrainJobType().problems(tiny_config(tmp_path / "run", *overrides))

    (tmp_path / "empty").mkdir()
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "in1k" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "list.txt").write_text("a.jpg\n")
    assert problems() == []
    assert problems("data.dataset=folder", f"data.path={tmp_path / 'tree'}") == []
    assert problems("data.dataset=imagenet", f"data.path={tmp_path / 'in1k'}") == []
    assert problems("data.dataset=list", f"data.path={tmp_path / 'list.txt'}") == []
    [empty] = problems("data.dataset=folder", f"data.path={tmp_path / 'empty'}")
    assert "is empty" in empty
    [no_list] = problems("data.dataset=list", f"data.path={tmp_path / 'nope.txt'}")
    assert "nope.txt: image list file not found" in no_list


def test_relative_paths_become_absolute_on_the_submitting_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images" / "x").mkdir(parents=True)
    config = write_tiny_yaml(tmp_path / "c.yaml", Path("unused"))
    loaded = TrainJobType().load(str(config), ["data.dataset=folder", "data.path=images"], "runs/a")
    assert loaded.train.output_dir == str(tmp_path / "runs" / "a")
    assert loaded.data.path == str(tmp_path / "images")


def test_job_json_records_every_submission(tmp_path):
    record_submission(tmp_path, "train", {"job_id": "7", "command": ["a"]})
    record_submission(tmp_path, "train", {"job_id": 9, "command": ["b"]})
    record = read_job_file(tmp_path)
    assert record["job_type"] == "train" and record["job_ids"] == ["7", "9"]
    assert [s["command"] for s in record["submissions"]] == [["a"], ["b"]]
    assert all("submitted_at" in s for s in record["submissions"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]


def test_resume_is_detected_from_job_json_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    assert resume_message(run, TRAIN.progress(run)) == f"starting a new run in {run}"
    run.mkdir()
    record_submission(run, "train", {"job_id": "1"})
    assert "no checkpoint yet, the run starts at iteration 0" in resume_message(
        run, TRAIN.progress(run)
    )
    for iteration in (2, 4):
        checkpoint = run / "checkpoints" / f"iter_{iteration:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "shard.distcp").write_bytes(b"12345")
        files = {"shard.distcp": {"size": 5, "sha256": ""}}
        (checkpoint / MARKER).write_text(json.dumps({"iteration": iteration, "files": files}))
    expected = f"resuming the run in {run} from the newest checkpoint, iter_00000004"
    assert resume_message(run, TRAIN.progress(run)).startswith(expected)
    (checkpoint / "shard.distcp").write_bytes(b"12")
    expected = f"resuming the run in {run} from the newest checkpoint, iter_00000002"
    assert resume_message(run, TRAIN.progress(run)).startswith(expected)
    (run / "checkpoints" / "iter_00000002" / "shard.distcp").write_bytes(b"")
    assert "none of the 2 there has its recorded sizes" in TRAIN.progress(run)


def test_submission_writes_config_and_job_json_then_resumes(tmp_path, capsys, fake_slurm):
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "run")
    assert submit.main(["train", str(config), "--tasks-per-node", "2", "train.seed=3"]) == 0
    out = capsys.readouterr().out
    assert f"starting a new run in {tmp_path / 'run'}" in out and "submitted job 41" in out
    job = fake_slurm.submitted[0]
    assert isinstance(job, TrainJob) and job.handle_signals and job.config.train.seed == 3
    assert "seed: 3" in (tmp_path / "run" / "config.yaml").read_text()
    pickle.loads(pickle.dumps(job))
    assert submit.main(["train", str(config), "--tasks-per-node", "2"]) == 0
    assert "re-submitting into" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "job.json").read_text())
    assert record["job_ids"] == ["41", "42"]
    assert record["submissions"][0]["executor"]["tasks_per_node"] == 2


def test_a_queued_job_in_the_same_directory_blocks_resubmission(
    tmp_path, capsys, fake_slurm, monkeypatch
):
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "run")
    assert submit.main(["train", str(config)]) == 0
    monkeypatch.setattr(submit, "active_jobs", lambda ids: list(ids))
    assert submit.main(["train", str(config)]) == 2
    assert "job(s) 41 still queued or running" in capsys.readouterr().err
    assert len(fake_slurm.submitted) == 1


def test_submitit_checkpoint_requeues_the_same_job(tmp_path):
    import submitit

    job = TrainJob(tiny_config(tmp_path / "run"))
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, TrainJob) and delayed.function.config == job.config


def test_local_rejects_more_processes_than_gpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "run")
    assert local.main(["train", str(config), "--nproc", "4"]) == 2
    assert "--nproc=4 but this machine has 2 GPU(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_signal_checkpoints_between_iterations_and_resume_is_exact(
    tmp_path, monkeypatch, restore_signals, capsys
):
    """SIGUSR2 after iteration 3 (no periodic checkpoint there): the job writes iteration
    3, hands over to the previous handler (submitit's requeue), and the next run finishes
    with the weights and losses of an uninterrupted run."""
    straight = train(tiny_config(tmp_path / "straight", "train.max_iterations=6"))
    chained = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: chained.append(signum))
    write_metrics = RunReporter.log_step

    def signal_after_third(self, iteration, *args):
        write_metrics(self, iteration, *args)
        if iteration == 3:
            os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(RunReporter, "log_step", signal_after_third)
    config = tiny_config(tmp_path / "resumed", "train.max_iterations=6")
    assert TrainJob(config)() == {"status": "interrupted", "iteration": 3}
    assert chained == [signal.SIGUSR2]
    assert "checkpoint at iteration 3 written, requeueing" in capsys.readouterr().out
    assert list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1].name == "iter_00000003"
    monkeypatch.setattr(RunReporter, "log_step", write_metrics)
    assert TrainJob(config)()["status"] == "finished"
    assert "resumed from iteration 3" in capsys.readouterr().out
    losses = [(m["iteration"], m["loss"]) for m in read_metrics(tmp_path / "resumed")]
    assert losses == [(m["iteration"], m["loss"]) for m in read_metrics(straight)]
    a = load_backbone(straight / "teacher_backbone.safetensors").state_dict()
    b = load_backbone(tmp_path / "resumed" / "teacher_backbone.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _agreement_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        stop = StopRequest()
        seen = [stop.agreed()]
        if rank == 1:
            stop._record(signal.SIGUSR2, None)
        seen.append(stop.agreed())
        if rank == 0:
            stop._record(signal.SIGTERM, None)
        seen.append(stop.agreed())
        Path(out, str(rank)).write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_strongest_signal_any_of_them_received(tmp_path):
    """Only rank 1 gets SIGUSR2: both leave to requeue; rank 0's later SIGTERM (a plain
    stop) does not weaken that. The flag travels over the CPU group, not the GPU's."""
    mp.spawn(_agreement_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / str(rank)).read_text()) == [0, REQUEUE, REQUEUE]


@pytest.mark.slow
def test_local_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """Masks stratified over the global batch and Sinkhorn-Knopp targets (which pool the
    ranks) make the losses independent of the number of processes; see test_train_loop."""
    overrides = (
        "train.max_iterations=3",
        "dino.koleo_loss_weight=0",
        "train.centering=sinkhorn_knopp",
        "ibot.mask_stratification=global",
    )
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "unused", *overrides)
    two, one = tmp_path / "nproc2", tmp_path / "nproc1"
    for nproc, output_dir in ((2, two), (1, one)):
        batch = f"train.batch_size_per_gpu={4 // nproc}"
        options = ["--nproc", str(nproc), "--output-dir", str(output_dir)]
        assert local.main(["train", str(config), *options, batch]) == 0
    ws2, ws1 = read_metrics(two), read_metrics(one)
    assert [m["iteration"] for m in ws2] == [m["iteration"] for m in ws1] == [1, 2, 3]
    for a, b in zip(ws1, ws2, strict=True):
        for key in ("loss_dino_global", "loss_dino_local", "loss_ibot"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["iteration"], key)
    assert read_job_file(two)["submissions"][0]["nproc"] == 2


def test_sweep_points_are_the_grid_of_all_values():
    points = submit.sweep_points(["optim.base_lr=0.001,0.002", "train.seed=1,2"])
    assert points == [
        ["optim.base_lr=0.001", "train.seed=1"],
        ["optim.base_lr=0.001", "train.seed=2"],
        ["optim.base_lr=0.002", "train.seed=1"],
        ["optim.base_lr=0.002", "train.seed=2"],
    ]
    assert submit.point_name(points[1]) == "optim.base_lr-0.001_train.seed-2"
    assert submit.point_name(["data.path=/a b/c"]) == "data.path-abc"
    with pytest.raises(LaunchError, match="KEY=V1,V2"):
        submit.sweep_points(["train.seed"])


def test_sweep_values_may_be_lists():
    points = submit.sweep_points(["model.specialize.qkv_blocks=[0,1],[0,1,2,3],all"])
    assert points == [
        ["model.specialize.qkv_blocks=[0,1]"],
        ["model.specialize.qkv_blocks=[0,1,2,3]"],
        ["model.specialize.qkv_blocks=all"],
    ]
    assert load_config(None, points[1]).model.specialize.qkv_blocks == [0, 1, 2, 3]
    assert submit.point_name(points[0]) == "model.specialize.qkv_blocks-0+1"
    for spec, problem in (("k=[0,1", "unbalanced"), ("k=0]", "unbalanced"), ("k=1,,2", "empty")):
        with pytest.raises(LaunchError, match=problem):
            submit.sweep_points([spec])
    with pytest.raises(LaunchError, match=r"share the run directory name\(s\) \['data.path-ab'\]"):
        submit.sweep_points(["data.path=/a b,/ab"])


def test_sweep_validates_every_point_then_submits_one_array(tmp_path, capsys, fake_slurm):
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "sweep")
    argv = ["train", str(config), "--sweep", "train.seed=1,2"]
    assert submit.main(argv) == 0
    assert [job.config.train.seed for job in fake_slurm.submitted] == [1, 2]
    for seed, job_id in ((1, "41"), (2, "42")):
        run = tmp_path / "sweep" / f"train.seed-{seed}"
        assert f"seed: {seed}" in (run / "config.yaml").read_text()
        assert read_job_file(run)["job_ids"] == [job_id]
    assert "job array of 2 job(s)" in capsys.readouterr().out


def test_a_bad_sweep_point_submits_nothing(tmp_path, capsys, no_submission):
    config = write_tiny_yaml(tmp_path / "c.yaml", tmp_path / "sweep")
    assert submit.main(["train", str(config), "--sweep", "model.depth=2,two"]) == 2
    assert "model.depth='two'" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "model.depth-2").exists()


def test_eval_jobs_run_as_one_process_with_absolute_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"")
    evaluation = JOB_TYPES["eval-seg"]
    config = evaluation.load(
        str(Path(__file__).resolve().parents[1] / "configs" / "eval" / "camvid_linear.yaml"),
        ["backbone.path=weights.pth", "dataset.root=missing"],
        "out",
    )
    assert config.backbone.path == str(tmp_path / "weights.pth")
    assert config.output_dir == str(tmp_path / "out")
    assert evaluation.problems(config) == [f"dataset.root={tmp_path / 'missing'}: not a directory"]
    _, args = parse_submit("eval-seg", "c.yaml", "--tasks-per-node", "2")
    assert submit.tasks_per_node(args) == 2
    _, args = parse_submit("eval-seg", "c.yaml")
    assert submit.tasks_per_node(args) == 1
