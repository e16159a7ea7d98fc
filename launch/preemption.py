"""Checkpoint on SLURM's signals, between training iterations, at the same iteration on
every rank.

A signal handler can run in the middle of a collective, so it only records the signal.
Before each step the ranks agree on what was received (one scalar all-reduce over a CPU
group, so the check waits for no GPU work), write a checkpoint together if the newest one
is older, and leave the loop. Preemption and time limits (SIGUSR2, sent by SLURM `--signal`
before the kill, and at preemption when the cluster sets `preempt_send_user_signal`) then
requeue the job through submitit; SIGTERM (scancel, `scontrol requeue`, preemption without
the user signal) only stops, since SLURM itself decides whether the job comes back.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from dinospec.config import Config
from dinospec.distributed import host_group
from dinospec.train.loop import Trainer

STOP = 1
REQUEUE = 2
ACTIONS = {signal.SIGTERM: STOP, signal.SIGUSR2: REQUEUE}

Handler = Callable[[int, FrameType | None], Any]


class Interrupted(Exception):
    """Training left the loop on a signal, after checkpointing `iteration`."""

    def __init__(self, iteration: int, action: int) -> None:
        super().__init__(f"interrupted at iteration {iteration}")
        self.iteration = iteration
        self.action = action


class StopRequest:
    """The strongest action asked for by a signal so far (requeue beats stop)."""

    def __init__(self) -> None:
        self.action = 0
        self.previous: dict[int, Handler | int | None] = {}

    def install(self, signals: Iterable[signal.Signals] = tuple(ACTIONS)) -> None:
        """Record the signals instead of the current handlers, which are kept: submitit's
        SIGUSR2 handler is what requeues the job once the checkpoint is written."""
        for signum in signals:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.action = max(self.action, ACTIONS.get(signal.Signals(signum), STOP))

    def agreed(self) -> int:
        """The action every rank takes: the strongest one any rank received. The flag goes
        through a gloo group on the CPU: over NCCL, reading it back would wait for all the
        GPU work queued so far, once per step. Every rank calls this at the same iteration,
        so the group is created collectively on the first call."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.action
        flag = torch.tensor([self.action])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group())
        return int(flag.item())

    def chain(self, signum: signal.Signals) -> None:
        """Run the handler the signal had before `install` (submitit's requeue)."""
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, None)


class PreemptibleTrainer(Trainer):
    """The pretraining run, leaving its loop with a checkpoint when a signal asks it to."""

    def __init__(self, config: Config, stop: StopRequest) -> None:
        super().__init__(config)
        self.stop_request = stop
        self.saved_iteration = -1

    def resume(self) -> int:
        self.saved_iteration = super().resume()
        return self.saved_iteration

    def checkpoint(self, iteration: int) -> Path:
        path = super().checkpoint(iteration)
        self.saved_iteration = iteration
        return path

    def before_step(self, iteration: int) -> None:
        """The state before iteration i's step is the one a periodic checkpoint at i holds
        (schedules and random streams are derived from i), so resuming from it is exact."""
        action = self.stop_request.agreed()
        if action:
            if self.saved_iteration != iteration:
                self.checkpoint(iteration)
            raise Interrupted(iteration, action)
