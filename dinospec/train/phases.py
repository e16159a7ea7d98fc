"""Training in phases (`train.previous_phase`): a run that continues a finished one with
other crop sizes, batch or schedules, e.g. DINOv2's short high-resolution phase at the end
of pretraining (global crops 518 px at patch 14).

A phase is its own run directory, so it resumes, checkpoints and exports like any run;
it starts from its parent's teacher export and the heads and centres of that iteration's
checkpoint (both backbones from the teacher, as with `train.pretrained_weights`), with a
new optimizer. When the phase's `model.img_size` differs, the position embeddings are
resized once, the way the parent resized them for an input of that size (bicubic, its
antialias and offset), so the phase starts with exactly the parent's function at the new
resolution. Its metrics carry the phase number and where it starts on the run's overall
iteration axis, so `plot-metrics` draws the phases as one curve with the switches marked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dinospec.config import Config, load_config
from dinospec.models import DinoVisionTransformer
from dinospec.models.architecture import architecture_problems
from dinospec.models.checkpoints import (
    CheckpointError,
    load_state_dict_checked,
    load_weights,
    read_weights,
)
from dinospec.run.exports import backbone_file
from dinospec.run.layout import RunDir
from dinospec.train.pretrained import load_run_heads
from dinospec.train.ssl import SSLModel

KEY = "train.previous_phase"


@dataclass(frozen=True)
class PhaseStart:
    """Where a phase comes from: its number (the first run is phase 1), the parent run,
    the parent's last iteration, and this phase's first iteration on the overall axis."""

    number: int
    parent: Path
    parent_end: int
    offset: int
    resized: tuple[int, int] | None  # position grid px, parent -> phase

    def describe(self) -> str:
        size = ""
        if self.resized:
            size = f"; positions resized {self.resized[0]} -> {self.resized[1]} px"
        return (
            f"phase {self.number}: continues {self.parent} (ended at iteration "
            f"{self.parent_end}; this phase starts at overall iteration {self.offset}){size}"
        )


def end_iteration(config: Config) -> int:
    """The iteration a run ends at: its schedule's length, or `train.max_iterations`."""
    total = config.optim.epochs * config.train.epoch_length
    limit = config.train.max_iterations
    return total if limit is None else min(total, limit)


def phase_chain(run_dir: Path) -> list[tuple[Path, int]]:
    """The runs of the phase chain that ends with `run_dir`, first phase first, each with
    the iteration it ends at, followed through the configs the run directories hold."""
    written = RunDir(run_dir).config
    if not written.is_file():
        raise CheckpointError(f"{KEY}={run_dir}: not a dinospec run directory (no config.yaml)")
    config = load_config(written)
    parent = config.train.previous_phase
    here = (run_dir, end_iteration(config))
    return [*phase_chain(Path(parent)), here] if parent else [here]


def init_from_previous_phase(model: SSLModel, config: Config) -> PhaseStart | None:
    """Load the parent's teacher into both backbones (positions resized to this phase's
    grid) and its heads and centres; None when the key is unset. Every problem is a
    CheckpointError naming the key, raised before any step."""
    parent = config.train.previous_phase
    if not parent:
        return None
    parent_dir = Path(parent)
    chain = phase_chain(parent_dir)
    exported, end = RunDir(parent_dir).exported_iteration(), chain[-1][1]
    if exported is None or exported < end:
        raise CheckpointError(
            f"{KEY}={parent}: that run is at iteration {exported or 0} of {end}; a phase "
            "starts once its parent has ended (resume the parent first)"
        )
    try:
        weights = read_weights(backbone_file(parent_dir))
        source = load_weights(weights)
    except (CheckpointError, FileNotFoundError) as err:
        raise CheckpointError(f"{KEY}={parent}: {err}") from err
    target = model.student.backbone
    old_size, new_size = source.config.img_size, config.model.img_size
    problems = architecture_problems(
        weights.architecture, replace(target.config, img_size=old_size)
    )
    state = source.state_dict()
    state["pos_embed"] = resized_positions(source, new_size)
    load_state_dict_checked(target, state, f"{KEY}={parent}", problems)
    model.teacher.backbone.load_state_dict(target.state_dict())
    load_run_heads(model, parent_dir, KEY)
    offset = sum(run_end for _, run_end in chain)
    resized = (old_size, new_size) if old_size != new_size else None
    return PhaseStart(len(chain) + 1, parent_dir, end, offset, resized)


@torch.no_grad()
def resized_positions(backbone: DinoVisionTransformer, img_size: int) -> torch.Tensor:
    """The position embedding `backbone` adds to an img_size x img_size input, as the
    parameter of a model built for that size."""
    if img_size == backbone.config.img_size:
        return backbone.pos_embed.detach().clone()
    grid = img_size // backbone.config.patch_size
    tokens = torch.zeros(1, 1 + grid * grid, backbone.embed_dim)
    return backbone.interpolate_pos_encoding(tokens, img_size, img_size).clone()
