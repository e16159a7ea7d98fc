"""`python -m launch.submit ... --dry-run`: what a submission would do, without doing it.

It prints the run directory, the processes (nodes x tasks, GPUs), what every task runs and
the sbatch script submitit would submit, written by submitit itself from the same
parameters, so what is shown is what would be queued. Nothing is written and nothing
reaches SLURM, so it also works where `sbatch` is missing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinospec.run.layout import RunDir
from launch.jobs import JobType


def sbatch_script(folder: Path, parameters: dict[str, Any]) -> str:
    """The sbatch script submitit would write for these AutoExecutor parameters, made by
    submitit's own functions without an executor (whose constructor wants `srun` on this
    machine). They are not submitit's documented API; should they change, the parameters
    are shown as sbatch options instead."""
    from submitit.slurm import slurm

    try:
        names = slurm.SlurmExecutor._equivalence_dict()
        options = {names.get(k, k.removeprefix("slurm_")): v for k, v in parameters.items()}
        if "mem" in options:
            options["mem"] = slurm._convert_mem(options["mem"])
        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}"
        return slurm._make_sbatch_string(command=command, folder=folder, **options)
    except (AttributeError, TypeError):
        return "\n".join(f"--{k.replace('_', '-')}={v}" for k, v in parameters.items())


def describe_submission(
    job: JobType,
    args: argparse.Namespace,
    config: Any,
    parameters: dict[str, Any],
    argv: Sequence[str],
    prog: str,
) -> list[str]:
    """The lines a dry run prints for one job."""
    output_dir = job.output_dir(config)
    progress = job.progress(output_dir)
    tasks = parameters["tasks_per_node"]
    gpus = parameters.get("gpus_per_node", 0)
    devices = f"{gpus} GPU(s) per node, one per task" if gpus else "no GPU (CPU tasks)"
    overrides = " ".join(args.overrides) or "no overrides"
    command = [prog, *(a for a in argv if a != "--dry-run")]
    return [
        "dry run: nothing was submitted and nothing written",
        f"job type:   {job.name} ({job.description})",
        f"run dir:    {output_dir} ({'resumes from ' + progress if progress else 'new run'})",
        f"processes:  {args.nodes} node(s) x {tasks} task(s) = {args.nodes * tasks}; {devices}",
        f"each task:  the {job.name} job of {args.config} ({overrides})",
        f"submit it:  {' '.join(command)}",
        f"sbatch script (submitit writes it into {RunDir(output_dir).submitit_logs}):",
        sbatch_script(RunDir(output_dir).submitit_logs, parameters),
    ]
