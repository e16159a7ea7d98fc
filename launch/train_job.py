"""The pretraining job as submitit runs it on every task, and as `launch.local` runs it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

import torch

from dinospec.config import Config
from dinospec.run.lock import lock_for_ranks
from dinospec.train.loop import Trainer
from dinospec.train.signals import Interrupted, StopRequest
from launch.preemption import requeue_handler

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def use_slurm_environment() -> None:
    """Under SLURM the process group comes from SLURM's variables (rank, world size, first
    host of the node list, a port derived from the job id); torchrun variables exported from
    the submitting shell would describe another job, so they are dropped."""
    for name in TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and not torch.cuda.is_available():
        torch.set_num_threads(int(cpus))


class TrainJob:
    """Picklable pretraining job. submitit calls `checkpoint()` on preemption or time-out and
    requeues what it returns: the same job, which resumes from the run directory's newest
    checkpoint (written at the signal). Rank 0 holds the run directory's lock while the job
    trains (`launch.local` takes it before, for all its processes)."""

    def __init__(self, config: Config, handle_signals: bool = True) -> None:
        self.config = config
        self.handle_signals = handle_signals

    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if "SLURM_PROCID" in os.environ:
            use_slurm_environment()
        stop = StopRequest()
        with stop.installed() if self.handle_signals else contextlib.nullcontext():
            trainer = Trainer(self.config, stop=stop)
            try:
                with lock_for_ranks(trainer.run_dir):
                    run_dir = trainer.run()
            except Interrupted as interrupted:
                return self._interrupted(trainer, stop, interrupted)
        return {"status": "finished", "run_dir": str(run_dir), "iteration": trainer.stop}

    def _interrupted(
        self, trainer: Trainer, stop: StopRequest, interrupted: Interrupted
    ) -> dict[str, Any]:
        """Rank 0 hands a requeue request to submitit's handler (which requeues and exits);
        the other ranks return quietly so that no failed task cancels the step first. The
        lock is released by then, so the requeued job can take it."""
        requeue = requeue_handler(stop, interrupted)
        if trainer.info.is_main:
            what = "requeueing" if requeue else "stopping"
            print(
                f"signal received: checkpoint at iteration {interrupted.iteration} written, {what}",
                flush=True,
            )
            if requeue:
                requeue(signal.SIGUSR2, None)
        return {"status": "interrupted", "iteration": interrupted.iteration}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.handle_signals))
