"""Training runs in their own process, started as a user or a scheduler starts them, for
tests that signal, kill or race them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_helpers import tiny_config

from dinospec.config import config_to_yaml

REPO = Path(__file__).resolve().parents[2]
LONG = ("optim.epochs=200", "train.checkpoint_every=1000")
"""800 iterations and no periodic checkpoint before them: a run only stops, and only
checkpoints, when a test makes it."""

SLURM_JOB = """
import signal, sys
from dinospec.config import load_config
from launch.train_job import TrainJob

def requeue(signum, frame):
    print("submitit: requeue requested", flush=True)
    sys.exit(0)

signal.signal(signal.SIGUSR2, requeue)
TrainJob(load_config(sys.argv[1], sys.argv[2:]))()
"""
"""A SLURM task as submitit runs it: TrainJob under SLURM's variables, with a SIGUSR2
handler standing in for submitit's requeue."""
SLURM_ENV = {
    "SLURM_JOB_ID": "7",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "localhost",
}

ENTRY_POINTS = {
    "dinospec-train": [sys.executable, "-m", "dinospec.cli", "train"],
    "launch-local": [sys.executable, "-m", "launch.local", "train"],
    "launch-local-nproc2": [sys.executable, "-m", "launch.local", "train", "--nproc", "2"],
    "slurm-job": [sys.executable, "-c", SLURM_JOB],
}


def write_config(run_dir: Path, *overrides: str) -> Path:
    """The tiny model's config, fully spelled out, beside the run directory."""
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(config_to_yaml(tiny_config(run_dir, *overrides)))
    return path


class Run:
    """One training process in a session of its own (its process group, data-loader
    workers included, is what a terminal's Ctrl-C or SLURM's scancel reaches); stdout and
    stderr go to files beside the run directory."""

    def __init__(self, command: list[str], run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.out = run_dir.parent / f"{run_dir.name}.out"
        self.err = run_dir.parent / f"{run_dir.name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, env={**os.environ, **env}, cwd=REPO,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_metrics(self, lines: int = 1, timeout: float = 180) -> None:
        """Until the run has logged `lines` iterations, i.e. is well inside its loop."""
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"run ended before logging: {self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no {lines} metrics line(s) after {timeout}s: {self.output()}")

    def signal_group(self, signum: int) -> None:
        """As a terminal (Ctrl-C) or scancel does: every process of the run."""
        os.killpg(self.process.pid, signum)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run still going after {timeout}s: {self.output()}") from None

    def kill(self) -> None:
        """SIGKILL to the whole group, so that no test leaves a process behind."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.process.wait()

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()


def start(entry: str, run_dir: Path, config: Path, *overrides: str) -> Run:
    """One of ENTRY_POINTS training `config` (whose run directory is `run_dir`)."""
    env = SLURM_ENV if entry == "slurm-job" else {}
    return Run([*ENTRY_POINTS[entry], str(config), *overrides], run_dir, env)


def run_to_end(entry: str, run_dir: Path, config: Path, *overrides: str) -> Run:
    run = start(entry, run_dir, config, *overrides)
    assert run.wait() == 0, run.output()
    return run
