"""The training and evaluation configs of a cell, loaded as the launchers load them
(`launch.jobs`: validated, paths made absolute). Loading is cached per process, since the
same config is asked for by the checks, the plan and the skip test of every cell."""

from __future__ import annotations

import functools
from pathlib import Path

from dinospec.config import Config
from eval.config import EvalConfig
from launch.jobs import JOB_TYPES
from launch.sweep.spec import Cell, Evaluation, Sweep


@functools.cache
def _training(config: Path, overrides: tuple[str, ...]) -> Config:
    return JOB_TYPES["train"].load(str(config), overrides, None)


@functools.cache
def _evaluation(
    kind: str, config: Path, overrides: tuple[str, ...], output_dir: Path
) -> EvalConfig:
    return JOB_TYPES[f"eval-{kind}"].load(str(config), overrides, str(output_dir))


def train_config(sweep: Sweep, cell: Cell) -> Config:
    """What the cell trains (a random-init cell: the model it initializes)."""
    return _training(sweep.train_config, tuple(sweep.train_overrides(cell)))


def eval_config(sweep: Sweep, cell: Cell, evaluation: Evaluation) -> EvalConfig:
    """The evaluation of the cell's backbone, written into its `eval/<name>/`."""
    overrides = (*evaluation.overrides, f"backbone.path={cell.backbone}")
    return _evaluation(
        evaluation.kind, evaluation.config, overrides, cell.eval_dir(evaluation.name)
    )


def stop_iteration(config: Config) -> int:
    """The iteration a run ends at, as the Trainer computes it."""
    total = config.optim.epochs * config.train.epoch_length
    limit = config.train.max_iterations
    return total if limit is None else min(total, limit)
