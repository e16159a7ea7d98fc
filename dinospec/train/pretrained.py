"""Starting a pretraining run from existing weights (`train.pretrained_weights`).

Continuing DINOv2 on one's own images fails when fresh heads meet a good backbone: the
targets of random heads are noise, and their gradients wreck the features within a few
hundred steps. So both backbones start from the same weights, and the heads either come
from the run that produced them (a dinospec run directory keeps them in its checkpoint)
or train alone first, the backbones frozen (`TrainingSchedules.backbone_frozen`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import Tensor

from dinospec.config import Config
from dinospec.models.checkpoints import CheckpointError, load_weights, read_weights
from dinospec.nested import flatten
from dinospec.run.exports import backbone_file
from dinospec.run.layout import RunDir
from dinospec.train.checkpoint import single_process_quiet, verify_checkpoint
from dinospec.train.checkpoint_reader import SafeFileSystemReader, TensorOnlyLoadPlanner
from dinospec.train.ssl import SSLModel

log = logging.getLogger(__name__)

KEY = "train.pretrained_weights"


@dataclass(frozen=True)
class PretrainedStart:
    """Where the backbones came from, in which layout, the checkpoint that gave the heads
    (None: they start fresh and warm up alone), and the config's head count when the file
    records none (said aloud: a wrong one would still load)."""

    weights: Path
    layout: str
    heads_from: Path | None
    num_heads_from_config: int | None = None

    def describe(self) -> str:
        heads = f"heads and centres from {self.heads_from}" if self.heads_from else "new heads"
        text = f"student and teacher backbones from {self.weights} ({self.layout}); {heads}"
        if self.num_heads_from_config is not None:
            text += (
                f"; the file records no head count, model.num_heads="
                f"{self.num_heads_from_config} taken from the config"
            )
        return text


def init_from_pretrained(model: SSLModel, config: Config) -> PretrainedStart | None:
    """Load `train.pretrained_weights` into both backbones (and a run's heads into both
    sets of heads); None when the key is unset. Every problem is a CheckpointError naming
    the key and the file, raised before any training step."""
    source = config.train.pretrained_weights
    if not source:
        return None
    try:
        path = backbone_file(source)
        weights = read_weights(path)
        load_weights(weights, model.student.backbone)
    except (CheckpointError, FileNotFoundError) as err:
        raise CheckpointError(f"{KEY}={source}: {err}") from err
    model.teacher.backbone.load_state_dict(model.student.backbone.state_dict())
    heads_from = load_run_heads(model, Path(source), KEY) if Path(source).is_dir() else None
    heads = None if weights.architecture.knows_heads else config.model.num_heads
    return PretrainedStart(path, weights.layout, heads_from, heads)


def _heads_state(model: SSLModel) -> dict[str, dict[str, Tensor]]:
    """The checkpoint entries of the heads and loss centres, under the names the run's
    `TrainingState` gives them, holding the model's own tensors (DCP loads into them in
    place)."""
    return {
        part: {
            f"{name}.{key}": value
            for name, module in getattr(model, part).items()
            if name != "backbone"
            for key, value in module.state_dict().items()
        }
        for part in ("student", "teacher")
    } | {"losses": {"dino_center": model.dino_loss.center, "ibot_center": model.ibot_loss.center}}


def load_run_heads(model: SSLModel, run_dir: Path, config_key: str) -> Path | None:
    """Heads and centres from the checkpoint of the exported teacher's iteration; None
    when the run has no such checkpoint (the export is then used alone). `config_key` is the
    config key that named the run, for the error messages."""
    iteration = RunDir(run_dir).exported_iteration()
    if iteration is None:
        return None
    checkpoint = RunDir(run_dir).checkpoint(iteration)
    if not checkpoint.is_dir():
        log.warning("%s: no checkpoint of iteration %d; heads start fresh", run_dir, iteration)
        return None
    verify_checkpoint(checkpoint)
    reader = SafeFileSystemReader(str(checkpoint))
    stored = {k: tuple(v.size) for k, v in reader.read_metadata().state_dict_metadata.items()}
    state = _heads_state(model)
    problems = [
        f"{key}: checkpoint {stored.get(key, 'absent')} vs config {tuple(value.shape)}"
        for key, value in flatten(state)
        if stored.get(key) != tuple(value.shape)
    ]
    if problems:
        raise CheckpointError(
            f"{config_key}={run_dir}: the heads in {checkpoint} do not fit the config's (dino.*, "
            "ibot.* head sizes, ibot.separate_head); give the run's exported teacher file "
            "instead to start with new heads:\n  " + "\n  ".join(problems[:10])
        )
    with single_process_quiet():
        dcp.load(state, storage_reader=reader, planner=TensorOnlyLoadPlanner())
    return checkpoint
