"""The cells of a sweep on this machine: one after another, or N at a time, each in its
own process whose output goes to its `cell.log`. A failed cell does not stop the others;
the sweep ends with the list of failed cells and their logs, and the report.

The sweep holds its directory's lock (dinospec.run.lock) while it runs, so a second
sweep into it is refused. SIGINT, SIGTERM and SIGUSR2 are passed on to the running cells
as in `launch.local` (their training stops after its step with a checkpoint), no further
cell starts, and the same command resumes; a second Ctrl-C kills the cells at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType

import torch

from dinospec.run.lock import RunDirLocked, lock_run_dir
from dinospec.train.signals import ACTIONS
from launch.local import SignalForwarder
from launch.sweep.record import (
    DONE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    claim_directory,
    read_record,
    write_record,
)
from launch.sweep.report import write_report
from launch.sweep.slurm import refuse_active_jobs
from launch.sweep.spec import Cell, Sweep, SweepError
from launch.sweep.stages import cell_is_done

POLL_S = 0.2


@dataclass
class Outcome:
    cell: Cell
    status: str  # done, failed, interrupted
    error: str | None
    seconds: float


class StopRequest:
    """The first stop signal: remember it and pass it on (SignalForwarder); no cell starts
    after it."""

    def __init__(self) -> None:
        self.forward = SignalForwarder([])
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.forward(signum, frame)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m{s:02d}s"


def _exit_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the cell process was killed by {name}{hint}"
    return f"the cell process exited with status {code}"


class CellProcesses:
    """Starts cells as processes in `parallel` slots and collects their outcomes."""

    def __init__(self, sweep: Sweep, parallel: int) -> None:
        self.sweep = sweep
        self.parallel = parallel
        self.stop = StopRequest()

    def environment(self, slot: int) -> dict[str, str]:
        """Parallel cells share the CPU cores out, and get one GPU each where there are
        enough."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.parallel == 1:
            return env
        gpus = torch.cuda.device_count()
        if gpus >= self.parallel:
            visible = env.get("CUDA_VISIBLE_DEVICES")
            devices = visible.split(",") if visible else [str(i) for i in range(gpus)]
            env["CUDA_VISIBLE_DEVICES"] = devices[slot]
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.parallel)))
        return env

    def start(self, cell: Cell, slot: int) -> subprocess.Popen:
        cell.directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "launch.sweep.cell", str(self.sweep.path), cell.key]
        with open(cell.log, "a") as log:
            log.write(f"\n===== {datetime.now().isoformat(timespec='seconds')} sweep "
                      f"{self.sweep.name}: cell {cell.key}\n")  # fmt: skip
            log.flush()
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(slot),
            )

    def outcome(self, cell: Cell, code: int, seconds: float) -> Outcome:
        record = read_record(cell) or {}
        if code == 0 and record.get("status") == DONE:
            return Outcome(cell, DONE, None, seconds)
        if self.stop.requested:
            return Outcome(cell, INTERRUPTED, None, seconds)
        error = record.get("error") if record.get("status") == FAILED else None
        if error is None:
            error = _exit_reason(code)
            write_record(cell, FAILED, record.get("metrics", {}), error, str(cell.log))
        return Outcome(cell, FAILED, error, seconds)

    def run(self, cells: list[Cell]) -> list[Outcome]:
        previous = {signum: signal.signal(signum, self.stop) for signum in ACTIONS}
        try:
            return self._loop(cells)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _loop(self, cells: list[Cell]) -> list[Outcome]:
        queue, outcomes = list(cells), []
        running: dict[int, tuple[subprocess.Popen, Cell, float]] = {}
        while queue or running:
            for slot in range(self.parallel):
                if slot not in running and queue and not self.stop.requested:
                    cell = queue.pop(0)
                    process = self.start(cell, slot)
                    running[slot] = (process, cell, time.monotonic())
                    self.stop.forward.pids.append(process.pid)
                    print(f"[{len(outcomes) + len(running)}/{len(cells)}] {cell.key}: started "
                          f"(log: {cell.log})", flush=True)  # fmt: skip
            finished = [slot for slot, (p, _, _) in running.items() if p.poll() is not None]
            for slot in finished:
                process, cell, start = running.pop(slot)
                self.stop.forward.pids.remove(process.pid)
                outcome = self.outcome(cell, process.returncode, time.monotonic() - start)
                outcomes.append(outcome)
                print(self.describe(outcome), flush=True)
            if self.stop.requested and not running:
                break
            if not finished:
                time.sleep(POLL_S)
        return outcomes

    def describe(self, outcome: Outcome) -> str:
        took = _duration(outcome.seconds)
        key = outcome.cell.key
        if outcome.status == DONE:
            metrics = (read_record(outcome.cell) or {}).get("metrics", {})
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            return f"{key}: done in {took} {shown}"
        if outcome.status == FAILED:
            return f"{key}: FAILED after {took}: {outcome.error} (log: {outcome.cell.log})"
        return f"{key}: interrupted after {took} (log: {outcome.cell.log})"


def run_local(sweep: Sweep, parallel: int) -> int:
    """Run every cell that is not done; 0 when all are done at the end, 1 otherwise."""
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    refuse_active_jobs(sweep.output_dir)
    try:
        lock = lock_run_dir(sweep.output_dir)
    except RunDirLocked as err:
        raise SweepError(str(err).replace("another run", "another sweep or run")) from err
    with lock:
        claim_directory(sweep)
        cells = sweep.cells()
        todo = [cell for cell in cells if not cell_is_done(sweep, cell, read_record(cell))]
        for cell in todo:
            if (read_record(cell) or {}).get("status") == RUNNING:
                print(f"{cell.key}: its last run ended without a record; it runs again")
        print(
            f"sweep {sweep.name}: {len(cells)} cells under {sweep.output_dir}, "
            f"{len(cells) - len(todo)} done, {len(todo)} to run ({parallel} at a time)",
            flush=True,
        )
        processes = CellProcesses(sweep, parallel)
        outcomes = processes.run(todo)
        reports = write_report(sweep)
    return summarize(sweep, outcomes, processes.stop.requested, reports)


def summarize(sweep: Sweep, outcomes: list[Outcome], stopped: bool, reports: list[Path]) -> int:
    failed = [o for o in outcomes if o.status == FAILED]
    done = sum(cell_is_done(sweep, c, read_record(c)) for c in sweep.cells())
    print(f"sweep {sweep.name}: {done} of {len(sweep.cells())} cells done; report: "
          f"{', '.join(str(p) for p in reports)}", flush=True)  # fmt: skip
    for outcome in failed:
        print(f"failed: {outcome.cell.key}: {outcome.error} (log: {outcome.cell.log})")
    if stopped:
        print("sweep interrupted: the same command resumes it", file=sys.stderr)
    if failed:
        print(f"{len(failed)} cell(s) failed; fix them and rerun the same command "
              "(done cells are skipped)", file=sys.stderr)  # fmt: skip
    return 0 if done == len(sweep.cells()) else 1
