"""Training schedules as functions of the iteration (SPEC section 4).

Values are computed from the iteration alone, so a resumed run gets exactly the values an
uninterrupted run would have had, with nothing to save but the iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """Zero for `freeze_iters`, linear warm-up from `start_warmup_value` to `base_value`
    over `warmup_iters` (both ends included, as DINOv2's numpy linspace), then a half cosine
    to `final_value` at `total_iters`; `final_value` afterwards."""

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self) -> None:
        if self.freeze_iters + self.warmup_iters > self.total_iters:
            raise ValueError(
                f"freeze ({self.freeze_iters}) + warm-up ({self.warmup_iters}) iterations "
                f"exceed the schedule length ({self.total_iters})"
            )

    def __call__(self, iteration: int) -> float:
        if iteration >= self.total_iters:
            return self.final_value
        if iteration < self.freeze_iters:
            return 0.0
        it = iteration - self.freeze_iters
        if it < self.warmup_iters:
            return self._warmup(it)
        it -= self.warmup_iters
        length = self.total_iters - self.warmup_iters - self.freeze_iters
        cosine = 1 + math.cos(math.pi * it / length)
        return self.final_value + 0.5 * (self.base_value - self.final_value) * cosine

    def _warmup(self, it: int) -> float:
        """Value `it` of numpy's `linspace(start, base, warmup_iters)`, which DINOv2 indexes:
        `start + it * step`, except that the last value is `base` itself and a one-iteration
        warm-up holds only `start`."""
        if self.warmup_iters == 1:
            return self.start_warmup_value
        if it == self.warmup_iters - 1:
            return self.base_value
        step = (self.base_value - self.start_warmup_value) / (self.warmup_iters - 1)
        return it * step + self.start_warmup_value


@dataclass(frozen=True)
class TrainingSchedules:
    """Every per-iteration value of DINOv2 training."""

    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_freeze_iters: int
    head_warmup_iters: int = 0
    backbone_warmup_iters: int = 0

    def backbone_frozen(self, iteration: int) -> bool:
        """Whether only the heads train: a backbone started from good weights is kept
        from the gradients of targets that random heads make."""
        return iteration < self.head_warmup_iters

    def backbone_lr(self, iteration: int) -> float:
        """The lr, times a ramp from 0 to 1 over the backbone's own warm-up that starts
        when the head warm-up ends (0 while frozen)."""
        since = iteration - self.head_warmup_iters
        if since < 0:
            return 0.0
        if since >= self.backbone_warmup_iters:
            return self.lr(iteration)
        return self.lr(iteration) * since / self.backbone_warmup_iters

    def last_layer_lr(self, iteration: int) -> float:
        """The head's last layer stays frozen at first: early prototypes are noise and
        updating them destabilizes the targets."""
        return 0.0 if iteration < self.last_layer_freeze_iters else self.lr(iteration)

    def teacher_temp_warning(self, total_iters: int) -> str | None:
        """A warning when a run of `total_iters` iterations stops inside the teacher
        temperature warm-up. DINOv2 warms over `warmup_teacher_temp_epochs` whatever the run
        length, so a short run never reaches the final temperature; said at start because
        it changes the targets from the first iteration on."""
        warmup = self.teacher_temp.warmup_iters
        if total_iters >= warmup:
            return None
        reached = self.teacher_temp(max(total_iters - 1, 0))
        return (
            f"WARNING the run ends at iteration {total_iters}, before the teacher temperature "
            f"warm-up ends at {warmup}: the teacher temperature reaches {reached:.4g}, not "
            f"{self.teacher_temp.base_value:.4g} (as in DINOv2; shorten "
            "teacher.warmup_teacher_temp_epochs to finish the warm-up)"
        )

    def at(self, iteration: int) -> dict[str, float]:
        return {
            "lr": self.lr(iteration),
            "backbone_lr": self.backbone_lr(iteration),
            "last_layer_lr": self.last_layer_lr(iteration),
            "wd": self.weight_decay(iteration),
            "momentum": self.momentum(iteration),
            "teacher_temp": self.teacher_temp(iteration),
        }


def dinov2_schedules(
    epochs: int = 100,
    epoch_length: int = 1250,
    batch_size: int = 1024,
    base_lr: float = 0.004,
    min_lr: float = 1.0e-6,
    warmup_epochs: int = 10,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.992,
    final_momentum_teacher: float = 1.0,
    teacher_temp: float = 0.07,
    warmup_teacher_temp: float = 0.04,
    warmup_teacher_temp_epochs: int = 30,
    freeze_last_layer_epochs: int = 1,
    head_warmup_epochs: int = 0,
    backbone_warmup_epochs: int = 0,
) -> TrainingSchedules:
    """DINOv2's schedules; the lr scales with sqrt(batch / 1024). The head and backbone
    warm-ups (none in DINOv2) are for backbones that start from pretrained weights."""
    total = epochs * epoch_length
    lr = base_lr * math.sqrt(batch_size / 1024)
    return TrainingSchedules(
        lr=CosineSchedule(lr, min_lr, total, warmup_iters=warmup_epochs * epoch_length),
        weight_decay=CosineSchedule(weight_decay, weight_decay_end, total),
        momentum=CosineSchedule(momentum_teacher, final_momentum_teacher, total),
        teacher_temp=CosineSchedule(
            teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs * epoch_length,
            warmup_iters=warmup_teacher_temp_epochs * epoch_length,
            start_warmup_value=warmup_teacher_temp,
        ),
        last_layer_freeze_iters=freeze_last_layer_epochs * epoch_length,
        head_warmup_iters=head_warmup_epochs * epoch_length,
        backbone_warmup_iters=backbone_warmup_epochs * epoch_length,
    )
