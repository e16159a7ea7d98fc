"""Evaluation of the teacher backbone while it trains (config section `evaluation`).

When an evaluation is due the trainer hands its teacher backbone to each configured
evaluator and logs what they measure. The evaluators themselves live in `eval`, which
builds on dinospec (dinospec never imports it): they are found through the entry-point
group `dinospec.evaluators` (eval registers `knn` and `seg`), as eval's commands plug
into the `dinospec` command.

Evaluating must not change training, so that a run with evaluation trains exactly as one
without and resumes exactly: the evaluators read no training data, and `untouched`
restores every random stream (torch CPU and CUDA, numpy, random) and every module's
train/eval flag afterwards, and runs them without autograd.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.analysis.pca import pca_rgb
from dinospec.config import Config, ConfigError, evaluation_path_problems
from dinospec.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinospec.distributed import DistInfo

EVALUATOR_GROUP = "dinospec.evaluators"
"""Entry points of this group build evaluators: `factory(config, dist_info) -> Evaluator`."""


@dataclass
class EvalOutput:
    """What one evaluator measured (`metrics`, named `eval_*`, the same on every rank) and
    a few normalized images (B, 3, H, W) the PCA picture may show."""

    metrics: dict[str, float]
    preview: Tensor | None = None


@dataclass
class EvalReport:
    """One evaluation: its metrics (with its duration) and, when there were images to
    show, the PCA picture of the teacher's patch features, (3, H, W) in [0, 1]."""

    iteration: int
    metrics: dict[str, float] = field(default_factory=dict)
    picture: Tensor | None = None


class Evaluator(Protocol):
    """Measures a frozen backbone; called on every rank at the same time (the backbone may
    be sharded, so every rank runs the same forward passes)."""

    def __call__(self, backbone: nn.Module) -> EvalOutput: ...


def wanted_evaluators(config: Config) -> list[str]:
    """The entry-point names the config asks for, in the order they run."""
    e = config.evaluation
    return [
        name for name, on in (("knn", e.dataset != "none"), ("seg", e.seg.dataset != "none")) if on
    ]


def load_evaluators(config: Config, info: DistInfo) -> list[Evaluator]:
    """Build the configured evaluators (on every rank, in the same order, since building
    one may create a process group). Missing data is a ConfigError naming the key, before
    the first step, not after hours of training."""
    names = wanted_evaluators(config)
    if not names:
        return []
    if problems := evaluation_path_problems(config):
        raise ConfigError("evaluation data not found:\n  " + "\n  ".join(problems))
    installed = {point.name: point for point in entry_points(group=EVALUATOR_GROUP)}
    missing = [name for name in names if name not in installed]
    if missing:
        raise ConfigError(
            f"evaluation: no evaluator {missing} in entry-point group {EVALUATOR_GROUP!r}; "
            "the project's own are registered by installing it (pip install -e .)"
        )
    return [installed[name].load()(config, info) for name in names]


@contextlib.contextmanager
def untouched(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the body without autograd and leave the random streams and the train/eval
    flags of `model`'s modules as they were."""
    flags = {module: module.training for module in model.modules()}
    devices = [device] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        for module, training in flags.items():
            module.training = training


@contextlib.contextmanager
def whole_root(backbone: nn.Module, device: torch.device) -> Iterator[None]:
    """An FSDP2-sharded backbone gathers its root unit's parameters (embeddings, final
    norm) only around `forward`; evaluators also call its other methods
    (`get_intermediate_layers`), so the root stays gathered while they run. Each block
    gathers its own parameters when it runs."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(backbone, FSDPModule):
        yield
        return
    # FSDP2 sets itself up at the root's first forward and refuses one after a block has
    # run alone; before the first training step (an evaluation at iteration 0) none has
    # run yet, so one image goes through forward first, on every rank alike.
    size = backbone.config.img_size
    backbone(torch.zeros(1, backbone.config.in_chans, size, size, device=device))
    backbone.unshard()
    try:
        yield
    finally:
        backbone.reshard()


def pca_picture(backbone: nn.Module, images: Tensor) -> Tensor:
    """Images (top row) above the first three principal components of their last-layer
    patch features as RGB (bottom row), fitted on all images together: (3, 2H, B*W)."""
    tokens = backbone(images, is_training=True)["x_norm_patchtokens"].float().cpu()
    b, _, height, width = images.shape
    patch = height // int(backbone.patch_size), width // int(backbone.patch_size)
    rgb = pca_rgb(tokens.reshape(b, *patch, -1)).rgb.permute(0, 3, 1, 2)
    maps = F.interpolate(rgb, size=(height, width), mode="nearest")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    shown = (images.float().cpu() * std + mean).clamp(0, 1)
    rows = [torch.cat(list(part), dim=2) for part in (shown, maps)]
    return torch.cat(rows, dim=1)


class PeriodicEvaluation:
    """When evaluations are due and what they give. Due at iteration 0 of a new run
    (`at_start`), every `every` iterations and at the run's last iteration."""

    def __init__(
        self,
        config: Config,
        evaluators: list[Evaluator],
        stop: int,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> None:
        self.settings = config.evaluation
        self.evaluators = evaluators
        self.stop = stop
        self.device = device
        self.autocast = autocast

    def due(self, iteration: int) -> bool:
        if not self.evaluators:
            return False
        if iteration == 0:
            return self.settings.at_start
        every = self.settings.every
        return iteration == self.stop or (every > 0 and iteration % every == 0)

    def run(self, backbone: nn.Module, iteration: int) -> EvalReport:
        """Every evaluator on `backbone`, under the training's autocast, then the PCA
        picture of the first evaluator's preview images."""
        start = time.perf_counter()
        report = EvalReport(iteration)
        preview = None
        with untouched(backbone, self.device), self.autocast(), whole_root(backbone, self.device):
            for evaluator in self.evaluators:
                output = evaluator(backbone)
                report.metrics |= output.metrics
                preview = output.preview if preview is None else preview
            backbone.eval()
            if preview is not None and self.settings.pca_images:
                images = preview[: self.settings.pca_images].to(self.device)
                report.picture = pca_picture(backbone, images)
        report.metrics["eval_time_s"] = time.perf_counter() - start
        return report
