"""The cells of a sweep as one SLURM job array (one array task per cell: train, then
evaluate, on the resources of the sweep file's `slurm:` block and the command line), and
a report job that runs once the array has ended, whatever its tasks' outcome (afterany).

Only cells not done are submitted, so submitting again resumes the sweep; a sweep whose
jobs are still queued or running, or that a local sweep holds, is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinospec.run.layout import RunDir
from dinospec.run.lock import RunDirLocked, lock_run_dir
from launch.jobs import JOB_TYPES
from launch.submissions import read_job_file, record_submission
from launch.submit import (
    SLURM_OPTIONS,
    active_jobs,
    executor_parameters,
    make_executor,
    refuse_if_in_use,
    tasks_per_node,
)
from launch.sweep.cell import CellJob
from launch.sweep.record import claim_directory, read_record
from launch.sweep.report import write_report
from launch.sweep.spec import Cell, Sweep, SweepError, resource_options
from launch.sweep.stages import cell_is_done

REPORT_TIMEOUT_MIN = 60


class ReportJob:
    """Picklable report job: the table and the plot from the cells' records."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep

    def __call__(self) -> list[str]:
        return [str(path) for path in write_report(self.sweep)]


def resources(sweep: Sweep, given: dict[str, Any]) -> argparse.Namespace:
    """`launch.submit`'s defaults, then the sweep file's `slurm:` block, then the options
    given on the command line (None where not given)."""
    values = {dest: action.default for dest, action in resource_options().items()}
    values.update(sweep.slurm)
    values.update({dest: value for dest, value in given.items() if value is not None})
    if values["job_name"] is None:
        values["job_name"] = f"dinospec-sweep-{sweep.name}"
    chosen = argparse.Namespace(**values)
    tasks_per_node(chosen)
    return chosen


def describe(chosen: argparse.Namespace) -> str:
    gpus = f", {chosen.gpus_per_node} GPU(s) per node" if chosen.gpus_per_node else ""
    where = f", partition {chosen.partition}" if chosen.partition else ""
    return (
        f"{chosen.nodes} node(s) x {tasks_per_node(chosen)} task(s){gpus}, "
        f"{chosen.timeout} min{where}"
    )


def plan(sweep: Sweep, chosen: argparse.Namespace | None, parallel: int = 1) -> list[str]:
    """The job plan of a dry run: the sweep, then one line per cell, then the report."""
    cells = sweep.cells()
    done = {cell.key for cell in cells if cell_is_done(sweep, cell, read_record(cell))}
    common = " ".join(sweep.overrides) or "none"
    where = describe(chosen) if chosen else f"local, {parallel} cell process(es) at a time"
    lines = [
        f"sweep {sweep.name}: {len(cells)} cells under {sweep.output_dir}, {len(done)} done, "
        f"{len(cells) - len(done)} to run; {where}",
        f"training config {sweep.train_config}, overrides for every cell: {common}",
    ]
    for evaluation in sweep.evaluations:
        extra = " ".join(evaluation.overrides) or "no overrides"
        lines.append(
            f"evaluation {evaluation.name} ({evaluation.kind}): {evaluation.config} {extra}"
        )
    names = ", ".join(e.name for e in sweep.evaluations)
    for cell in cells:
        status = "done" if cell.key in done else "to run"
        step = "initialize" if cell.random_init else "train"
        own = " ".join([*sweep.variants[cell.variant], *cell.point, f"train.seed={cell.seed}"])
        lines.append(
            f"cell {cell.key} [{status}] {step}: {own} | evaluate: {names} | {cell.directory}"
        )
    if chosen is not None:
        lines.append(
            f"report job: 1 task, {REPORT_TIMEOUT_MIN} min, after every array task (afterany)"
        )
    return lines


def refuse_active_jobs(output_dir: Path) -> None:
    """Jobs this sweep submitted that SLURM still has queued or running."""
    submissions = read_job_file(output_dir)["submissions"]
    ids = [job for s in submissions for job in [s.get("job_id"), *s.get("cells", {}).values()]]
    busy = active_jobs([str(job) for job in ids if job is not None])
    if busy:
        raise SweepError(
            f"SLURM job(s) {', '.join(busy)} of this sweep are still queued or running in "
            f"{output_dir}: wait for them or scancel them"
        )


def report_parameters(chosen: argparse.Namespace, array_id: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": f"{chosen.job_name}-report",
        "nodes": 1,
        "tasks_per_node": 1,
        "timeout_min": REPORT_TIMEOUT_MIN,
        "slurm_additional_parameters": {"dependency": f"afterany:{array_id}"},
    }
    for name in SLURM_OPTIONS:
        if getattr(chosen, name) is not None:
            params[f"slurm_{name}"] = getattr(chosen, name)
    return params


def submit(sweep: Sweep, chosen: argparse.Namespace, command: Sequence[str]) -> int:
    """Submit the cells not done as one array and the report job after it."""
    refuse_if_in_use(sweep.output_dir)
    refuse_active_jobs(sweep.output_dir)
    parameters = executor_parameters(JOB_TYPES["train"], chosen)
    try:
        lock = lock_run_dir(sweep.output_dir)
    except RunDirLocked as err:
        raise SweepError(str(err)) from err
    with lock:
        claim_directory(sweep)
        todo = [c for c in sweep.cells() if not cell_is_done(sweep, c, read_record(c))]
        if not todo:
            reports = write_report(sweep)
            print(f"all {len(sweep.cells())} cells are done; report: {reports[0]}")
            return 0
        logs = RunDir(sweep.output_dir).submitit_logs
        executor = make_executor(logs, parameters, chosen.max_timeouts)
        with executor.batch():
            handles = [executor.submit(CellJob(sweep, cell.key)) for cell in todo]
        array_id = handles[0].job_id.split("_")[0]
        report = make_executor(logs, report_parameters(chosen, array_id), 0)
        report_id = report.submit(ReportJob(sweep)).job_id
        _record(sweep, todo, [h.job_id for h in handles], report_id, command, parameters)
    print(
        f"submitted the job array {array_id} ({len(todo)} cell(s), {describe(chosen)} each) "
        f"and the report job {report_id} after it; logs in {logs}",
        flush=True,
    )
    return 0


def _record(
    sweep: Sweep,
    cells: list[Cell],
    job_ids: list[str],
    report_id: str,
    command: Sequence[str],
    parameters: dict[str, Any],
) -> None:
    """`job.json` in the sweep directory (the report job, every cell's job) and in each
    cell's directory (its job and rank 0's log)."""
    logs = RunDir(sweep.output_dir).submitit_logs
    for cell, job_id in zip(cells, job_ids, strict=True):
        cell.directory.mkdir(parents=True, exist_ok=True)
        record_submission(
            cell.directory,
            "sweep-cell",
            {"job_id": job_id, "log": str(logs / f"{job_id}_0_log.out")},
        )
    record_submission(
        sweep.output_dir,
        "sweep",
        {
            "job_id": report_id,
            "cells": {cell.key: job_id for cell, job_id in zip(cells, job_ids, strict=True)},
            "command": list(command),
            "executor": parameters,
        },
    )
