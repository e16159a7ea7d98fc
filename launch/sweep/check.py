"""Everything a sweep needs, checked before anything runs: every cell's training config
and every evaluation config load (unknown keys, bad values), each problem named by the
entry of the sweep file it comes from; then the inputs they read exist on this machine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dinospec.config import ConfigError
from launch.jobs import JOB_TYPES
from launch.sweep.configs import eval_config, train_config
from launch.sweep.spec import Sweep, SweepError


def _problem(sweep: Sweep, entry: str, err: Exception) -> SweepError:
    """One line: the sweep file, the entry, what the config loader said."""
    message = " ".join(str(err).replace("command line: ", "").split())
    return SweepError(f"{sweep.path}: {entry}: {message}")


def _load(sweep: Sweep, entry: str, overrides: Sequence[str]) -> None:
    try:
        JOB_TYPES["train"].load(str(sweep.train_config), overrides, None)
    except (ConfigError, OSError) as err:
        raise _problem(sweep, entry, err) from err


def check_configs(sweep: Sweep) -> None:
    """Raise SweepError for the first config that does not load. Each entry is loaded on
    its own (the sweep's overrides, then with each variant, with each grid value) so the
    error names the entry at fault; whole cells last, for problems of a combination."""
    _load(sweep, "overrides", sweep.overrides)
    for name, overrides in sweep.variants.items():
        _load(sweep, f"variants.{name}", [*sweep.overrides, *overrides])
    for key, values in sweep.grid.items():
        for value in values:
            _load(sweep, f"grid.{key}", [*sweep.overrides, value])
    cells = sweep.cells()
    for cell in cells:
        try:
            train_config(sweep, cell)
        except (ConfigError, OSError) as err:
            raise _problem(sweep, f"cell {cell.key}", err) from err
    for evaluation in sweep.evaluations:
        try:
            eval_config(sweep, cells[0], evaluation)
        except (ConfigError, OSError) as err:
            raise _problem(sweep, f"evaluations.{evaluation.name}", err) from err


def input_problems(sweep: Sweep) -> list[str]:
    """Inputs not found on this machine (training data, evaluation datasets), each once."""
    found: list[str] = []
    for cell in sweep.cells():
        for problem in JOB_TYPES["train"].problems(train_config(sweep, cell)):
            if problem not in found:
                found.append(problem)
    for evaluation in sweep.evaluations:
        root = eval_config(sweep, sweep.cells()[0], evaluation).dataset.root
        if root and not Path(root).is_dir():
            found.append(f"evaluations.{evaluation.name}: dataset.root={root}: not a directory")
    return found
