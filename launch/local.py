"""Run a job on this machine without SLURM:

    python -m launch.local train CONFIG --nproc N [key=value ...]

N processes (gloo on CPU, one GPU each with NCCL) joined through torchrun's variables, the
same job and the same run directory layout as `launch.submit`; running it again resumes.
The launcher holds the run directory's lock for its processes. SIGTERM, SIGINT (Ctrl-C) and
SIGUSR2 stop the job after its current step with a checkpoint (exit status 0); a second
Ctrl-C kills it at once (130).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker
from types import FrameType
from typing import Any

import torch
import torch.multiprocessing as mp

from dinospec.config import ConfigError
from dinospec.models.checkpoints import CheckpointError
from dinospec.run.lock import RunDirLocked, lock_run_dir
from dinospec.train.signals import ACTIONS
from launch.cli import LaunchError, job_parser, load_checked, split_job_type
from launch.jobs import JobType
from launch.submissions import record_submission, resume_message, write_config

PROG = "python -m launch.local"


def build_parser(job: JobType) -> argparse.ArgumentParser:
    parser = job_parser(PROG, job)
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes (one per GPU when there are GPUs)"
    )
    return parser


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {nproc}")
    gpus = torch.cuda.device_count()
    if gpus and nproc > gpus:
        raise LaunchError(f"--nproc={nproc} but this machine has {gpus} GPU(s)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_rank(rank: int, world_size: int, port: int) -> None:
    """Give this process the variables torchrun gives a rank on one host, which
    init_distributed reads to join the group."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _worker(rank: int, nproc: int, port: int, job: Callable[[], Any]) -> None:
    """One process of the group; CPU threads are shared out so processes do not fight.
    Its data-loader workers are forked, as a torchrun or srun rank's are (a spawned
    process starts with `spawn` as its default): a spawned worker needs a picklable
    dataset and imports torch for seconds, during which a stop signal would kill it."""
    multiprocessing.set_start_method("fork", force=True)
    join_as_rank(rank, nproc, port)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    job()


class SignalForwarder:
    """Passes the launcher's stop signals on to its processes, which stop after their step
    with a checkpoint (dinospec.train.signals). A terminal's Ctrl-C reaches them directly,
    `kill -INT` of the launcher does not: so a first SIGINT goes on as SIGTERM, which asks
    for the same stop without counting as a second Ctrl-C where the terminal's came too.
    A second SIGINT kills them at once."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.interrupted = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.interrupted:
            self._send(signal.SIGKILL)
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            self.interrupted = True
            signum = signal.SIGTERM
        self._send(signum)

    def _send(self, signum: int) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue


def start_resource_tracker() -> None:
    """multiprocessing's resource tracker, which the spawned processes share, ignores
    SIGINT and SIGTERM but would die of a SIGUSR2 sent to the whole process group (SLURM's
    `--signal`, `kill -USR2 -PGID`) and leak shared memory; started with SIGUSR2 ignored,
    it keeps ignoring it."""
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def run_processes(task: Callable[[], Any], nproc: int) -> None:
    """`task` in `nproc` processes, with the launcher's stop signals forwarded to them."""
    start_resource_tracker()
    context = mp.spawn(_worker, args=(nproc, free_port(), task), nprocs=nproc, join=False)
    forward = SignalForwarder([process.pid for process in context.processes])
    previous = {signum: signal.signal(signum, forward) for signum in ACTIONS}
    try:
        while not context.join():
            continue
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_local(job: JobType, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Validate, lock and prepare the run directory, run the job in `--nproc` processes."""
    check_nproc(args.nproc)
    config = load_checked(job, args)
    output_dir = job.output_dir(config)
    try:
        lock = lock_run_dir(output_dir)
    except RunDirLocked as err:
        raise LaunchError(str(err)) from err
    with lock:
        print(resume_message(output_dir, job.progress(output_dir)), flush=True)
        write_config(output_dir, job.config_text(config))
        command = [PROG, *argv]
        submission = {"job_id": None, "launcher": "local", "nproc": args.nproc, "command": command}
        record_submission(output_dir, job.name, submission)
        task = job.job(config)
        if args.nproc == 1:
            task()
        else:
            run_processes(task, args.nproc)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job, rest = split_job_type(argv, PROG, build_parser)
    args = build_parser(job).parse_intermixed_args(rest)
    try:
        run_local(job, args, argv)
    except LaunchError as err:
        print(f"{PROG}: error: {err}\nnothing was started", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:
            raise
        print(f"{PROG}: error: {err.strerror}: {err.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: stopped by a second Ctrl-C, without a checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
