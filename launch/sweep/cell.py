"""One cell from start to record: train (or initialize), evaluate, write `cell.json`.

Locally each cell is its own process, so that a crash or an out-of-memory kill takes down
that cell only, and its output goes to its `cell.log`:

    python -m launch.sweep.cell SWEEP.yaml vanilla/seed0

On SLURM each task of the sweep's job array runs `CellJob`, the same steps.
Exit status: 0 done, 1 failed (the error is in cell.json and the log), 3 interrupted
(training stopped on a signal with a checkpoint; the same cell resumes), 130 a second
Ctrl-C.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from typing import Any

from launch.sweep.record import (
    DONE,
    FAILED,
    INTERRUPTED,
    RUNNING,
    is_main_process,
    read_record,
    write_record,
)
from launch.sweep.spec import Cell, Sweep, read_sweep
from launch.sweep.stages import CellInterrupted, evaluate, initialize, metric_value, train

EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_KILLED = 0, 1, 3, 130


class CellFailed(RuntimeError):
    """Raised in a SLURM array task whose cell failed, so that SLURM marks it FAILED."""


class EvaluationsFailed(RuntimeError):
    """One or more evaluations of a cell failed; the message names each with its error."""


def run_cell(sweep: Sweep, cell: Cell, metrics: dict[str, float]) -> None:
    """The cell's steps; `metrics` fills as evaluations finish. A failed evaluation does
    not stop the others: its traceback goes to the log and the cell fails at the end."""
    print(f"cell {cell.key} of sweep {sweep.name}", flush=True)
    if cell.random_init:
        initialize(sweep, cell)
    else:
        train(sweep, cell)
    errors = []
    for evaluation in sweep.evaluations:
        try:
            results = evaluate(sweep, cell, evaluation)
            for metric, dotted in evaluation.metrics.items():
                where = f"evaluations.{evaluation.name}.metrics.{metric}"
                metrics[f"{evaluation.name}.{metric}"] = metric_value(results, dotted, where)
        except Exception as err:
            traceback.print_exc()
            errors.append(f"{evaluation.name}: {type(err).__name__}: {err}")
    if errors:
        raise EvaluationsFailed("; ".join(errors))


def _one_line(err: BaseException) -> str:
    text = str(err) if isinstance(err, EvaluationsFailed) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def run_and_record(sweep: Sweep, cell: Cell, log: str) -> int:
    """Run the cell and write its record (rank 0): the exit status of the cell process."""
    main = is_main_process()
    metrics: dict[str, float] = {}

    def record(status: str, error: str | None = None) -> None:
        if main:
            write_record(cell, status, metrics, error, log)

    record(RUNNING)
    try:
        run_cell(sweep, cell, metrics)
    except CellInterrupted as err:
        record(INTERRUPTED, str(err))
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        record(INTERRUPTED, "stopped by a second Ctrl-C")
        return EXIT_KILLED
    except Exception as err:
        if not isinstance(err, EvaluationsFailed):  # their tracebacks are in the log
            traceback.print_exc()
        record(FAILED, _one_line(err))
        return EXIT_FAILED
    record(DONE)
    print(f"cell {cell.key} done: {metrics}", flush=True)
    return EXIT_DONE


class CellJob:
    """Picklable array task of `dinospec sweep --slurm`. On preemption or time-out
    submitit requeues it (`checkpoint`): training resumes from its checkpoint and what was
    done is skipped."""

    def __init__(self, sweep: Sweep, key: str) -> None:
        self.sweep = sweep
        self.key = key

    def __call__(self) -> dict[str, Any] | None:
        import submitit

        cell = self.sweep.cell(self.key)
        log = str(submitit.JobEnvironment().paths.stdout)
        if run_and_record(self.sweep, cell, log) == EXIT_FAILED:
            record = read_record(cell) or {}
            raise CellFailed(f"cell {cell.key}: {record.get('error')}")
        return read_record(cell)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.sweep, self.key))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m launch.sweep.cell SWEEP.yaml CELL", file=sys.stderr)
        return 2
    sweep = read_sweep(args[0])
    cell = sweep.cell(args[1])
    return run_and_record(sweep, cell, str(cell.log))


if __name__ == "__main__":
    sys.exit(main())
