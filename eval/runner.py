"""What every evaluation job shares: the frozen backbone, the record of what was evaluated,
console output and the results file.

A results file must let someone tell, months later, exactly which weights and settings
produced a number, so it carries the whole config, the checkpoint's sha256 and the date.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from dinospec.config import ConfigError, load_model_config
from dinospec.models.checkpoints import load_backbone
from dinospec.models.vit import DinoVisionTransformer
from dinospec.train.exports import backbone_file
from eval.config import BackboneSource, EvalConfig

RESULTS_FILE = "results.json"
HASH_CHUNK = 1 << 20

Item = TypeVar("Item")


def load_frozen_backbone(
    source: BackboneSource, device: torch.device
) -> tuple[DinoVisionTransformer, Path]:
    """The backbone in eval mode without gradients, and the weight file it came from.

    A checkpoint that does not fit `model_config` raises CheckpointError naming both.
    """
    path = backbone_file(source.path)
    model_config = load_model_config(source.model_config) if source.model_config else None
    model = load_backbone(path, model_config, source.num_heads, heads_key="backbone.num_heads")
    return model.requires_grad_(False).eval().to(device), path


def require_depth(backbone: DinoVisionTransformer, key: str, n_blocks: int) -> None:
    """Fail before any work when the config asks for more blocks than the backbone has."""
    depth = len(backbone.blocks)
    if n_blocks > depth:
        raise ConfigError(f"{key}={n_blocks}: the backbone has only {depth} blocks")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_record(config: EvalConfig, checkpoint: Path) -> dict[str, Any]:
    """Which config and which weights (by content, not only by name) gave the results."""
    return {
        "config": asdict(config),
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": sha256_file(checkpoint)},
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
