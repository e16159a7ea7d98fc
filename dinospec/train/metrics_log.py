"""The run's metrics.jsonl and console lines: the window a log line sums up, the rewind of
the file on resume, and the collapse warnings.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class LogWindow:
    """What the iterations since the last log line add up to. A single step's loss comes
    from one batch and jumps from step to step; the mean over the window shows the trend."""

    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0
    data_time: float = 0.0
    losses: list[float] = field(default_factory=list)


def rewind_metrics(path: Path, iteration: int) -> None:
    """Drop from a metrics file what a run resuming at `iteration` will log again (the
    records after its checkpoint) and any line the previous process left unreadable (a
    kill mid-write; appended to, it would sit in the middle of the file). Rewritten
    through a temporary file, so a crash here leaves the old file whole."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: dropped an unreadable line: %.80r", path, number, line)
            continue
        if record["iteration"] <= iteration:
            kept.append(line + "\n")
    partial = path.with_name(path.name + ".tmp")
    try:
        partial.write_text("".join(kept))
    except OSError as err:
        partial.unlink(missing_ok=True)
        message = f"cannot rewrite {path} ({err.strerror}); it is unchanged"
        raise OSError(err.errno, message) from err
    partial.replace(path)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}"


def collapse_warnings(iteration: int, monitor: dict[str, float], warmup_end: int) -> list[str]:
    """What the collapse monitor warns about at `iteration`; nothing before `warmup_end`
    (the lr warm-up's last iteration): LayerScale starts at 1e-5, so at first every
    image's [CLS] is nearly the same by construction, not by collapse."""
    if iteration < warmup_end:
        return []
    warnings = []
    std, entropy = monitor.get("student_cls_std"), monitor.get("teacher_entropy")
    if std is not None and std < 0.05:
        warnings.append(
            f"WARNING it {iteration}: student [CLS] features collapsed (spread {std:.3f})"
        )
    if entropy is not None and entropy < 0.01:
        warnings.append(f"WARNING it {iteration}: teacher targets collapsed onto few prototypes")
    if entropy is not None and entropy > 0.99:
        warnings.append(
            f"WARNING it {iteration}: teacher targets nearly uniform (normalized entropy "
            f"{entropy:.4f}): the run is collapsing to a constant output"
        )
    return warnings
