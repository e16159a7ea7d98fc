"""What a training checkpoint holds, part by part.

Each part is a DCP `Stateful`: `state_dict()` hands out its tensors (the live ones, so a
DCP load writes into them in place) and `load_state_dict()` puts a loaded state back, so
what is saved is exactly what a resume restores, and a new part is one entry of
`TrainingState`. Only tensors go in: DCP would pickle anything else, and loading must
never unpickle. The data order and every random stream are functions of the seed and
`Progress.iteration` (dinospec.train.data derives them), so `Progress` is their part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from dinospec.losses.targets import TeacherTargets


class ModelPart(Stateful):
    """One set of modules (student or teacher: backbone and heads), sharded or not."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state_dict)


class OptimizerPart(Stateful):
    """AdamW's moments and step counts. Its param groups are left out: lr and weight decay
    are set from the schedules before every step, the rest from the config."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"state": get_optimizer_state_dict(self.model, self.optimizer)["state"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        full = get_optimizer_state_dict(self.model, self.optimizer)
        full["state"] = state_dict["state"]
        set_optimizer_state_dict(self.model, self.optimizer, full)


class LossCenters(Stateful):
    """The DINO and iBOT centres (softmax centering's running means of the teacher)."""

    def __init__(self, dino: TeacherTargets, ibot: TeacherTargets) -> None:
        self.losses = {"dino_center": dino, "ibot_center": ibot}

    def state_dict(self) -> dict[str, Tensor]:
        return {name: loss.center for name, loss in self.losses.items()}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, loss in self.losses.items():
                if state_dict[name] is not loss.center:
                    loss.center.copy_(state_dict[name])


@dataclass
class Progress(Stateful):
    """Where the run is: the iteration of the last checkpoint written or resumed from, and
    how many steps were skipped on a non-finite loss."""

    iteration: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    skipped: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def state_dict(self) -> dict[str, Tensor]:
        return {"iteration": self.iteration, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        for name, value in self.state_dict().items():
            if state_dict[name] is not value:
                value.copy_(state_dict[name])


class TrainingState(Stateful):
    """The parts of a checkpoint under their names (the checkpoint's top-level keys)."""

    def __init__(self, parts: dict[str, Stateful]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])
