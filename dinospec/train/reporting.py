"""Where a run's numbers go: one record per logged iteration and per evaluation into
metrics.jsonl, the same into TensorBoard, a console line each, and a summary at the end.

Only rank 0 writes; every rank builds the records, since the values in them were reduced
over the ranks.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dinospec.run.layout import RunDir
from dinospec.train.evaluation import EvalReport
from dinospec.train.metrics_log import LogWindow, collapse_warnings, format_duration
from dinospec.train.progress import ProgressDisplay, RunSummary
from dinospec.train.tensorboard import open_board

SCHEDULE_KEYS = ("lr", "backbone_lr", "wd", "momentum", "teacher_temp")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory of the device, or the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunReporter:
    """The outputs of one process's stretch of a run, from `start` to `stop`."""

    def __init__(
        self,
        layout: RunDir,
        is_main: bool,
        start: int,
        stop: int,
        extra_fields: dict[str, int],
    ) -> None:
        self.layout = layout
        self.is_main = is_main
        self.start, self.stop = start, stop
        self.extra_fields = extra_fields
        self.display = ProgressDisplay(start, stop, is_main)
        self.board = open_board(layout.tensorboard, start) if is_main else None
        self.started = time.perf_counter()
        self.last_losses: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    def write(self, line: str) -> None:
        self.display.write(line)

    def advance(self, loss: float | None) -> None:
        self.display.advance(loss)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.layout.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            self.board.add_record(record)

    def log_step(
        self,
        iteration: int,
        losses: dict[str, float],
        monitor: dict[str, Tensor],
        values: dict[str, float],
        window: LogWindow,
        global_batch: int,
        device: torch.device,
        warmup_end: int,
    ) -> None:
        """The record of a logged iteration: every loss term, their mean since the last
        record, schedules, collapse monitor, speed, memory and ETA."""
        observed = {k: float(v) for k, v in monitor.items()}
        iters = max(window.iterations, 1)
        per_iter = (time.perf_counter() - window.start) / iters
        record = {
            "iteration": iteration,
            **self.extra_fields,
            "loss": sum(losses.values()),
            "loss_window_mean": statistics.fmean(window.losses),
            **{f"loss_{k}": v for k, v in losses.items()},
            **{k: values[k] for k in SCHEDULE_KEYS},
            **observed,
            "images_per_s": global_batch / per_iter,
            "data_time_s": window.data_time / iters,
            "iter_time_s": per_iter,
            "peak_memory_mb": peak_memory_mb(device),
            "eta_s": per_iter * (self.stop - iteration),
        }
        self.last_losses = {"loss": record["loss"], **{f"loss_{k}": v for k, v in losses.items()}}
        if not self.is_main:
            return
        self._append(record)
        terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        self.write(
            f"it {iteration}/{self.stop} loss {record['loss']:.4f} ({terms}) mean of last "
            f"{len(window.losses)} {record['loss_window_mean']:.4f} lr {values['lr']:.2e} "
            f"wd {values['wd']:.3f} mom {values['momentum']:.4f} T {values['teacher_temp']:.3f} "
            f"| {record['images_per_s']:.1f} img/s data {record['data_time_s']:.3f}s "
            f"mem {record['peak_memory_mb']:.0f}MB eta {format_duration(record['eta_s'])}"
        )
        for warning in collapse_warnings(iteration, observed, warmup_end):
            self.write(warning)

    def log_eval(self, report: EvalReport) -> None:
        """An evaluation's record (its own line of metrics.jsonl, at its iteration) and the
        PCA picture on TensorBoard."""
        self.last_eval = dict(report.metrics)
        if not self.is_main:
            return
        self._append({"iteration": report.iteration, **self.extra_fields, **report.metrics})
        if self.board is not None and report.picture is not None:
            self.board.add_picture(report.picture, report.iteration)
        shown = " ".join(
            f"{k.removeprefix('eval_')} {100 * v:.2f}" if k != "eval_time_s" else f"({v:.1f}s)"
            for k, v in report.metrics.items()
        )
        self.write(f"eval at it {report.iteration}: {shown}")

    def finish(self, checkpoint: Path | None) -> RunSummary:
        """The closing summary, printed by rank 0; the bar and the board are closed."""
        self.display.close()
        summary = RunSummary(
            start=self.start,
            stop=self.stop,
            wall_s=time.perf_counter() - self.started,
            losses=self.last_losses,
            evaluation=self.last_eval,
            checkpoint=checkpoint,
            exports=self.layout.exports,
            metrics=self.layout.metrics,
            tensorboard=self.layout.tensorboard if self.board is not None else None,
        )
        for line in summary.lines():
            self.write(line)
        self.close()
        return summary

    def close(self) -> None:
        self.display.close()
        if self.board is not None:
            self.board.close()
            self.board = None
