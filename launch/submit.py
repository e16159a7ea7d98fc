"""Submit a job to SLURM through submitit:

    python -m launch.submit train CONFIG [key=value ...] --nodes 2 --gpus-per-node 8 \\
        --partition P [--account A --qos Q --constraint C --timeout MIN --mem GB ...]

One task per GPU (`--tasks-per-node` on CPU-only partitions); the tasks form the process
group from SLURM's variables. The config is validated and its inputs are checked here,
before anything reaches sbatch. The run directory gets the resolved config, the submitit
logs (`submitit/`) and `job.json`; submitting again into it resumes the run.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinospec.run.layout import RunDir
from dinospec.run.lock import holder, locked_message
from launch.cli import LaunchError, job_parser, load_checked, split_job_type
from launch.dry_run import describe_submission
from launch.jobs import JobType
from launch.submissions import read_job_file, record_submission, resume_message, write_config

PROG = "python -m launch.submit"
SLURM_OPTIONS = ("partition", "account", "qos", "constraint", "exclude", "comment")


def add_resource_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The resource and SLURM options of a submission; returned so that another command
    (`dinospec sweep --slurm`) can take the same options and know their defaults."""
    resources = parser.add_argument_group("resources")
    slurm = parser.add_argument_group("SLURM")
    return [
        resources.add_argument("--nodes", type=int, default=1, help="nodes (default 1)"),
        resources.add_argument(
            "--gpus-per-node", type=int, default=0, help="one task per GPU; 0 for CPU-only jobs"
        ),
        resources.add_argument(
            "--tasks-per-node", type=int, help="tasks per node without GPUs (default 1)"
        ),
        resources.add_argument("--cpus-per-task", type=int, help="CPU cores per task"),
        resources.add_argument("--mem", type=float, help="memory per node in GB"),
        resources.add_argument(
            "--timeout", type=int, default=60 * 24, help="time limit in minutes (default 1440)"
        ),
        *(slurm.add_argument(f"--{name}", help=f"sbatch --{name}") for name in SLURM_OPTIONS),
        slurm.add_argument("--job-name", help="default: dinospec-<job type>"),
        slurm.add_argument(
            "--signal-delay",
            type=int,
            default=120,
            help="seconds between SIGUSR2 and the time limit: the grace time to checkpoint",
        ),
        slurm.add_argument(
            "--max-timeouts", type=int, default=100, help="requeues on time-out before giving up"
        ),
    ]


def build_parser(job: JobType) -> argparse.ArgumentParser:
    parser = job_parser(PROG, job)
    add_resource_options(parser)
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="submit one job per combination of the values (a grid) as one job array; "
        "a list value goes in brackets (KEY=[0,1],[0,1,2]); "
        "each job runs in <output dir>/<key-value_...>",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the run directory, processes, command and sbatch script; submit nothing",
    )
    return parser


def tasks_per_node(args: argparse.Namespace) -> int:
    """One task per GPU, or `--tasks-per-node` on CPU nodes."""
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.gpus_per_node == 0:
        tasks = 1 if args.tasks_per_node is None else args.tasks_per_node
        if tasks < 1:
            raise LaunchError(f"--tasks-per-node must be >= 1, got {tasks}")
        return tasks
    if args.tasks_per_node not in (None, args.gpus_per_node):
        raise LaunchError(
            f"--tasks-per-node={args.tasks_per_node} with --gpus-per-node={args.gpus_per_node}:"
            " jobs run one task per GPU"
        )
    return args.gpus_per_node


def executor_parameters(job: JobType, args: argparse.Namespace) -> dict[str, Any]:
    """submitit AutoExecutor parameters. `--kill-on-bad-exit` ends every task when one fails
    instead of leaving the others blocked in a collective."""
    params: dict[str, Any] = {
        "name": args.job_name or f"dinospec-{job.name}",
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node(args),
        "timeout_min": args.timeout,
        "slurm_signal_delay_s": args.signal_delay,
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_additional_parameters": {"requeue": True},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task is not None:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem is not None:
        params["mem_gb"] = args.mem
    for name in SLURM_OPTIONS:
        if getattr(args, name) is not None:
            params[f"slurm_{name}"] = getattr(args, name)
    return params


def active_jobs(job_ids: Sequence[str]) -> list[str]:
    """Which of these jobs SLURM still has queued or running (none where SLURM's client is
    missing: then nothing can have been submitted from here). `-r` lists a job array one
    task per line, so a pending task's id (`123_4`) is found too, not only `123_[4-7]`."""
    if not job_ids or shutil.which("squeue") is None:
        return []
    listed = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout.split()
    return [job_id for job_id in job_ids if job_id in listed]


def refuse_if_in_use(output_dir: Path) -> None:
    """A run holding the directory's lock (a job of another launcher, `launch.local`,
    `dinospec train`) is refused like a queued job, with the message a second run gets."""
    found = holder(output_dir)
    if found is not None:
        raise LaunchError(locked_message(output_dir, found))


def make_executor(folder: Path, parameters: dict[str, Any], max_timeouts: int) -> Any:
    """A SLURM executor; never submitit's silent fallback to running on this machine."""
    import submitit

    if shutil.which("sbatch") is None:
        raise LaunchError(
            "sbatch not found: this machine cannot submit to SLURM "
            "(run the job here with `python -m launch.local`)"
        )
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=max_timeouts
    )
    executor.update_parameters(**parameters)
    return executor


