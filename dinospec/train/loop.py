"""The pretraining job: build everything from a config, resume, train, log, checkpoint.

`train(config)` is what both `dinospec train` and the SLURM launcher call. The same code
runs one CPU process, several gloo processes, or many GPUs with NCCL and FSDP2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinospec.config import Config, config_to_yaml
from dinospec.distributed import DistInfo, all_reduce_mean, init_distributed, shard_model
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
from dinospec.train.ema import ema_update
from dinospec.train.exports import write_export
from dinospec.train.optim import apply_schedule_values, param_groups
from dinospec.train.pretrained import init_from_pretrained
from dinospec.train.runlock import lock_for_ranks
from dinospec.train.schedules import TrainingSchedules, dinov2_schedules
from dinospec.train.signals import Interrupted, StopRequest
from dinospec.train.ssl import SSLModel

log = logging.getLogger("dinospec.train")


class NonFiniteLossError(RuntimeError):
    """Training stopped because loss terms stayed non-finite; names them."""


@dataclass
class Progress:
    """What a resumed run needs beyond the weights: every random draw and schedule value
    is a function of the seed and these counters, so they restore every RNG stream."""

    iteration: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    skipped: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))


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


def _checkpoint_state(
    model: SSLModel, optimizer: torch.optim.Optimizer, progress: Progress
) -> dict:
    """Tensors only: DCP would pickle anything else, and loading must never unpickle.
    Optimizer param groups are left out; they are rebuilt from the config every step."""
    return {
        "student": get_model_state_dict(model.student),
        "teacher": get_model_state_dict(model.teacher),
        "optimizer": {"state": get_optimizer_state_dict(model.student, optimizer)["state"]},
        "losses": {"dino_center": model.dino_loss.center, "ibot_center": model.ibot_loss.center},
        "progress": {"iteration": progress.iteration, "skipped": progress.skipped},
    }


def _restore(model: SSLModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_model_state_dict(model.student, state["student"])
    set_model_state_dict(model.teacher, state["teacher"])
    full = get_optimizer_state_dict(model.student, optimizer)
    full["state"] = state["optimizer"]["state"]
    set_optimizer_state_dict(model.student, optimizer, full)


@dataclass
class StepResult:
    losses: dict[str, float]
    monitor: dict[str, Tensor]  # on the device: read only when logged
    nonfinite: list[str]


@dataclass
class LogWindow:
    """What the iterations since the last log line add up to. A single step's loss comes
    from one batch and jumps from step to step; the mean over the window shows the trend."""

    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0
    data_time: float = 0.0
    losses: list[float] = field(default_factory=list)


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
        self.info: DistInfo = init_distributed(device, need_group=config.train.fsdp)
        if self.info.device.type == "cpu" and config.data.num_workers:
            # small CPU ops run slower when data workers and compute threads oversubscribe
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - config.data.num_workers))
        self.run_dir = Path(config.train.output_dir)
        self.images = build_image_dataset(config)
        torch.manual_seed(config.train.seed)
        model = SSLModel(config)
        self.pretrained = init_from_pretrained(model, config)
        if self.pretrained is not None:
            self._log(self.pretrained.describe())
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
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def _log(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    def resume(self) -> int:
        state = _checkpoint_state(self.model, self.optimizer, self.progress)
        iteration = resume_latest(
            self.run_dir / "checkpoints", state, self.config.train.discard_invalid_checkpoints
        )
        if iteration is None:
            return 0
        _restore(self.model, self.optimizer, state)
        self._log(f"resumed from iteration {iteration} in {self.run_dir / 'checkpoints'}")
        return iteration

    def checkpoint(self, iteration: int) -> Path:
        self.progress.iteration.fill_(iteration)
        self.model.dino_loss.apply_center_update()
        self.model.ibot_loss.apply_center_update()
        state = _checkpoint_state(self.model, self.optimizer, self.progress)
        path = save_checkpoint(
            self.run_dir / "checkpoints", iteration, state, self.config.train.keep_last
        )
        self.export_teacher(iteration)
        return path

    def export_teacher(self, iteration: int) -> None:
        """The teacher backbone as plain DINOv2-keyed `.pth` and as `.safetensors`."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model.teacher.backbone, options=options)
        if self.info.is_main:
            write_export(state, self.config.model, self.run_dir, iteration)

    def step(
        self, batch: dict[str, Any], values: dict[str, float], frozen_backbone: bool = False
    ) -> StepResult:
        """One optimization step. A non-finite loss term skips the update on every rank
        (the flag is reduced), before anything (weights, centers) has changed. With
        `frozen_backbone` (the head warm-up) only the heads and centres change: the
        student backbone gets no gradient and the teacher's backbone no EMA update.

        The host waits for the device once per step, after the backward pass is queued
        (the finiteness flags and the logged loss terms travel together), so the GPU is not
        left idle between forward and backward; the collapse monitor stays on the device
        until a log line needs it. Gradients are let go before the forward passes, not
        after, so last step's are not held at the activation peak."""
        model, device, dtype = self.model, self.info.device, self.autocast_dtype
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None):
            targets = model.teacher_targets(batch, values["teacher_temp"])
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
        start = self.resume()
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.config))
            rewind_metrics(self.metrics_path, start)
        if start >= self.stop:
            self._log(f"nothing to do: run is at iteration {start}, stop is {self.stop}")
            return self.run_dir
        if warning := self.schedules.teacher_temp_warning(self.total):
            self._log(warning)
        self._log(
            f"training iterations {start}..{self.stop - 1} of {self.total}, run dir {self.run_dir}"
        )
        loader = build_loader(self.config, self.images, self.info.rank, self.info.world_size, start)
        try:
            self._loop(loader, start)
        finally:
            close_loader(loader)
        return self.run_dir

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
            result = self.step(batch, values, self.schedules.backbone_frozen(iteration))
            window.iterations += 1
            if result.nonfinite:
                nonfinite_since = iteration if nonfinite_since is None else nonfinite_since
                self._handle_nonfinite(iteration, result.nonfinite, nonfinite_since)
                continue
            nonfinite_since = None
            window.losses.append(sum(result.losses.values()))
            done = iteration + 1
            if done % cfg.log_every == 0 or done == self.stop:
                self._write_metrics(done, result, values, window)
                window = LogWindow()
            if done % cfg.checkpoint_every == 0 or done == self.stop:
                self.checkpoint(done)

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
            root = self.run_dir / "checkpoints"
            diverged = set_aside_from(root, since) if self.info.is_main else []
            good = [p for p in list_checkpoints(root) if checkpoint_iteration(p) < since]
            moved = ", ".join(str(p) for p in diverged)
            moved = f"; moved aside, holding the diverged state: {moved}" if moved else ""
            raise NonFiniteLossError(
                f"loss term(s) {names} not finite at iteration {iteration} after {skipped - 1} "
                f"skipped steps (the first at iteration {since}); stopping. Last checkpoint "
                f"written before the divergence: {good[-1] if good else 'none'}{moved}"
            )

    def _write_metrics(
        self,
        iteration: int,
        result: StepResult,
        values: dict[str, float],
        window: LogWindow,
    ) -> None:
        losses = result.losses
        monitor = {k: float(v) for k, v in result.monitor.items()}
        iters = max(window.iterations, 1)
        per_iter = (time.perf_counter() - window.start) / iters
        if self.info.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {
            "iteration": iteration,
            "loss": sum(losses.values()),
            "loss_window_mean": statistics.fmean(window.losses),
            **{f"loss_{k}": v for k, v in losses.items()},
            **{k: values[k] for k in ("lr", "backbone_lr", "wd", "momentum", "teacher_temp")},
            **monitor,
            "images_per_s": self.global_batch / per_iter,
            "data_time_s": window.data_time / iters,
            "iter_time_s": per_iter,
            "peak_memory_mb": peak_mb,
            "eta_s": per_iter * (self.stop - iteration),
        }
        if not self.info.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        terms = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        self._log(
            f"it {iteration}/{self.stop} loss {record['loss']:.4f} ({terms}) mean of last "
            f"{len(window.losses)} {record['loss_window_mean']:.4f} lr {values['lr']:.2e} "
            f"wd {values['wd']:.3f} mom {values['momentum']:.4f} T {values['teacher_temp']:.3f} "
            f"| {record['images_per_s']:.1f} img/s data {record['data_time_s']:.3f}s "
            f"mem {peak_mb:.0f}MB eta {_duration(record['eta_s'])}"
        )
        self._warn_collapse(iteration, monitor)

    def _warn_collapse(self, iteration: int, monitor: dict[str, float]) -> None:
        """Only after the lr warm-up: LayerScale starts at 1e-5, so at first every image's
        [CLS] is nearly the same by construction, not by collapse."""
        if iteration < self.config.optim.warmup_epochs * self.config.train.epoch_length:
            return
        std, entropy = monitor.get("student_cls_std"), monitor.get("teacher_entropy")
        if std is not None and std < 0.05:
            self._log(
                f"WARNING it {iteration}: student [CLS] features collapsed (spread {std:.3f})"
            )
        if entropy is not None and entropy < 0.01:
            self._log(f"WARNING it {iteration}: teacher targets collapsed onto few prototypes")
        if entropy is not None and entropy > 0.99:
            self._log(
                f"WARNING it {iteration}: teacher targets nearly uniform (normalized entropy "
                f"{entropy:.4f}): the run is collapsing to a constant output"
            )


