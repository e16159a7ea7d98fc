"""The sweep file and the cells it expands into.

A sweep file names a training config, override sets (`variants`, and optional `grid` axes
whose cartesian product with the variants makes the groups), `seeds`, and the evaluations
to run on every finished run. Each group x seed is a cell with its own directory:

    OUTPUT_DIR/<variant>[_<grid point>]/seed<k>/        run/ eval/<name>/ cell.log cell.json
    OUTPUT_DIR/<variant>[_<grid point>]/init_seed<k>/   the same backbone at initialization

Everything that can be checked without loading a config is checked here, each problem
named by its entry in the file; `launch.sweep.check` then loads every config.
"""

from __future__ import annotations

import argparse
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from dinospec.run.layout import RunDir
from launch.cli import LaunchError
from launch.submit import add_resource_options, point_name

TOP_LEVEL_KEYS = (
    "name",
    "train_config",
    "output_dir",
    "overrides",
    "variants",
    "grid",
    "seeds",
    "random_init",
    "evaluations",
    "report",
    "slurm",
)
EVALUATION_KEYS = ("kind", "config", "overrides", "metrics")
EVALUATION_KINDS = ("cls", "seg", "depth")
SET_BY_SWEEP = {"train.seed": "seeds", "train.output_dir": "output_dir"}
SET_BY_CELL = {"backbone.path": "the cell's backbone", "output_dir": "the cell's eval/<name>"}
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")

CELL_LOG = "cell.log"
CELL_RECORD = "cell.json"
RUN_DIR = "run"
EVAL_DIR = "eval"
INIT_BACKBONE = "init_backbone.safetensors"


class SweepError(LaunchError):
    """A problem with the sweep file or its configs; nothing has been started."""


@dataclass(frozen=True)
class Evaluation:
    """One evaluation run on every cell's backbone; `metrics` maps a column name to a
    dotted path into its results.json (`knn.20.top1`)."""

    name: str
    kind: str
    config: Path
    overrides: tuple[str, ...]
    metrics: dict[str, str]

    def columns(self) -> list[str]:
        return [f"{self.name}.{metric}" for metric in self.metrics]


@dataclass(frozen=True)
class Cell:
    """One training run (or one random initialization) and its evaluations."""

    variant: str
    point: tuple[str, ...]
    seed: int
    random_init: bool
    root: Path

    @property
    def group(self) -> str:
        """The variant and grid point: the rows averaged over seeds."""
        return "_".join([self.variant, point_name(self.point)] if self.point else [self.variant])

    @property
    def label(self) -> str:
        return f"{self.group} (init)" if self.random_init else self.group

    @property
    def key(self) -> str:
        """The cell's directory relative to the sweep's: how commands and logs name it."""
        return f"{self.group}/{'init_' if self.random_init else ''}seed{self.seed}"

    @property
    def directory(self) -> Path:
        return self.root / self.key

    @property
    def run_dir(self) -> Path:
        return self.directory / RUN_DIR

    @property
    def backbone(self) -> Path:
        """The weights the evaluations read."""
        if self.random_init:
            return self.directory / INIT_BACKBONE
        return RunDir(self.run_dir).export(".safetensors")

    @property
    def log(self) -> Path:
        return self.directory / CELL_LOG

    @property
    def record(self) -> Path:
        return self.directory / CELL_RECORD

    def eval_dir(self, name: str) -> Path:
        return self.directory / EVAL_DIR / name


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    train_config: Path
    output_dir: Path
    overrides: tuple[str, ...]
    variants: dict[str, tuple[str, ...]]
    grid: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...]
    random_init: bool
    evaluations: tuple[Evaluation, ...]
    plot: str
    slurm: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[tuple[str, ...]]:
        """Every grid point as its overrides (one empty point without a grid)."""
        return [tuple(point) for point in itertools.product(*self.grid.values())]

    def cells(self) -> list[Cell]:
        """Variants x grid points x seeds; each random-init cell right before its run."""
        cells = []
        for variant, point, seed in itertools.product(self.variants, self.points(), self.seeds):
            for init in (True, False) if self.random_init else (False,):
                cells.append(Cell(variant, point, seed, init, self.output_dir))
        return cells

    def cell(self, key: str) -> Cell:
        for cell in self.cells():
            if cell.key == key:
                return cell
        raise SweepError(f"{self.path}: no cell {key!r}")

    def train_overrides(self, cell: Cell) -> list[str]:
        """Later overrides win: the sweep's, the variant's, the grid point's, the seed."""
        return [
            *self.overrides,
            *self.variants[cell.variant],
            *cell.point,
            f"train.seed={cell.seed}",
            f"train.output_dir={cell.run_dir}",
        ]

    def columns(self) -> list[str]:
        """Every metric of the table, `<evaluation>.<metric>`."""
        return [column for evaluation in self.evaluations for column in evaluation.columns()]


