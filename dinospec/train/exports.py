"""The teacher backbone a run exports beside its checkpoints, and the record that ties it
to them.

Readers (analysis, evaluation) take the export, not the DCP checkpoint, so a kill during
an export must not leave a truncated file that reads as a trained backbone. Each file is
written under a temporary name and renamed; then `teacher_backbone.json` records the
iteration and the sha256 of both files. A reader checks the file against the record and
the record against the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from dinospec.config import ModelConfig
from dinospec.models.checkpoints import CheckpointError, hf_weight_file, write_backbone
from dinospec.train.checkpoint import checkpoint_iteration, file_digest, list_checkpoints

log = logging.getLogger(__name__)

STEM = "teacher_backbone"
SUFFIXES = (".safetensors", ".pth")
RECORD = f"{STEM}.json"
CHECKPOINTS = "checkpoints"
RUN_BACKBONES = tuple(f"{STEM}{suffix}" for suffix in SUFFIXES)


def _replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_export(
    state_dict: Mapping[str, Tensor], config: ModelConfig, run_dir: Path, iteration: int
) -> None:
    """Both export files and their record, each replaced whole or not at all."""
    digests = {}
    for suffix in SUFFIXES:
        path = run_dir / f"{STEM}{suffix}"
        tmp = run_dir / f".{STEM}.partial{suffix}"
        try:
            write_backbone(state_dict, config, tmp)
            digests[path.name] = file_digest(tmp)
            _replace_durably(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    record = run_dir / RECORD
    tmp = run_dir / f".{RECORD}.partial"
    tmp.write_text(json.dumps({"iteration": iteration, "sha256": digests}, indent=1))
    _replace_durably(tmp, record)


def _newest_checkpoint(run_dir: Path) -> int | None:
    found = list_checkpoints(run_dir / CHECKPOINTS)
    return checkpoint_iteration(found[-1]) if found else None


def check_export(path: Path) -> None:
    """Raise if an exported file is not the one its record describes (an export cut short);
    warn if it is older than the run's newest checkpoint. Files outside a run directory,
    and runs written before records existed, are left to the weight loader's checks."""
    record_path = path.parent / RECORD
    if not (path.name.startswith(STEM) and path.suffix in SUFFIXES and record_path.is_file()):
        return
    try:
        record = json.loads(record_path.read_text())
        expected, iteration = record["sha256"].get(path.name), int(record["iteration"])
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{record_path}: unreadable export record: {err}") from err
    if expected != file_digest(path):
        raise CheckpointError(
            f"{path} is not the export recorded in {record_path.name} (iteration {iteration}): "
            "its write was cut short or the file was replaced; rerun the training command "
            "to resume and export again"
        )
    newest = _newest_checkpoint(path.parent)
    if newest is not None and newest != iteration:
        log.warning(
            "%s holds the teacher of iteration %d but the run's newest checkpoint is "
            "iteration %d (the export after it was interrupted)",
            path,
            iteration,
            newest,
        )


def backbone_file(path: str | Path) -> Path:
    """A weight file as given, the weight file of a Hugging Face model directory, or the
    teacher a training run exported (safetensors first: it carries the model config, so
    nothing has to be inferred). An export is checked against the run's record of it, so
    an export cut short is never read as weights."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in RUN_BACKBONES if (path / name).is_file()]
        path = found[0] if found else hf_weight_file(path)
    check_export(path)
    return path
