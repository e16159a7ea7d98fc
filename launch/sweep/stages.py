"""The steps of one cell, each skipped when its output is already there and current:
training (finished when its export records the run's last iteration), the random
initialization, and each evaluation (current when its results.json was computed from
these exact weights with this exact config).

Every rank of a multi-process cell (a SLURM array task) runs these; training and the
evaluations share the work out over the ranks themselves.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dinospec.config import Config, load_config
from dinospec.models import build_backbone
from dinospec.models.checkpoints import save_backbone
from dinospec.run.layout import RunDir
from dinospec.train.checkpoint import file_digest
from eval.config import EvalConfig
from eval.runner import RESULTS_FILE, json_safe
from launch.eval_job import EvalJob
from launch.sweep.configs import eval_config, stop_iteration, train_config
from launch.sweep.spec import Cell, Evaluation, Sweep, SweepError
from launch.train_job import TrainJob


class CellInterrupted(Exception):
    """Training stopped on a signal, with a checkpoint: the same cell resumes it."""


class MetricError(Exception):
    """A metric path of the sweep file that results.json does not have."""


def training_finished(config: Config, backbone: Path) -> bool:
    exported = RunDir(backbone.parent).exported_iteration()
    return backbone.is_file() and exported is not None and exported >= stop_iteration(config)


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str) -> list[str]:
    found = []
    for key in sorted(a.keys() | b.keys()):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            found += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            found.append(f"{prefix}{key}: {a.get(key)!r} there, {b.get(key)!r} here")
    return found


def run_differences(config: Config) -> list[str]:
    """How the run already in the config's directory differs in model or seed (the sweep
    file was edited since): such a run must be neither resumed nor taken as this cell's.
    Other keys may change: a larger `optim.epochs` extends a run, as with `dinospec train`."""
    written = RunDir(config.train.output_dir).config
    if not written.is_file():
        return []
    before = load_config(written)
    differences = _differences(asdict(before.model), asdict(config.model), "model.")
    if before.train.seed != config.train.seed:
        differences.append(f"train.seed: {before.train.seed} there, {config.train.seed} here")
    return differences


def train(sweep: Sweep, cell: Cell) -> None:
    """Train (or resume) the cell's run unless it is finished."""
    config = train_config(sweep, cell)
    differences = run_differences(config)
    if differences:
        raise SweepError(
            f"{cell.run_dir} holds a run of another model or seed ({'; '.join(differences)})"
            ": remove it, or give the changed variant another name"
        )
    if training_finished(config, cell.backbone):
        print(f"training: finished at iteration {stop_iteration(config)}, skipped", flush=True)
        return
    result = TrainJob(config)()
    if result["status"] == "interrupted":
        raise CellInterrupted(f"training stopped at iteration {result['iteration']}")


def initialize(sweep: Sweep, cell: Cell) -> None:
    """The backbone as the cell's run starts it (same seed, same architecture), written
    once. Each rank writes its own identical copy under a temporary name and renames it,
    so no rank reads a half-written file and none has to wait for another."""
    if cell.backbone.is_file():
        print(f"initialization: {cell.backbone} exists, skipped", flush=True)
        return
    torch.manual_seed(cell.seed)
    model = build_backbone(train_config(sweep, cell).model)
    cell.directory.mkdir(parents=True, exist_ok=True)
    tmp = cell.directory / f".{socket.gethostname()}.{os.getpid()}.{cell.backbone.name}"
    save_backbone(model, tmp)
    os.replace(tmp, cell.backbone)
    print(f"initialization: seed {cell.seed} -> {cell.backbone}", flush=True)


def backbone_digest(path: Path) -> str:
    """sha256 of the weights, from the run's export record where there is one (hashing a
    large backbone for every skip test would take seconds)."""
    try:
        return json.loads(RunDir(path.parent).export_record.read_text())["sha256"][path.name]
    except (OSError, ValueError, KeyError, TypeError):
        return file_digest(path)


def current_results(config: EvalConfig, backbone: Path) -> dict[str, Any] | None:
    """The evaluation's results.json if it was computed with this config from these
    weights (both are recorded in it); None if it must be (re)computed."""
    try:
        results = json.loads((Path(config.output_dir) / RESULTS_FILE).read_text())
        recorded_weights = results["checkpoint"]["sha256"]
        recorded_config = results["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not backbone.is_file() or recorded_weights != backbone_digest(backbone):
        return None
    if recorded_config != json.loads(json.dumps(json_safe(asdict(config)))):
        return None
    return results


def evaluate(sweep: Sweep, cell: Cell, evaluation: Evaluation) -> dict[str, Any]:
    config = eval_config(sweep, cell, evaluation)
    results = current_results(config, cell.backbone)
    if results is not None:
        print(f"evaluation {evaluation.name}: current results.json, skipped", flush=True)
        return results
    print(f"evaluation {evaluation.name} ({evaluation.kind}) -> {config.output_dir}", flush=True)
    return EvalJob(config, evaluation.kind)()


def metric_value(results: dict[str, Any], dotted: str, where: str) -> float:
    """The number at a dotted path (`knn.20.top1`); null (an undefined score) is NaN."""
    node: Any = results
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            at = ".".join(parts[:depth]) or "the top level"
            there = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise MetricError(f"{where}: results.json has no {dotted!r} (at {at}: {there})")
    if node is None:
        return math.nan
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise MetricError(f"{where}: {dotted!r} in results.json is not a number: {node!r}")
    return float(node)


def cell_is_done(sweep: Sweep, cell: Cell, record: dict[str, Any] | None) -> bool:
    """Recorded as done, with every metric, and each step's output still current (the
    sweep file may have changed an evaluation since, or extended the training)."""
    if record is None or record.get("status") != "done":
        return False
    if set(record.get("metrics", {})) != set(sweep.columns()):
        return False
    if not cell.random_init:
        config = train_config(sweep, cell)
        if run_differences(config) or not training_finished(config, cell.backbone):
            return False
    return all(
        current_results(eval_config(sweep, cell, evaluation), cell.backbone) is not None
        for evaluation in sweep.evaluations
    )
