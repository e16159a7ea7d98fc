"""What a sweep writes about itself: each cell's `cell.json` (status, metrics, error, log)
and the sweep directory's copy of its sweep file, which keeps a second, different sweep
out of the directory."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launch.sweep.spec import Cell, Sweep, SweepError

SWEEP_RECORD = "sweep.json"
SWEEP_COPY = "sweep.yaml"
DONE, FAILED, RUNNING, INTERRUPTED = "done", "failed", "running", "interrupted"


def is_main_process() -> bool:
    """Rank 0 of the cell's processes (one locally; every task of a SLURM array job runs
    the cell), the one that writes records."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def write_json(path: Path, value: Any) -> None:
    """Replaced whole: a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


def read_record(cell: Cell) -> dict[str, Any] | None:
    try:
        return json.loads(cell.record.read_text())
    except (OSError, ValueError):
        return None


def write_record(
    cell: Cell, status: str, metrics: dict[str, float], error: str | None, log: str
) -> None:
    write_json(
        cell.record,
        {
            "key": cell.key,
            "label": cell.label,
            "variant": cell.variant,
            "grid": list(cell.point),
            "seed": cell.seed,
            "random_init": cell.random_init,
            "status": status,
            "metrics": metrics,
            "error": error,
            "log": log,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


def claim_directory(sweep: Sweep) -> None:
    """Refuse a directory that holds another sweep (by name): its cells could carry the
    same names with other overrides and be taken as done. Then record this sweep there
    (`sweep.json`, and a copy of the sweep file as it was run)."""
    identity = sweep.output_dir / SWEEP_RECORD
    try:
        other = json.loads(identity.read_text())["name"]
    except (OSError, ValueError, KeyError):
        other = sweep.name
    if other != sweep.name:
        raise SweepError(
            f"{sweep.output_dir} holds the sweep {other!r}, not {sweep.name!r}: "
            "choose another output_dir"
        )
    write_json(identity, {"name": sweep.name, "file": str(sweep.path)})
    copy = sweep.output_dir / SWEEP_COPY
    tmp = copy.with_name(f".{SWEEP_COPY}.{os.getpid()}")
    tmp.write_text(sweep.path.read_text())
    os.replace(tmp, copy)
