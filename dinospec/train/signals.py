"""Stop training on a signal: between iterations, with a checkpoint, at the same iteration
on every rank. Every entry point uses this (`dinospec train`, `launch.local`, SLURM jobs).

SIGTERM (scancel, `kill`, a supervisor), SIGINT (Ctrl-C) and SIGUSR2 (SLURM `--signal`
before the time limit, or at preemption) ask the run to stop. A handler can run in the
middle of a step or of a collective, so it only records the request. Before each step the
ranks agree on the strongest request any of them received (one scalar all-reduce over a
CPU group, so the check waits for no GPU work), write a checkpoint together and leave the
loop by raising `Interrupted`. What follows is the entry point's business: `dinospec train`
and `launch.local` exit, a SLURM job requeues itself on SIGUSR2 (launch.preemption).

A second Ctrl-C raises KeyboardInterrupt at once, for a user who will not wait for the
step and the checkpoint. Data-loader workers ignore all three signals
(`ignore_stop_signals`): a terminal's Ctrl-C and SLURM's scancel reach every process of
the job, and a worker that died of one would take the run down before it could save.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from dinospec.distributed import host_group

STOP = 1
REQUEUE = 2
ACTIONS = {signal.SIGTERM: STOP, signal.SIGINT: STOP, signal.SIGUSR2: REQUEUE}

Handler = Callable[[int, FrameType | None], Any]


class Interrupted(Exception):
    """Training left the loop on a signal, with a checkpoint at `iteration`."""

    def __init__(self, iteration: int, action: int) -> None:
        super().__init__(f"checkpoint at iteration {iteration} written")
        self.iteration = iteration
        self.action = action


class StopRequest:
    """The strongest action asked for by a signal so far (requeue beats stop)."""

    def __init__(self) -> None:
        self.action = 0
        self.received: list[int] = []
        self.previous: dict[int, Handler | int | None] = {}

    def install(self, signals: Iterable[signal.Signals] = tuple(ACTIONS)) -> None:
        """Record the signals instead of the current handlers, which are kept: submitit's
        SIGUSR2 handler is what requeues the job once the checkpoint is written. Python
        sets handlers only in the main thread; elsewhere nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in signals:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        self.install()
        try:
            yield self
        finally:
            self.restore()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt("second Ctrl-C: stopped without a checkpoint")
        self.received.append(signum)
        self.action = max(self.action, ACTIONS.get(signal.Signals(signum), STOP))

    def agreed(self) -> int:
        """The action every rank takes: the strongest one any rank received. The flag goes
        through a gloo group on the CPU: over NCCL, reading it back would wait for all the
        GPU work queued so far, once per step. Every rank calls this at the same iteration,
        so the group is created collectively on the first call."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.action
        flag = torch.tensor([self.action])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group())
        return int(flag.item())

    def previous_handler(self, signum: signal.Signals) -> Handler | None:
        """The handler the signal had before `install`, if it was a function (submitit's
        requeue on SIGUSR2); None where it was the default or ignored."""
        previous = self.previous.get(signum)
        return previous if callable(previous) else None


def ignore_stop_signals(worker_id: int) -> None:
    """`worker_init_fn` of the data loader: its workers leave these signals to the main
    process, which stops the run with a checkpoint and then shuts them down."""
    for signum in ACTIONS:
        signal.signal(signum, signal.SIG_IGN)
