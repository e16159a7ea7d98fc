"""A tiny pretraining config and runners shared by the training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dinospec.config import Config, load_config
from dinospec.train.data import build_loader, to_device

TINY = [
    "model.img_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=4",
    "model.num_register_tokens=1",
    "model.specialize.norm1_blocks=all",
    "model.specialize.norm2_blocks=all",
    "model.specialize.qkv_blocks=1",
    "data.dataset=synthetic",
    "data.synthetic_size=64",
    "data.synthetic_image_size=32",
    "data.num_workers=0",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "optim.epochs=3",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "train.batch_size_per_gpu=4",
    "train.epoch_length=4",
    "train.log_every=1",
    "train.checkpoint_every=2",
]


def tiny_config(output_dir: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"train.output_dir={output_dir}", *overrides])


def first_batch(trainer: Any) -> dict[str, Any]:
    """The first batch of a Trainer's data stream, on its device, as its loop hands it over."""
    loader = build_loader(trainer.config, trainer.images, 0, 1, 0)
    return to_device(next(loader), trainer.info.device)


def run_cli(
    output_dir: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`dinospec train` in a fresh process, as a user (or a requeued job) would run it."""
    config = output_dir.parent / f"{output_dir.name}.yaml"
    config.write_text("\n".join(f"# {o}" for o in overrides) + "\n")
    args = [sys.executable, "-m", "dinospec.cli", "train", str(config), *TINY]
    args += [f"train.output_dir={output_dir}", *overrides]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, env=full_env, check=False)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
