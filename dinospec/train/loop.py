"""The pretraining job: build everything from a config, resume, train, log, checkpoint.

`train(config)` is what both `dinospec train` and the SLURM launcher call. The same code
runs one CPU process, several gloo processes, or many GPUs with NCCL and FSDP2.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinospec.config import Config, config_to_yaml
from dinospec.distributed import DistInfo, all_reduce_mean, init_distributed, shard_model
from dinospec.run.exports import write_export
from dinospec.run.layout import RunDir
from dinospec.run.lock import lock_for_ranks
from dinospec.train.accelerate import accelerate, autocast_dtype
from dinospec.train.checkpoint import (
    checkpoint_iteration,
    list_checkpoints,
    resume_latest,
    save_checkpoint,
    set_aside_from,
)
from dinospec.train.data import (
    build_image_dataset,
    build_loader,
    close_loader,
    derived_seed,
    to_device,
)
from dinospec.train.distill import init_distillation
from dinospec.train.ema import ema_update
from dinospec.train.evaluation import PeriodicEvaluation, load_evaluators
from dinospec.train.metrics_log import LogWindow, rewind_metrics
from dinospec.train.optim import apply_schedule_values, param_groups
from dinospec.train.phases import init_from_previous_phase
from dinospec.train.pretrained import init_from_pretrained
from dinospec.train.progress import schedule_line
from dinospec.train.reporting import RunReporter
from dinospec.train.schedules import TrainingSchedules, dinov2_schedules
from dinospec.train.signals import Interrupted, StopRequest
from dinospec.train.ssl import SSLModel
from dinospec.train.state import LossCenters, ModelPart, OptimizerPart, Progress, TrainingState

log = logging.getLogger("dinospec.train")


class NonFiniteLossError(RuntimeError):
    """Training stopped because loss terms stayed non-finite; names them."""


def schedules_for(
    config: Config, global_batch: int, warm_up_heads: bool = False
) -> TrainingSchedules:
    """The run's schedules; `warm_up_heads` (a backbone from weights, new heads) adds the
    head warm-up with frozen backbones and the backbone's own lr warm-up after it."""
    o, t = config.optim, config.teacher
    return dinov2_schedules(
        epochs=o.epochs,
        epoch_length=config.train.epoch_length,
        batch_size=global_batch,
        base_lr=o.base_lr,
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp=t.warmup_teacher_temp,
        warmup_teacher_temp_epochs=t.warmup_teacher_temp_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs,
        head_warmup_epochs=o.head_warmup_epochs if warm_up_heads else 0,
        backbone_warmup_epochs=o.backbone_warmup_epochs if warm_up_heads else 0,
    )


@dataclass
class StepResult:
    losses: dict[str, float]
    monitor: dict[str, Tensor]  # on the device: read only when logged
    nonfinite: list[str]


