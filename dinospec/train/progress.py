"""What a run prints while it trains and when it ends.

On a terminal a progress bar (tqdm: iterations, rate, ETA, last loss) sits under the log
lines; in a batch log (SLURM, a pipe) there is no bar, only the log line every
`train.log_every` iterations, which carries the same rate and ETA. Only rank 0 prints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from dinospec.train.metrics_log import format_duration


class ProgressDisplay:
    """Log lines, with a bar under them when `stream` is a terminal."""

    def __init__(self, start: int, stop: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(
                total=stop,
                initial=start,
                file=self.stream,
                unit="it",
                dynamic_ncols=True,
                desc="training",
            )

    def write(self, line: str) -> None:
        """A log line; above the bar when there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def advance(self, loss: float | None) -> None:
        """One more iteration done (`loss`: its total loss; None for a skipped step)."""
        if self.bar is None:
            return
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def schedule_line(start: int, stop: int, total: int, run_dir: Path) -> str:
    """The opening line; says so when train.max_iterations stops the run before the end of
    the schedules, which are laid out for the whole `total` (lr, wd, momentum and teacher
    temperature do not reach their final values)."""
    line = f"training iterations {start}..{stop - 1} of {total}, run dir {run_dir}"
    if stop < total:
        line += f"\nstopping at {stop} of {total} (train.max_iterations); schedules follow {total}"
    return line


@dataclass
class RunSummary:
    """What a finished run (or a finished stretch of one) leaves behind."""

    start: int
    stop: int
    wall_s: float
    losses: dict[str, float]
    evaluation: dict[str, float]
    checkpoint: Path | None
    exports: tuple[Path, ...]
    metrics: Path
    tensorboard: Path | None

    def lines(self) -> list[str]:
        done = self.stop - self.start
        out = [
            f"done: iterations {self.start}..{self.stop} ({done} in this process) "
            f"in {format_duration(self.wall_s)}"
        ]
        if self.losses:
            out.append("final losses: " + " ".join(f"{k}={v:.4f}" for k, v in self.losses.items()))
        if self.evaluation:
            shown = {k: v for k, v in self.evaluation.items() if k != "eval_time_s"}
            out.append("evaluation:   " + " ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        out.append(f"checkpoint:   {self.checkpoint or 'none written'}")
        out.append(f"teacher:      {', '.join(str(p) for p in self.exports)}")
        out.append(f"metrics:      {self.metrics}")
        if self.tensorboard is not None:
            out.append(f"tensorboard:  tensorboard --logdir {self.tensorboard}")
        return out
