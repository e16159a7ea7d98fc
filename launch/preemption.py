"""SLURM's side of stopping on a signal.

Every run stops on SIGTERM, SIGINT and SIGUSR2 after its current step, with a checkpoint,
at the same iteration on every rank (dinospec.train.signals). A SLURM job then requeues
itself on SIGUSR2 (sent by `--signal` before the time limit, and at preemption when the
cluster sets `preempt_send_user_signal`) through submitit's handler, which the job runs
once the checkpoint is written. SIGTERM (scancel, `scontrol requeue`, preemption without
the user signal) only stops, since SLURM itself decides whether the job comes back.
"""

from __future__ import annotations

import signal

from dinospec.train.signals import REQUEUE, Handler, Interrupted, StopRequest


def requeue_handler(stop: StopRequest, interrupted: Interrupted) -> Handler | None:
    """submitit's SIGUSR2 handler (it requeues the job and exits) when the run stopped to
    be requeued; None after a plain stop, or outside submitit (`launch.local`), where
    nothing can requeue the run."""
    if interrupted.action != REQUEUE:
        return None
    return stop.previous_handler(signal.SIGUSR2)
