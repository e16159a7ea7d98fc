"""Signals stop a run with a checkpoint: SIGTERM (scancel, kill), SIGINT (Ctrl-C) and
SIGUSR2 (SLURM's warning before the time limit) sent to every entry point while it trains
with data-loader workers; the run finishes its step, writes a checkpoint at the iteration
it reached, exits cleanly, and resuming from that checkpoint gives the uninterrupted run
bit for bit. A second Ctrl-C stops at once."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import LONG, Run, run_to_end, start, write_config
from train_helpers import read_metrics, tiny_config

from dinospec.models.checkpoints import load_backbone
from dinospec.train.checkpoint import list_checkpoints
from dinospec.train.data import build_image_dataset, build_loader
from dinospec.train.signals import STOP, StopRequest

FINAL = 8
WORKERS = ("data.num_workers=2",)
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGUSR2": signal.SIGUSR2}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["iteration"], m["loss"]) for m in read_metrics(run_dir)]


def _assert_same_teacher(run_dir: Path, reference: Path) -> None:
    a = load_backbone(reference / "teacher_backbone.safetensors").state_dict()
    b = load_backbone(run_dir / "teacher_backbone.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _config(run_dir: Path, nproc: int = 1) -> Path:
    return write_config(run_dir, *LONG, *WORKERS, f"train.batch_size_per_gpu={4 // nproc}")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs to FINAL, by number of processes (one process and two do not
    round alike), with the config the interrupted runs use and a checkpoint after every
    iteration (which changes nothing in the run, see test_train_loop's resume tests)."""
    base = tmp_path_factory.mktemp("reference")
    found = {}
    every = ("train.checkpoint_every=1", f"train.keep_last={FINAL}")
    for nproc, entry in ((1, "dinospec-train"), (2, "launch-local-nproc2")):
        run_dir = base / f"nproc{nproc}"
        config = _config(run_dir, nproc)
        run_to_end(entry, run_dir, config, f"train.max_iterations={FINAL}", *every)
        found[nproc] = run_dir
    return found


def _assert_same_checkpoint(run_dir: Path, reference: Path, iteration: int) -> None:
    """The shards (student, teacher, optimizer, centers, progress) equal byte for byte."""
    name = f"checkpoints/iter_{iteration:08d}"
    shards = sorted((reference / name).glob("*.distcp"))
    assert [p.name for p in shards] == sorted(p.name for p in (run_dir / name).glob("*.distcp"))
    for shard in shards:
        assert shard.read_bytes() == (run_dir / name / shard.name).read_bytes(), shard.name


def _target(entry: str, signum: int) -> str:
    """Whom the signal reaches. A terminal's Ctrl-C and SLURM's scancel and --signal reach
    every process, data-loader workers included; `kill` of the launcher reaches only it,
    which must pass the request on to its processes."""
    if entry == "launch-local-nproc2" and signum == signal.SIGTERM:
        return "launcher"
    return "group"


@pytest.mark.slow
@pytest.mark.parametrize("name", SIGNALS)
@pytest.mark.parametrize(
    "entry", ["dinospec-train", "launch-local", "launch-local-nproc2", "slurm-job"]
)
def test_a_signal_checkpoints_and_the_resumed_run_is_exact(entry, name, tmp_path, references):
    """The checkpoint at the signal is the uninterrupted run's at that iteration; resuming
    from it (once per entry point, after SIGTERM) ends with the uninterrupted run's
    losses and weights."""
    signum = SIGNALS[name]
    nproc = 2 if entry == "launch-local-nproc2" else 1
    run_dir = tmp_path / "run"
    config = _config(run_dir, nproc)
    run = start(entry, run_dir, config)
    try:
        run.wait_for_metrics()
        if _target(entry, signum) == "launcher":
            os.kill(run.pid, signum)
        else:
            run.signal_group(signum)
        status = run.wait()
    finally:
        run.kill()
    output = run.output()
    assert status == 0, output
    assert "DataLoader worker" not in output and "Traceback" not in output, output
    stopped = read_metrics(run_dir)[-1]["iteration"]
    assert 0 < stopped < FINAL, output
    written = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert written == [f"iter_{stopped:08d}"], output
    assert f"checkpoint at iteration {stopped} written" in output
    if entry == "slurm-job" and signum == signal.SIGUSR2:
        assert "written, requeueing" in output and "submitit: requeue requested" in output
    _assert_same_checkpoint(run_dir, references[nproc], stopped)
    if signum != signal.SIGTERM:
        return
    resumed = run_to_end(entry, run_dir, config, f"train.max_iterations={FINAL}")
    assert f"resumed from iteration {stopped}" in resumed.output()
    assert _losses(run_dir) == _losses(references[nproc])
    _assert_same_teacher(run_dir, references[nproc])


SLOW_SAVE = """
import sys, time
from pathlib import Path
from dinospec.cli import main
from dinospec.train.loop import Trainer

def slow_checkpoint(self, iteration):
    (self.run_dir / "saving").write_text(str(iteration))
    time.sleep(120)

Trainer.checkpoint = slow_checkpoint
sys.exit(main(["train", *sys.argv[1:]]))
"""
"""`dinospec train` whose checkpoint takes two minutes, as a large model's can."""


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """Ctrl-C, then Ctrl-C again while the run writes its checkpoint: it exits within
    seconds (status 130, one line, no traceback), leaving no checkpoint behind."""
    run_dir = tmp_path / "run"
    config = _config(run_dir)
    run = Run([sys.executable, "-c", SLOW_SAVE, str(config)], run_dir, {})
    try:
        run.wait_for_metrics()
        run.signal_group(signal.SIGINT)
        _wait_for(run_dir / "saving", run)
        second = time.monotonic()
        run.signal_group(signal.SIGINT)
        status = run.wait(timeout=30)
        took = time.monotonic() - second
    finally:
        run.kill()
    assert status == 130, run.output()
    assert took < 10, took
    assert "stopped by a second Ctrl-C, without a checkpoint" in run.err.read_text()
    assert "Traceback" not in run.output()
    assert list_checkpoints(run_dir / "checkpoints") == []


def _wait_for(path: Path, run: Run, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and run.process.poll() is None, run.output()
        time.sleep(0.05)


def test_data_loader_workers_ignore_stop_signals(tmp_path):
    """The signals that reach every process of a job leave the workers running: the main
    process stops the run and shuts them down itself."""
    config = tiny_config(tmp_path / "run", *WORKERS)
    loader = build_loader(config, build_image_dataset(config), 0, 1, 0)
    next(loader)
    workers = [worker.pid for worker in loader._workers]
    for signum in SIGNALS.values():
        for pid in workers:
            os.kill(pid, signum)
    time.sleep(0.5)
    for _ in range(4):
        next(loader)
    assert all(worker.is_alive() for worker in loader._workers)
    assert [worker.pid for worker in loader._workers] == workers
    loader._shutdown_workers()


def test_a_second_sigint_raises_at_once_and_handlers_are_restored():
    before = {signum: signal.getsignal(signum) for signum in SIGNALS.values()}
    stop = StopRequest()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.action == STOP and stop.agreed() == STOP
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {signum: signal.getsignal(signum) for signum in SIGNALS.values()} == before