class Trainer:
    """One training run; `run()` goes from the resume point to the configured end."""

    def __init__(
        self, config: Config, device: str = "auto", stop: StopRequest | None = None
    ) -> None:
        """`device` is 'auto' (CUDA when there is one), 'cpu' or 'cuda', so a benchmark can
        time a CPU run on a GPU machine. With `stop`, the run leaves its loop with a
        checkpoint when a signal asks it to (dinospec.train.signals)."""
        self.config = config
        self.stop_request = stop
        self.reporter: RunReporter | None = None
        self.last_checkpoint: Path | None = None
        self.info: DistInfo = init_distributed(device, need_group=config.train.fsdp)
        if self.info.device.type == "cpu" and config.data.num_workers:
            # small CPU ops run slower when data workers and compute threads oversubscribe
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - config.data.num_workers))
        self.run_dir = Path(config.train.output_dir)
        self.layout = RunDir(self.run_dir)
        self.images = build_image_dataset(config)
        evaluators = load_evaluators(config, self.info)
        torch.manual_seed(config.train.seed)
        model = SSLModel(config)
        self.pretrained = init_from_pretrained(model, config)
        self.phase = init_from_previous_phase(model, config)
        self.distill = init_distillation(model, config)
        for start in (self.pretrained, self.phase, self.distill):
            if start is not None:
                self._log(start.describe())
        self.model = model.to(self.info.device)
        self.model.train()
        self.autocast_dtype = autocast_dtype(config.train.precision, self.info.device)
        accelerate(self.model, config.train, self.info.device)
        if config.train.fsdp or self.info.world_size > 1:
            bf16 = self.autocast_dtype == torch.bfloat16
            for part in (self.model.student, self.model.teacher):
                shard_model(part.backbone, part.backbone.blocks, bf16)
                for name, head in part.items():
                    if name != "backbone":
                        shard_model(head, [], bf16)
            for frozen in (self.model.gram_teacher, self.model.distill_teacher):
                if frozen is not None:
                    shard_model(frozen.backbone, frozen.backbone.blocks, bf16)
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(
                dict(self.model.student.items()), o.layerwise_decay, o.patch_embed_lr_mult
            ),
            betas=(o.adamw_beta1, o.adamw_beta2),
            fused=True,
        )
        self.global_batch = config.train.batch_size_per_gpu * self.info.world_size
        warm_up_heads = self.pretrained is not None and self.pretrained.heads_from is None
        self.schedules = schedules_for(config, self.global_batch, warm_up_heads)
        self.total = o.epochs * config.train.epoch_length
        self.stop = min(n for n in (self.total, config.train.max_iterations) if n is not None)
        self.progress = Progress()
        parts = {
            "student": ModelPart(self.model.student),
            "teacher": ModelPart(self.model.teacher),
            "optimizer": OptimizerPart(self.model.student, self.optimizer),
            "losses": LossCenters(self.model.dino_loss, self.model.ibot_loss),
            "progress": self.progress,
        }
        if self.model.gram_teacher is not None:
            parts["gram_teacher"] = ModelPart(self.model.gram_teacher)
        self.state = TrainingState(parts)
        self.evaluation = PeriodicEvaluation(
            config, evaluators, self.stop, self.info.device, self.autocast
        )

    def autocast(self) -> torch.autocast:
        """The forward passes' autocast (disabled in fp32), for training and evaluation."""
        dtype = self.autocast_dtype
        return torch.autocast(self.info.device.type, dtype or torch.bfloat16, enabled=bool(dtype))

    def _log(self, message: str) -> None:
        if self.reporter is not None:
            self.reporter.write(message)
        elif self.info.is_main:
            print(message, flush=True)

    def resume(self) -> int:
        """Load the newest valid checkpoint into every part of the state; the iteration to
        go on from (0 for a new run)."""
        state = self.state.state_dict()
        found = resume_latest(
            self.layout.checkpoints, state, self.config.train.discard_invalid_checkpoints
        )
        if found is None:
            return 0
        self.state.load_state_dict(state)
        iteration = int(self.progress.iteration)
        self._log(f"resumed from iteration {iteration} in {self.layout.checkpoints}")
        return iteration

    def checkpoint(self, iteration: int) -> Path:
        self.progress.iteration.fill_(iteration)
        self.model.dino_loss.apply_center_update()
        self.model.ibot_loss.apply_center_update()
        path = save_checkpoint(
            self.layout.checkpoints, iteration, self.state.state_dict(), self.config.train.keep_last
        )
        self.export_teacher(iteration)
        self.last_checkpoint = path
        return path

    def export_teacher(self, iteration: int) -> None:
        """The teacher backbone as plain DINOv2-keyed `.pth` and as `.safetensors`."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model.teacher.backbone, options=options)
        if self.info.is_main:
            write_export(state, self.config.model, self.layout, iteration)

    def step(
        self,
        batch: dict[str, Any],
        values: dict[str, float],
        frozen_backbone: bool = False,
        gram: bool = False,
    ) -> StepResult:
        """One optimization step. A non-finite loss term skips the update on every rank
        (the flag is reduced), before anything (weights, centers) has changed. With
        `frozen_backbone` (the head warm-up) only the heads and centres change: the
        student backbone gets no gradient and the teacher's backbone no EMA update. With
        `gram` the Gram anchoring term joins the loss.

        The host waits for the device once per step, after the backward pass is queued
        (the finiteness flags and the logged loss terms travel together), so the GPU is not
        left idle between forward and backward; the collapse monitor stays on the device
        until a log line needs it. Gradients are let go before the forward passes, not
        after, so last step's are not held at the activation peak."""
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            targets = model.teacher_targets(batch, values["teacher_temp"], gram)
            terms, student_cls = model.losses(batch, targets, not frozen_backbone)
        sum(terms.values()).backward()
        finite, means = _reduced_flags_and_means(list(terms.values()))
        losses = dict(zip(terms, means, strict=True))
        bad = [name for name, ok in zip(terms, finite, strict=True) if not ok]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(losses, {}, bad)
        model.update_centers(targets)
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.config.optim.clip_grad)
        self.optimizer.step()
        for name, part in model.teacher.items():
            if not (frozen_backbone and name == "backbone"):
                ema_update(part, model.student[name], values["momentum"])
        return StepResult(losses, model.monitor(targets, student_cls), [])

    def run(self) -> Path:
        """From the resume point to the stop, then the summary. A new run's metrics start
        empty (records of an attempt that wrote no checkpoint go, an evaluation at 0 too)."""
        start = self.resume()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.layout.config.write_text(config_to_yaml(self.config))
            rewind_metrics(self.layout.metrics, start if start > 0 else -1)
        if start >= self.stop:
            self._log(f"nothing to do: run is at iteration {start}, stop is {self.stop}")
            return self.run_dir
        if warning := self.schedules.teacher_temp_warning(self.total):
            self._log(warning)
        self.reporter = RunReporter(
            self.layout, self.info.is_main, start, self.stop, self._phase_fields()
        )
        self._log(schedule_line(start, self.stop, self.total, self.run_dir))
        loader = build_loader(self.config, self.images, self.info.rank, self.info.world_size, start)
        try:
            if start == 0:
                self.evaluate(0)
            self._loop(loader, start)
            self.reporter.finish(self.last_checkpoint)
        finally:
            close_loader(loader)
            self.reporter.close()
            self.reporter = None
        return self.run_dir

    def evaluate(self, iteration: int) -> None:
        """The teacher backbone's evaluation, if one is due at `iteration`; it changes
        nothing training reads (dinospec.train.evaluation)."""
        if self.evaluation.due(iteration):
            report = self.evaluation.run(self.model.teacher.backbone, iteration)
            self.reporter.log_eval(report)

    def _loop(self, loader: Iterator[dict[str, Any]], start: int) -> None:
        cfg = self.config.train
        window = LogWindow()
        nonfinite_since: int | None = None
        for iteration in range(start, self.stop):
            self.before_step(iteration)
            values = self.schedules.at(iteration)
            apply_schedule_values(self.optimizer, values)
            torch.manual_seed(derived_seed(cfg.seed, iteration, self.info.rank))
            t0 = time.perf_counter()
            batch = to_device(next(loader), self.info.device)
            window.data_time += time.perf_counter() - t0
            if batch["step"] != iteration:
                raise RuntimeError(f"data stream at step {batch['step']}, training at {iteration}")
            frozen = self.schedules.backbone_frozen(iteration)
            result = self.step(batch, values, frozen, self.gram_step(iteration))
            window.iterations += 1
            self.reporter.advance(sum(result.losses.values()) if not result.nonfinite else None)
            if result.nonfinite:
                nonfinite_since = iteration if nonfinite_since is None else nonfinite_since
                self._handle_nonfinite(iteration, result.nonfinite, nonfinite_since)
                continue
            nonfinite_since = None
            window.losses.append(sum(result.losses.values()))
            done = iteration + 1
            if done % cfg.log_every == 0 or done == self.stop:
                warmup_end = self.config.optim.warmup_epochs * cfg.epoch_length
                self.reporter.log_step(
                    done,
                    result.losses,
                    result.monitor,
                    values,
                    window,
                    self.global_batch,
                    self.info.device,
                    warmup_end,
                )
                window = LogWindow()
            self.evaluate(done)
            if done % cfg.checkpoint_every == 0 or done == self.stop:
                self.checkpoint(done)

    def gram_step(self, iteration: int) -> bool:
        """Whether this iteration has the Gram anchoring term, after snapshotting the EMA
        teacher into the Gram teacher when one is due. Runs after `before_step`, so a
        checkpoint written there holds the snapshot the step before it used."""
        gram_teacher = self.model.gram_teacher
        if gram_teacher is None or not gram_teacher.active(iteration):
            return False
        if gram_teacher.due(iteration):
            gram_teacher.refresh(self.model.teacher.backbone, iteration)
            self._log(f"iteration {iteration}: Gram teacher <- EMA teacher")
        return True

    def before_step(self, iteration: int) -> None:
        """Called before each iteration, when the state is exactly what a checkpoint at
        `iteration` holds (schedules and random streams derive from the iteration), so a
        run stopped here on a signal resumes exactly. The ranks agree on the request, save
        unless the checkpoint at `iteration` is the one just written or resumed from
        (`progress.iteration` is that checkpoint's), and leave the loop."""
        if self.stop_request is None:
            return
        action = self.stop_request.agreed()
        if not action:
            return
        if iteration == 0 or int(self.progress.iteration) != iteration:
            self.checkpoint(iteration)
        raise Interrupted(iteration, action)

    def _handle_nonfinite(self, iteration: int, names: list[str], since: int) -> None:
        """Skip the update; after too many skips, stop. Skipped steps leave the state as it
        was, so the state at `since` (the first of the current run of non-finite steps)
        is the one that diverged: checkpoints from `since` on hold it, and are moved aside
        so that a rerun with a changed recipe resumes from the last one written before."""
        self.progress.skipped += 1
        skipped = int(self.progress.skipped)
        message = f"iteration {iteration}: non-finite loss term(s) {names}; update skipped"
        log.warning(message)
        self._log(f"WARNING {message} ({skipped}/{self.config.train.max_nonfinite_skips})")
        if skipped > self.config.train.max_nonfinite_skips:
            root = self.layout.checkpoints
            diverged = set_aside_from(root, since) if self.info.is_main else []
            good = [p for p in list_checkpoints(root) if checkpoint_iteration(p) < since]
            moved = ", ".join(str(p) for p in diverged)
            moved = f"; moved aside, holding the diverged state: {moved}" if moved else ""
            raise NonFiniteLossError(
                f"loss term(s) {names} not finite at iteration {iteration} after {skipped - 1} "
                f"skipped steps (the first at iteration {since}); stopping. Last checkpoint "
                f"written before the divergence: {good[-1] if good else 'none'}{moved}"
            )

    def _phase_fields(self) -> dict[str, int]:
        """A phase's records say which phase they belong to and where it starts on the
        overall iteration axis; a run that is no phase carries neither."""
        if self.phase is None:
            return {}
        return {"phase": self.phase.number, "phase_offset": self.phase.offset}


def _reduced_flags_and_means(terms: list[Tensor]) -> tuple[list[bool], list[float]]:
    """Whether each loss term is finite on every rank, and its mean over ranks, with one
    collective each and a single wait for the device."""
    finite = torch.stack([torch.isfinite(t).all() for t in terms]).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    means = all_reduce_mean(torch.stack([t.detach().float() for t in terms]))
    both = torch.cat([finite, means]).tolist()
    return [flag == 1.0 for flag in both[: len(terms)]], both[len(terms) :]


def train(config: Config) -> Path:
    """Run (or resume) the pretraining job a config describes; returns the run directory.

    The run holds its directory's lock (dinospec.run.lock: RunDirLocked if another
    run has it). SIGTERM, SIGINT and SIGUSR2 stop it after the current step with a
    checkpoint and raise Interrupted; a second SIGINT raises KeyboardInterrupt at once."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with StopRequest().installed() as stop:
        trainer = Trainer(config, stop=stop)
        try:
            with lock_for_ranks(trainer.run_dir):
                return trainer.run()
        except Interrupted as interrupted:
            trainer._log(f"signal received: {interrupted}, stopping (the same command resumes)")
            raise