def resource_options() -> dict[str, argparse.Action]:
    """The options of `launch.submit` a `slurm:` block may set, by their names in YAML."""
    return {action.dest: action for action in add_resource_options(argparse.ArgumentParser())}


def read_sweep(path: str | Path) -> Sweep:
    """The sweep file, checked entry by entry; paths in it are relative to the current
    directory (as on the command line) and made absolute here."""
    path = Path(path)
    raw = _read_mapping(path)
    where = _Where(path)
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        where.fail(unknown[0], f"unknown key (known: {', '.join(TOP_LEVEL_KEYS)})")
    for key in ("train_config", "output_dir", "variants", "seeds", "evaluations"):
        if key not in raw:
            where.fail(key, "missing")
    evaluations = tuple(
        _evaluation(where, name, entry) for name, entry in _mapping(where, raw, "evaluations")
    )
    columns = [column for evaluation in evaluations for column in evaluation.columns()]
    return Sweep(
        path=path.resolve(),
        name=_name(where, raw.get("name", path.stem)),
        train_config=_existing_file(where, "train_config", raw["train_config"]),
        output_dir=Path(_string(where, "output_dir", raw["output_dir"])).resolve(),
        overrides=_overrides(where, "overrides", raw.get("overrides"), SET_BY_SWEEP),
        variants=_variants(where, raw),
        grid=_grid(where, raw.get("grid")),
        seeds=_seeds(where, raw["seeds"]),
        random_init=_flag(where, "random_init", raw.get("random_init", False)),
        evaluations=evaluations,
        plot=_plot(where, raw.get("report"), columns),
        slurm=_slurm(where, raw.get("slurm")),
    )


class _Where:
    """Names the entry of the sweep file a problem is in."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, entry: str, problem: str) -> NoReturn:
        raise SweepError(f"{self.path}: {entry}: {problem}")


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SweepError(f"{path}: cannot read the sweep file ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (name:, train_config:, ...)")
    return raw


def _mapping(where: _Where, raw: Mapping[str, Any], key: str) -> list[tuple[str, Any]]:
    value = raw.get(key)
    if not isinstance(value, dict):
        where.fail(key, f"expected a mapping of names, got {value!r}")
    if not value:
        where.fail(key, "empty: the sweep would have no cells")
    for name in value:
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
            where.fail(f"{key}.{name}", "names are letters, digits, '_', '+' and '-'")
    return list(value.items())


def _string(where: _Where, entry: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        where.fail(entry, f"expected a string, got {value!r}")
    return value


def _name(where: _Where, value: Any) -> str:
    name = _string(where, "name", value)
    if not SAFE_NAME.fullmatch(name):
        where.fail("name", f"{name!r}: letters, digits, '_', '+' and '-' only")
    return name


def _flag(where: _Where, entry: str, value: Any) -> bool:
    if not isinstance(value, bool):
        where.fail(entry, f"expected true or false, got {value!r}")
    return value


def _existing_file(where: _Where, entry: str, value: Any) -> Path:
    path = Path(_string(where, entry, value))
    if not path.is_file():
        where.fail(entry, f"{path}: no such file (paths are relative to the current directory)")
    return path.resolve()


def _overrides(
    where: _Where, entry: str, value: Any, reserved: Mapping[str, str]
) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        where.fail(entry, f"expected a list of key=value overrides, got {value!r}")
    for override in value:
        if not isinstance(override, str) or "=" not in override:
            where.fail(entry, f"{override!r}: expected key=value")
        key = override.partition("=")[0].strip()
        if key in reserved:
            where.fail(entry, f"{override}: {key} is set by {reserved[key]}")
    return tuple(value)


def _variants(where: _Where, raw: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    return {
        name: _overrides(where, f"variants.{name}", overrides, SET_BY_SWEEP)
        for name, overrides in _mapping(where, raw, "variants")
    }


def override_value(value: Any) -> str:
    """A YAML value as the right-hand side of a key=value override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(override_value(item) for item in value) + "]"
    return str(value)


