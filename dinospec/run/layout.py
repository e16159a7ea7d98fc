"""The layout of a training run's directory, named once for every reader and writer.

Training writes it, launchers record submissions and read its progress, sweeps check its
export, analysis and evaluation read its metrics and teacher: all through `RunDir`, so a
file of the layout has one name in one place. This module imports nothing heavy, so a
launcher can name a run's files without loading torch's checkpoint machinery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_PREFIX = "iter_"
EXPORT_STEM = "teacher_backbone"
EXPORT_SUFFIXES = (".safetensors", ".pth")
"""Safetensors first: it carries the model config, so nothing has to be inferred."""


@dataclass(frozen=True)
class RunDir:
    """`root` and the paths of everything a run keeps there."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        """The resolved config the run was started (or last resumed) with."""
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        """One JSON object per logged iteration."""
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (`tensorboard --logdir` this or a folder of runs)."""
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        """The DCP checkpoints, one `iter_XXXXXXXX` folder each (dinospec.train.checkpoint)."""
        return self.root / "checkpoints"

    def checkpoint(self, iteration: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{iteration:08d}"

    @property
    def lock(self) -> Path:
        """The flock that keeps a second writer out (dinospec.run.lock)."""
        return self.root / ".lock"

    @property
    def jobs(self) -> Path:
        """Every launcher submission into this run, with its job id."""
        return self.root / "job.json"

    @property
    def submitit_logs(self) -> Path:
        return self.root / "submitit"

    def export(self, suffix: str) -> Path:
        """The teacher backbone exported at the newest checkpoint, in one format."""
        return self.root / f"{EXPORT_STEM}{suffix}"

    @property
    def exports(self) -> tuple[Path, ...]:
        return tuple(self.export(suffix) for suffix in EXPORT_SUFFIXES)

    @property
    def export_record(self) -> Path:
        """The iteration and sha256 of the exports, written after them."""
        return self.root / f"{EXPORT_STEM}.json"

    def exported_iteration(self) -> int | None:
        """The iteration of the teacher export, from its record; None without one."""
        try:
            return int(json.loads(self.export_record.read_text())["iteration"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def is_export(path: Path) -> bool:
    """Whether `path` names a teacher export of a run (whatever its directory holds)."""
    return path.name.startswith(EXPORT_STEM) and path.suffix in EXPORT_SUFFIXES
