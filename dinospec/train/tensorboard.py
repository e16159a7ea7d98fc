"""TensorBoard view of a run: the scalars of every metrics record and, at evaluation time,
the PCA picture of the teacher's patch features.

Written when the `tensorboard` package is installed (`pip install -e '.[tb]'`), silently
skipped otherwise: metrics.jsonl holds the same numbers. Open it with
`tensorboard --logdir RUN_DIR/tensorboard` (or the parent folder of several runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

SCHEDULE_KEYS = ("lr", "backbone_lr", "wd", "momentum", "teacher_temp")
MONITOR_KEYS = ("teacher_entropy", "student_cls_std")
SPEED_KEYS = ("images_per_s", "data_time_s", "iter_time_s", "peak_memory_mb", "eta_s")
PICTURE_TAG = "eval/pca_patch_features"


def scalar_tag(key: str) -> str | None:
    """Where a metrics key is drawn: grouped by what it is, so TensorBoard shows losses,
    schedules, collapse monitor, speed and evaluation as separate sections; None for
    keys that are no curve (iteration, phase)."""
    if key.startswith("loss"):
        return f"loss/{key.removeprefix('loss').removeprefix('_') or 'total'}"
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    for section, keys in (("schedule", SCHEDULE_KEYS), ("monitor", MONITOR_KEYS)):
        if key in keys:
            return f"{section}/{key}"
    return f"speed/{key}" if key in SPEED_KEYS else None


class Board:
    """A SummaryWriter that takes metrics records as they are written to metrics.jsonl."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def add_record(self, record: dict[str, Any]) -> None:
        """Every numeric value of a record at its iteration (the overall one in a phase)."""
        step = int(record["iteration"]) + int(record.get("phase_offset", 0))
        for key, value in record.items():
            tag = scalar_tag(key)
            if tag is not None and isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def add_picture(self, picture: Tensor, iteration: int) -> None:
        """A (3, H, W) image in [0, 1]."""
        self.writer.add_image(PICTURE_TAG, picture, iteration, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(log_dir: Path, start: int) -> Board | None:
    """A board writing into `log_dir`, or None without the tensorboard package. Events a
    killed run logged after the checkpoint it resumes from (`start`) are dropped, as
    metrics.jsonl is rewound, so the curves read as one straight run."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return Board(SummaryWriter(str(log_dir), purge_step=start if start > 0 else None))
