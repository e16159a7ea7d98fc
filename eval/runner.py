"""What every evaluation job shares: its opening (console, output directory, seed, frozen
backbone), the record of what was evaluated and the results file.

A results file must let someone tell, months later, exactly which weights and settings
produced a number, so it carries the whole config, the checkpoint's sha256 and the date.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from tqdm import tqdm

from dinospec.config import ConfigError, load_model_config
from dinospec.models.vit import DinoVisionTransformer
from dinospec.run.exports import load_frozen_backbone
from dinospec.train.checkpoint import file_digest
from eval.config import EvalConfig
from eval.sharding import Ranks

RESULTS_FILE = "results.json"

Item = TypeVar("Item")


class JobStart(NamedTuple):
    """What an evaluation has once it is under way: its console, where it writes, the
    frozen backbone and the weight file that backbone came from."""

    console: Console
    output_dir: Path
    backbone: DinoVisionTransformer
    checkpoint: Path


def start_job(
    task: str, config: EvalConfig, ranks: Ranks, blocks_key: str, n_blocks: int
) -> JobStart:
    """The opening every evaluation shares: a console quiet on all ranks but 0, the output
    directory, the seed, and the backbone, checked to have the `n_blocks` blocks the task
    reads (`blocks_key` names the setting) before any data is touched. A checkpoint that
    does not fit `backbone.model_config` raises CheckpointError naming both."""
    console = Console(task, quiet=not ranks.is_main)
    output_dir = Path(config.output_dir)
    if ranks.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    seeded_generator(config.seed)
    source = config.backbone
    model_config = load_model_config(source.model_config) if source.model_config else None
    backbone, checkpoint = load_frozen_backbone(
        source.path, ranks.device, model_config, source.num_heads, "backbone.num_heads"
    )
    params = sum(p.numel() for p in backbone.parameters())
    console.phase(f"backbone {checkpoint} ({params:,} params)")
    depth = len(backbone.blocks)
    if n_blocks > depth:
        raise ConfigError(f"{blocks_key}={n_blocks}: the backbone has only {depth} blocks")
    return JobStart(console, output_dir, backbone, checkpoint)


def run_record(config: EvalConfig, checkpoint: Path) -> dict[str, Any]:
    """Which config and which weights (by content, not only by name) gave the results."""
    return {
        "config": asdict(config),
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": file_digest(checkpoint)},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }


def json_safe(value: Any) -> Any:
    """NaN (an undefined per-class score) as null, since JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(output_dir: Path, results: dict[str, Any]) -> Path:
    path = output_dir / RESULTS_FILE
    path.write_text(json.dumps(json_safe(results), indent=1, allow_nan=False) + "\n")
    return path


class Console:
    """One line per phase with the time since the job started; progress bars for loops.

    A `quiet` console (every rank but 0 of a distributed job) prints nothing, so a job's
    log reads the same whatever the number of processes.
    """

    def __init__(self, task: str, quiet: bool = False) -> None:
        self.task = task
        self.quiet = quiet
        self.start = time.monotonic()

    def phase(self, message: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        print(f"[{self.task} {elapsed:7.1f}s] {message}", flush=True)

    def progress(self, items: Iterable[Item], total: int, what: str) -> Iterator[Item]:
        """A bar with rate and ETA; tqdm stays silent when stderr is not a terminal, so
        batch logs get only the phase lines."""
        disable = True if self.quiet else None
        return iter(tqdm(items, total=total, desc=f"{self.task}: {what}", disable=disable))


def seeded_generator(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
