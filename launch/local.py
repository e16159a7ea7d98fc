"""Run a job on this machine without SLURM:

    python -m launch.local train CONFIG --nproc N [key=value ...]

N processes (gloo on CPU, one GPU each with NCCL) joined through torchrun's variables, the
same job and the same run directory layout as `launch.submit`; running it again resumes.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

from launch.cli import LaunchError, job_parser, load_checked, split_job_type
from launch.jobs import JobType
from launch.rundir import record_submission, resume_message, write_config

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
    """One process of the group; CPU threads are shared out so processes do not fight."""
    join_as_rank(rank, nproc, port)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    job()


def run_local(job: JobType, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Validate, prepare the run directory, run the job in `--nproc` processes."""
    check_nproc(args.nproc)
    config = load_checked(job, args)
    output_dir = job.output_dir(config)
    print(resume_message(output_dir, job.progress(output_dir)), flush=True)
    write_config(output_dir, job.config_text(config))
    record_submission(
        output_dir,
        job.name,
        {"job_id": None, "launcher": "local", "nproc": args.nproc, "command": [PROG, *argv]},
    )
    task = job.job(config, preemptible=False)
    if args.nproc == 1:
        task()
        return
    mp.spawn(_worker, args=(args.nproc, free_port(), task), nprocs=args.nproc)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job, rest = split_job_type(argv, PROG)
    args = build_parser(job).parse_intermixed_args(rest)
    try:
        run_local(job, args, argv)
    except LaunchError as err:
        print(f"{PROG}: error: {err}\nnothing was started", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