def rewind_metrics(path: Path, iteration: int) -> None:
    """Drop from a metrics file what a run resuming at `iteration` will log again (the
    records after its checkpoint) and any line the previous process left unreadable (a
    kill mid-write; appended to, it would sit in the middle of the file). Rewritten
    through a temporary file, so a crash here leaves the old file whole."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: dropped an unreadable line: %.80r", path, number, line)
            continue
        if record["iteration"] <= iteration:
            kept.append(line + "\n")
    partial = path.with_name(path.name + ".tmp")
    try:
        partial.write_text("".join(kept))
    except OSError as err:
        partial.unlink(missing_ok=True)
        message = f"cannot rewrite {path} ({err.strerror}); it is unchanged"
        raise OSError(err.errno, message) from err
    partial.replace(path)


def _reduced_flags_and_means(terms: list[Tensor]) -> tuple[list[bool], list[float]]:
    """Whether each loss term is finite on every rank, and its mean over ranks, with one
    collective each and a single wait for the device."""
    finite = torch.stack([torch.isfinite(t).all() for t in terms]).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    means = all_reduce_mean(torch.stack([t.detach().float() for t in terms]))
    both = torch.cat([finite, means]).tolist()
    return [flag == 1.0 for flag in both[: len(terms)]], both[len(terms) :]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}"


def train(config: Config) -> Path:
    """Run (or resume) the pretraining job a config describes; returns the run directory.

    The run holds its directory's lock (dinospec.train.runlock: RunDirLocked if another
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
