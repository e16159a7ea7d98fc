"""The teacher backbone a run exports beside its checkpoints, the record that ties it to
them, and the readers that go through that record.

Readers (analysis, evaluation, `train.pretrained_weights`) take the export, not the DCP
checkpoint, so a kill during an export must not leave a truncated file that reads as a
trained backbone. Each file is written under a temporary name and renamed; then the
record gets the iteration and the sha256 of both files. A reader checks the file against
the record and the record against the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from dinospec.config import ModelConfig
from dinospec.models.checkpoints import (
    CheckpointError,
    hf_weight_file,
    load_backbone,
    write_backbone,
)
from dinospec.models.vit import DinoVisionTransformer
from dinospec.run.layout import EXPORT_SUFFIXES, RunDir, is_export
from dinospec.train.checkpoint import checkpoint_iteration, file_digest, list_checkpoints

log = logging.getLogger(__name__)


def _replace_durably(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_export(
    state_dict: Mapping[str, Tensor], config: ModelConfig, run: RunDir, iteration: int
) -> None:
    """Both export files and their record, each replaced whole or not at all."""
    digests = {}
    for suffix in EXPORT_SUFFIXES:
        path = run.export(suffix)
        tmp = path.with_name(f".{path.stem}.partial{suffix}")
        try:
            write_backbone(state_dict, config, tmp)
            digests[path.name] = file_digest(tmp)
            _replace_durably(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    record = run.export_record
    tmp = record.with_name(f".{record.name}.partial")
    tmp.write_text(json.dumps({"iteration": iteration, "sha256": digests}, indent=1))
    _replace_durably(tmp, record)


def _newest_checkpoint(run: RunDir) -> int | None:
    found = list_checkpoints(run.checkpoints)
    return checkpoint_iteration(found[-1]) if found else None


def check_export(path: Path) -> None:
    """Raise if an exported file is not the one its record describes (an export cut short);
    warn if it is older than the run's newest checkpoint. Files outside a run directory,
    and runs written before records existed, are left to the weight loader's checks."""
    run = RunDir(path.parent)
    if not (is_export(path) and run.export_record.is_file()):
        return
    try:
        record = json.loads(run.export_record.read_text())
        expected, iteration = record["sha256"].get(path.name), int(record["iteration"])
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{run.export_record}: unreadable export record: {err}") from err
    if expected != file_digest(path):
        raise CheckpointError(
            f"{path} is not the export recorded in {run.export_record.name} (iteration "
            f"{iteration}): its write was cut short or the file was replaced; rerun the "
            "training command to resume and export again"
        )
    newest = _newest_checkpoint(run)
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
    teacher a training run exported. An export is checked against the run's record of it,
    so an export cut short is never read as weights."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in RunDir(path).exports if p.is_file()]
        path = found[0] if found else hf_weight_file(path)
    check_export(path)
    return path


def load_frozen_backbone(
    source: str | Path,
    device: torch.device | str,
    model_config: ModelConfig | None = None,
    num_heads: int | None = None,
    heads_key: str = "--num-heads",
) -> tuple[DinoVisionTransformer, Path]:
    """The backbone of a weight file or run (`backbone_file`) in eval mode without
    gradients, and the weight file it came from: what analysis and evaluation read.
    `heads_key` names the setting that gives `num_heads` in the errors about it."""
    path = backbone_file(source)
    model = load_backbone(path, model_config, num_heads, heads_key=heads_key)
    return model.requires_grad_(False).eval().to(device), path