def submit(job: JobType, args: argparse.Namespace, argv: Sequence[str]) -> str | None:
    """Validate, prepare the run directory, submit; returns the job id (None for a dry
    run, which only prints what it would submit)."""
    config = load_checked(job, args)
    parameters = executor_parameters(job, args)
    output_dir = job.output_dir(config)
    if args.dry_run:
        print("\n".join(describe_submission(job, args, config, parameters, argv, PROG)))
        return None
    refuse_if_in_use(output_dir)
    running = active_jobs(read_job_file(output_dir)["job_ids"])
    if running:
        raise LaunchError(
            f"job(s) {', '.join(running)} still queued or running in {output_dir}; "
            "two jobs must not train into one directory (scancel it, or wait)"
        )
    executor = make_executor(RunDir(output_dir).submitit_logs, parameters, args.max_timeouts)
    print(resume_message(output_dir, job.progress(output_dir)), flush=True)
    write_config(output_dir, job.config_text(config))
    submitted = executor.submit(job.job(config))
    record_submission(
        output_dir,
        job.name,
        {"job_id": submitted.job_id, "command": [PROG, *argv], "executor": parameters},
    )
    logs = RunDir(output_dir).submitit_logs / f"{submitted.job_id}_0_log.out"
    print(
        f"submitted job {submitted.job_id} ({args.nodes} node(s) x {parameters['tasks_per_node']}"
        f" task(s)); rank 0 log: {logs}",
        flush=True,
    )
    return submitted.job_id


def sweep_points(specs: Sequence[str]) -> list[list[str]]:
    """Every combination of `KEY=V1,V2,...` specs, as override lists. A value may be a
    list (`[0,1,2]`): commas inside brackets belong to it."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise LaunchError(f"--sweep {spec!r}: expected KEY=V1,V2,...")
        axes.append([f"{key}={value}" for value in _split_values(spec, values)])
    points = [list(point) for point in itertools.product(*axes)]
    names = [point_name(point) for point in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise LaunchError(f"--sweep: points share the run directory name(s) {clashes}")
    return points


def _split_values(spec: str, values: str) -> list[str]:
    if values.count("[") != values.count("]"):
        raise LaunchError(f"--sweep {spec!r}: unbalanced brackets")
    parts = re.split(r",(?![^\[]*\])", values)
    if not all(parts):
        raise LaunchError(f"--sweep {spec!r}: empty value")
    return parts


def point_name(point: Sequence[str]) -> str:
    """A directory name for one sweep point, e.g. `optim.base_lr-0.001_train.seed-1`; the
    items of a list value are joined by '+' (`qkv_blocks-0+1+2`)."""
    name = "_".join(override.replace("=", "-").replace(",", "+") for override in point)
    return re.sub(r"[^A-Za-z0-9._+-]", "", name)


def submit_sweep(job: JobType, args: argparse.Namespace, argv: Sequence[str]) -> list[str]:
    """Validate every point first, then submit all of them as one job array."""
    base = job.output_dir(load_checked(job, args))
    points = sweep_points(args.sweep)
    configs = [
        load_checked(
            job,
            argparse.Namespace(
                **{
                    **vars(args),
                    "overrides": [*args.overrides, *point],
                    "output_dir": str(base / point_name(point)),
                }
            ),
        )
        for point in points
    ]
    parameters = executor_parameters(job, args)
    if args.dry_run:
        print(f"dry run of a job array of {len(configs)} job(s), one per point:")
        for config, point in zip(configs, points, strict=True):
            print(f"  {' '.join(point)} -> {job.output_dir(config)}")
        print("\n".join(describe_submission(job, args, configs[0], parameters, argv, PROG)))
        return []
    for config in configs:
        refuse_if_in_use(job.output_dir(config))
    busy = [
        job_id
        for config in configs
        for job_id in active_jobs(read_job_file(job.output_dir(config))["job_ids"])
    ]
    if busy:
        raise LaunchError(f"job(s) {', '.join(busy)} still queued or running in this sweep")
    executor = make_executor(RunDir(base).submitit_logs, parameters, args.max_timeouts)
    for config in configs:
        write_config(job.output_dir(config), job.config_text(config))
    with executor.batch():
        submitted = [executor.submit(job.job(config)) for config in configs]
    for config, point, handle in zip(configs, points, submitted, strict=True):
        record_submission(
            job.output_dir(config),
            job.name,
            {
                "job_id": handle.job_id,
                "sweep": point,
                "command": [PROG, *argv],
                "executor": parameters,
            },
        )
    print(
        f"submitted a job array of {len(submitted)} job(s) under {base}: "
        + ", ".join(h.job_id for h in submitted),
        flush=True,
    )
    return [h.job_id for h in submitted]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job, rest = split_job_type(argv, PROG, build_parser)
    args = build_parser(job).parse_intermixed_args(rest)
    try:
        if args.sweep:
            submit_sweep(job, args, argv)
        else:
            submit(job, args, argv)
    except LaunchError as err:
        print(f"{PROG}: error: {err}\nnothing was submitted", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