def _grid(where: _Where, value: Any) -> dict[str, tuple[str, ...]]:
    """`key: [values]` axes; `grid: {}` (or none) means no axis beyond the variants."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        where.fail("grid", f"expected a mapping of key: [values], got {value!r}")
    axes = {}
    for key, values in value.items():
        if key in SET_BY_SWEEP:
            where.fail(f"grid.{key}", f"set by {SET_BY_SWEEP[key]}")
        if not isinstance(values, list) or not values:
            where.fail(f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        axes[key] = tuple(f"{key}={override_value(v)}" for v in values)
        names = [point_name([override]) for override in axes[key]]
        if len(set(names)) < len(names):
            where.fail(f"grid.{key}", f"values share a directory name: {names}")
    return axes


def _seeds(where: _Where, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        where.fail("seeds", f"expected a non-empty list of integers, got {value!r}")
    if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in value):
        where.fail("seeds", f"expected integers, got {value!r}")
    if len(set(value)) < len(value):
        where.fail("seeds", f"repeated seed in {value}")
    return tuple(value)


def _evaluation(where: _Where, name: str, entry: Any) -> Evaluation:
    at = f"evaluations.{name}"
    if not isinstance(entry, dict):
        where.fail(at, f"expected a mapping with {', '.join(EVALUATION_KEYS)}")
    unknown = sorted(set(entry) - set(EVALUATION_KEYS))
    if unknown:
        where.fail(f"{at}.{unknown[0]}", f"unknown key (known: {', '.join(EVALUATION_KEYS)})")
    if entry.get("kind") not in EVALUATION_KINDS:
        where.fail(
            f"{at}.kind",
            f"unknown evaluation kind {entry.get('kind')!r} (known: cls = k-NN and linear "
            "classification, seg = linear segmentation, depth = linear depth probe)",
        )
    metrics = entry.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        where.fail(f"{at}.metrics", "expected a mapping of column name: dotted results path")
    for metric, results_path in metrics.items():
        if not isinstance(metric, str) or not SAFE_NAME.fullmatch(metric):
            where.fail(f"{at}.metrics.{metric}", "names are letters, digits, '_', '+' and '-'")
        _string(where, f"{at}.metrics.{metric}", results_path)
    return Evaluation(
        name=name,
        kind=entry["kind"],
        config=_existing_file(where, f"{at}.config", entry.get("config")),
        overrides=_overrides(where, f"{at}.overrides", entry.get("overrides"), SET_BY_CELL),
        metrics=dict(metrics),
    )


def _plot(where: _Where, report: Any, columns: Sequence[str]) -> str:
    """The metric plotted per variant; the first metric when the file names none."""
    if report is None:
        return columns[0]
    if not isinstance(report, dict) or set(report) - {"plot"}:
        where.fail("report", f"expected a mapping with 'plot' only, got {report!r}")
    plot = report.get("plot", columns[0])
    if plot not in columns:
        where.fail("report.plot", f"{plot!r} is not a metric (known: {', '.join(columns)})")
    return plot


def _slurm(where: _Where, value: Any) -> dict[str, Any]:
    """Resources of each array task, as `launch.submit` options (`gpus_per_node: 8`)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        where.fail("slurm", f"expected a mapping of submit options, got {value!r}")
    options = resource_options()
    for key, setting in value.items():
        if key not in options:
            where.fail(f"slurm.{key}", f"unknown option (known: {', '.join(options)})")
        wanted = options[key].type or str
        ok = isinstance(setting, wanted) and not isinstance(setting, bool)
        if wanted is float:
            ok = isinstance(setting, (int, float)) and not isinstance(setting, bool)
        if not ok:
            where.fail(f"slurm.{key}", f"expected {wanted.__name__}, got {setting!r}")
    return dict(value)
