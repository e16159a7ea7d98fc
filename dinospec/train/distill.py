"""Distillation (`distill.teacher`): a frozen, larger network gives the DINO and iBOT targets
that train a smaller student, as DINOv2 made its ViT-S/B/L from its ViT-g.

The frozen teacher replaces the EMA teacher as the source of targets only; the student
keeps its own EMA (SSLModel.teacher), which is what checkpoints and exports hold, since it
is the better network to hand on, as in DINOv2. Teacher and student may differ in width,
depth, registers and specialization; they must share the patch size (iBOT matches masked
patches position by position) and the prototype counts (their heads score the same
prototypes). The teacher's heads come from its run's checkpoint, with the centres of that
iteration; a plain backbone file has no heads, so new random ones are frozen with it and
its targets are random projections of its features, which still carry its similarity
structure (said when the run starts). The teacher is read from its file at every start
and resume, like `train.pretrained_weights`, and is no part of the checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from dinospec.config import Config, load_config
from dinospec.models.checkpoints import CheckpointError, load_weights, read_weights
from dinospec.run.exports import backbone_file
from dinospec.run.layout import RunDir
from dinospec.train.checkpoint import single_process_quiet, verify_checkpoint
from dinospec.train.checkpoint_reader import SafeFileSystemReader, TensorOnlyLoadPlanner
from dinospec.train.ssl import SSLModel, build_head

log = logging.getLogger(__name__)

KEY = "distill.teacher"


@dataclass(frozen=True)
class DistillStart:
    """The frozen teacher's file, its architecture and where its heads came from."""

    backbone: Path
    arch: str
    heads_from: Path | None

    def describe(self) -> str:
        heads = (
            f"heads and centres from {self.heads_from}"
            if self.heads_from
            else "no heads in the file: new random heads, frozen (targets are random "
            "projections of the teacher's features)"
        )
        return f"distilling from a frozen {self.arch} ({self.backbone}); {heads}"


def init_distillation(model: SSLModel, config: Config) -> DistillStart | None:
    """Build the frozen teacher into `model.distill_teacher`; None without `distill.teacher`.
    Every incompatibility is a CheckpointError naming the key, raised before any step."""
    source = config.distill.teacher
    if not source:
        return None
    path = Path(source)
    try:
        file = backbone_file(source)
        weights = read_weights(file)
        heads_key = "distill.teacher_num_heads"
        backbone = load_weights(
            weights, num_heads=config.distill.teacher_num_heads, heads_key=heads_key
        )
    except (CheckpointError, FileNotFoundError) as err:
        raise CheckpointError(f"{KEY}={source}: {err}") from err
    teacher_config = load_config(RunDir(path).config) if path.is_dir() else config
    _check_compatible(backbone.config.patch_size, teacher_config, config, source)
    heads = {"dino_head": build_head(backbone.embed_dim, teacher_config.dino)}
    if teacher_config.ibot.separate_head:
        heads["ibot_head"] = build_head(backbone.embed_dim, teacher_config.ibot)
    teacher = nn.ModuleDict({"backbone": backbone, **heads})
    heads_from = _load_heads(teacher, model, path) if path.is_dir() else None
    model.distill_teacher = teacher.requires_grad_(False).eval()
    arch = f"ViT width {backbone.embed_dim}, depth {len(backbone.blocks)}"
    return DistillStart(file, arch, heads_from)


def _prototypes(config: Config) -> tuple[int, int]:
    """The (DINO, iBOT) prototype counts a config's heads score."""
    ibot = config.ibot.head_n_prototypes if config.ibot.separate_head else None
    return config.dino.head_n_prototypes, ibot or config.dino.head_n_prototypes


def _check_compatible(patch_size: int, teacher: Config, student: Config, source: str) -> None:
    problems = []
    if patch_size != student.model.patch_size:
        problems.append(
            f"patch size: teacher {patch_size}, student model.patch_size="
            f"{student.model.patch_size} (iBOT compares masked patches position by position)"
        )
    ours, theirs = _prototypes(student), _prototypes(teacher)
    if ours != theirs:
        problems.append(
            f"prototypes (DINO, iBOT): teacher {theirs}, student {ours} (set dino/ibot "
            "head_n_prototypes and ibot.separate_head to the teacher's)"
        )
    if problems:
        raise CheckpointError(
            f"{KEY}={source}: the student cannot learn from this teacher:\n  "
            + "\n  ".join(problems)
        )


def _load_heads(teacher: nn.ModuleDict, model: SSLModel, run_dir: Path) -> Path | None:
    """The run's EMA-teacher heads of its exported iteration into the frozen teacher, and
    that iteration's centres into the student's losses (the targets' running means)."""
    iteration = RunDir(run_dir).exported_iteration()
    checkpoint = RunDir(run_dir).checkpoint(iteration) if iteration is not None else None
    if checkpoint is None or not checkpoint.is_dir():
        log.warning("%s=%s: no checkpoint of the exported iteration; heads are new", KEY, run_dir)
        return None
    verify_checkpoint(checkpoint)
    state: dict[str, dict[str, Tensor]] = {
        "teacher": {
            f"{name}.{key}": value
            for name, module in teacher.items()
            if name != "backbone"
            for key, value in module.state_dict().items()
        },
        "losses": {"dino_center": model.dino_loss.center, "ibot_center": model.ibot_loss.center},
    }
    try:
        with single_process_quiet():
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(str(checkpoint)),
                planner=TensorOnlyLoadPlanner(),
            )
    except Exception as err:
        raise CheckpointError(f"{KEY}={run_dir}: heads of {checkpoint}: {err}") from err
    return checkpoint
