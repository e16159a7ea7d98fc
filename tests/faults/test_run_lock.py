"""One writer per run directory: while a run trains, a second one started into its
directory (by any entry point) stops before touching it, naming the first one's host and
pid; the lock goes when its holder dies, kill -9 included."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from run_helpers import ENTRY_POINTS, LONG, REPO, Run, run_to_end, start, write_config
from train_helpers import read_metrics, tiny_config

from dinospec.run.lock import RunDirLocked, holder, lock_for_ranks
from launch import submit

HOLD = """
import sys, time
from pathlib import Path
from dinospec.run.lock import lock_run_dir

lock = lock_run_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""
"""A process that holds a run directory's lock and does nothing else."""


class FakeExecutor:
    def submit(self, function):
        raise AssertionError("submitted into a directory in use")


def _refusal(run_dir: Path, first: Run) -> str:
    return f"{run_dir} is in use by another run (pid {first.pid} on host {socket.gethostname()}"


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_stops_and_names_the_first(
    tmp_path, monkeypatch, capsys
):
    """`dinospec train`, `launch.local` and `launch.submit` into the directory of a run
    in progress: each refuses with status 2 before writing anything; the first run's
    metrics hold each iteration once and its config stays."""
    run_dir = tmp_path / "run"
    first = start("dinospec-train", run_dir, write_config(run_dir, *LONG, "train.seed=1"))
    try:
        first.wait_for_metrics()
        config_before = (run_dir / "config.yaml").read_text()
        other = write_config(tmp_path / "other", "train.seed=2", f"train.output_dir={run_dir}")
        for entry in ("dinospec-train", "launch-local"):
            second = _run_foreground(entry, other, "train.max_iterations=3")
            assert second.returncode == 2, second.stdout + second.stderr
            assert _refusal(run_dir, first) in second.stderr
        monkeypatch.setattr(submit, "make_executor", lambda *args: FakeExecutor())
        monkeypatch.setattr(submit, "active_jobs", lambda ids: [])
        assert submit.main(["train", str(other)]) == 2
        assert _refusal(run_dir, first) in capsys.readouterr().err
        assert (run_dir / "config.yaml").read_text() == config_before
        assert not (run_dir / "job.json").exists()
        first.signal_group(signal.SIGTERM)
        assert first.wait() == 0, first.output()
    finally:
        first.kill()
    iterations = [m["iteration"] for m in read_metrics(run_dir)]
    assert iterations == list(range(1, len(iterations) + 1))


def _run_foreground(entry: str, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The second run of the race, to its end."""
    command = [*ENTRY_POINTS[entry], str(config), *overrides]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False
    )


@pytest.mark.slow
def test_the_lock_goes_with_a_run_killed_by_sigkill(tmp_path):
    """A run with data-loader workers is killed with kill -9 (its workers live on for a
    while): the lock is free at once, and the next run trains."""
    run_dir = tmp_path / "run"
    config = write_config(run_dir, *LONG, "data.num_workers=2")
    first = start("dinospec-train", run_dir, config)
    try:
        first.wait_for_metrics()
        assert holder(run_dir)["pid"] == first.pid
        first.process.kill()
        first.process.wait()
        assert holder(run_dir) is None
    finally:
        first.kill()
    again = run_to_end("dinospec-train", run_dir, config, "train.max_iterations=2")
    assert "resuming" not in again.output()


def _rank(rank: int, store: str, run_dir: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        lock_for_ranks(Path(run_dir))
        outcome = "locked"
    except RunDirLocked as err:
        outcome = str(err)
    finally:
        dist.destroy_process_group()
    Path(out, str(rank)).write_text(json.dumps(outcome))


@pytest.mark.slow
def test_every_rank_learns_that_rank_0_found_the_directory_in_use(tmp_path):
    """As in a SLURM job: rank 0 tries the lock, the other ranks stop with it instead of
    waiting in the next collective."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    hold = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert hold.stdout.readline() == "held\n"
        args = (str(tmp_path / "store"), str(run_dir), str(tmp_path))
        mp.spawn(_rank, args=args, nprocs=2)
    finally:
        hold.kill()
        hold.wait()
    rank0, rank1 = (json.loads((tmp_path / str(rank)).read_text()) for rank in (0, 1))
    assert f"pid {hold.pid} on host {socket.gethostname()}" in rank0
    assert "is in use by another run (rank 0 found it locked)" in rank1


def test_a_run_directory_is_free_again_after_its_run(tmp_path):
    """Runs one after the other in one directory (and in one process) do not block."""
    from dinospec.train.loop import train

    for iterations in (1, 2):
        train(tiny_config(tmp_path / "run", f"train.max_iterations={iterations}"))
    assert holder(tmp_path / "run") is None
    assert [m["iteration"] for m in read_metrics(tmp_path / "run")] == [1, 2]
