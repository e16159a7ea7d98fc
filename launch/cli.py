"""Command-line pieces shared by `launch.submit` and `launch.local`: the job type as the
first word, then its config, overrides and options in any order; everything is checked on
this machine before a job starts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dinospec.config import ConfigError
from launch.jobs import JOB_TYPES, JobType


class LaunchError(Exception):
    """Something the user can fix; nothing has been submitted or started."""


def split_job_type(
    argv: Sequence[str],
    prog: str,
    parser_for: Callable[[JobType], argparse.ArgumentParser] | None = None,
) -> tuple[JobType, list[str]]:
    """The job type named by the first argument, and the arguments that follow it. Asked
    for help without one, the launcher lists the job types and the arguments they take
    (those of `parser_for`'s parser, the same for every job type)."""
    names = ", ".join(JOB_TYPES)
    usage = f"usage: {prog} {{{names}}} CONFIG [key=value ...] [options]"
    if not argv or argv[0] in ("-h", "--help"):
        lines = [usage, "", "job types:"]
        lines += [f"  {job.name:10} {job.description}" for job in JOB_TYPES.values()]
        if parser_for is not None:
            text = parser_for(next(iter(JOB_TYPES.values()))).format_help()
            lines += ["", text[text.index("positional arguments:") :].rstrip()]
        lines += ["", f"`{prog} JOB --help` shows them for one job type."]
        print("\n".join(lines))
        raise SystemExit(0 if argv else 2)
    if argv[0] not in JOB_TYPES:
        error = f"{prog}: error: unknown job type {argv[0]!r} (known: {names})"
        print(f"{usage}\n{error}", file=sys.stderr)
        raise SystemExit(2)
    return JOB_TYPES[argv[0]], list(argv[1:])


def job_parser(prog: str, job: JobType) -> argparse.ArgumentParser:
    """Config file, overrides and output directory: what every job type takes."""
    parser = argparse.ArgumentParser(prog=f"{prog} {job.name}", description=job.description)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.seed=1")
    parser.add_argument("--output-dir", help="run directory (default: the config's)")
    return parser


def load_checked(job: JobType, args: argparse.Namespace) -> Any:
    """The validated config; every problem (config or missing input) in one LaunchError."""
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise LaunchError(f"overrides must look like key=value, got {bad}")
    try:
        config = job.load(args.config, args.overrides, args.output_dir)
    except ConfigError as err:
        raise LaunchError(f"config error: {err}") from err
    problems = job.problems(config)
    if problems:
        raise LaunchError("inputs not found:\n  " + "\n  ".join(problems))
    return config
