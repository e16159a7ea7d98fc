"""`dinospec sweep SWEEP.yaml`, plugged into the `dinospec` command through the
`dinospec.commands` entry-point group (also `python -m launch.sweep.cli`):

    dinospec sweep configs/sweeps/specialization_cpu.yaml --parallel 2
    dinospec sweep configs/sweeps/specialization_vits14_in1k.yaml --slurm --partition gpu
    dinospec sweep SWEEP.yaml --dry-run [--slurm ...]    # the job plan; nothing runs
    dinospec sweep SWEEP.yaml --report                   # the table from the cells done

Every cell's configs are loaded before anything runs: a problem is one line on stderr
naming the sweep file and its entry, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from launch.cli import LaunchError
from launch.submit import add_resource_options
from launch.sweep.spec import read_sweep

PROG = "dinospec sweep"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sweep_file", help="sweep YAML, e.g. configs/sweeps/specialization_cpu.yaml"
    )
    mode = parser.add_argument_group("what to do (default: run the cells here)")
    mode.add_argument("--parallel", type=int, default=1, help="cells at a time when local")
    mode.add_argument("--slurm", action="store_true", help="submit the cells as a job array")
    mode.add_argument("--dry-run", action="store_true", help="print the job plan, run nothing")
    mode.add_argument(
        "--report", action="store_true", help="write the table from the cells done, run nothing"
    )
    actions = add_resource_options(parser)
    parser.set_defaults(**{action.dest: None for action in actions})
    parser.epilog = (
        "With --slurm, resources come from the sweep file's slurm: block; options given "
        "here override it (per array task, i.e. per cell)."
    )


def run(args: argparse.Namespace) -> int:
    """Check everything, then report, print the plan, run or submit."""
    from launch.sweep import local, slurm
    from launch.sweep.check import check_configs, input_problems
    from launch.sweep.report import write_report
    from launch.sweep.spec import resource_options

    sweep = read_sweep(args.sweep_file)
    if args.report:
        for path in write_report(sweep):
            print(path)
        return 0
    check_configs(sweep)
    given = {dest: getattr(args, dest) for dest in resource_options()}
    chosen = slurm.resources(sweep, given) if args.slurm else None
    problems = input_problems(sweep)
    if args.dry_run:
        print("\n".join(slurm.plan(sweep, chosen, args.parallel)))
        for problem in problems:
            print(f"warning: not found here (a run would refuse to start): {problem}")
        return 0
    if problems:
        raise LaunchError("inputs not found: " + "; ".join(problems))
    if chosen is not None:
        options = [f"--{k.replace('_', '-')}={v}" for k, v in given.items() if v is not None]
        return slurm.submit(sweep, chosen, [PROG, args.sweep_file, "--slurm", *options])
    return local.run_local(sweep, args.parallel)


def handle(args: argparse.Namespace) -> int:
    """Problems the user can fix are one line and status 2; nothing has started then."""
    try:
        return run(args)
    except LaunchError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: stopped by a second Ctrl-C; the same command resumes", file=sys.stderr)
        return 130


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sweep` to a command's subparsers."""
    parser = subparsers.add_parser(
        "sweep", help="a grid of training runs x seeds, their evaluations and one table"
    )
    add_arguments(parser)
    parser.set_defaults(func=handle)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep.cli", description=__doc__)
    add_arguments(parser)
    return handle(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
