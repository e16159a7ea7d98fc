"""Job types the launchers know. A job type turns a config file and overrides into a
validated config and a picklable callable; the launchers do the rest (run directory,
resources, submission). A new job type (e.g. evaluation) is one more entry in JOB_TYPES."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from dinospec.config import (
    Config,
    config_to_yaml,
    data_path_problems,
    evaluation_path_problems,
    load_config,
)
from dinospec.run.layout import RunDir
from dinospec.train.checkpoint import list_checkpoints, newest_plausible


class JobType(Protocol):
    """What a launcher needs to know about one kind of job."""

    name: str
    description: str

    def load(self, config_path: str, overrides: Sequence[str], output_dir: str | None) -> Any:
        """The fully validated config, with every path made absolute on the submitting host."""
        ...

    def problems(self, config: Any) -> list[str]:
        """Why the job cannot run (missing inputs), checked before anything is submitted."""
        ...

    def output_dir(self, config: Any) -> Path: ...

    def config_text(self, config: Any) -> str:
        """The resolved config as written into the run directory."""
        ...

    def progress(self, output_dir: Path) -> str | None:
        """Where a resubmitted job will pick up, or None if there is nothing to resume."""
        ...

    def job(self, config: Any) -> Callable[[], Any]:
        """The picklable callable every task runs, under SLURM and in `launch.local`."""
        ...


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


class TrainJobType:
    """Self-supervised pretraining (`dinospec.train.loop`), preemptible and resumable."""

    name = "train"
    description = "self-supervised pretraining; resumes from the newest checkpoint"

    def load(self, config_path: str, overrides: Sequence[str], output_dir: str | None) -> Config:
        extra = [f"train.output_dir={output_dir}"] if output_dir else []
        config = load_config(config_path, [*overrides, *extra])
        data = config.data
        if data.path:
            data = dataclasses.replace(data, path=_absolute(data.path))
        train = dataclasses.replace(config.train, output_dir=_absolute(config.train.output_dir))
        evaluation = config.evaluation
        if evaluation.path:
            evaluation = dataclasses.replace(evaluation, path=_absolute(evaluation.path))
        if evaluation.seg.path:
            seg = dataclasses.replace(evaluation.seg, path=_absolute(evaluation.seg.path))
            evaluation = dataclasses.replace(evaluation, seg=seg)
        return dataclasses.replace(config, data=data, train=train, evaluation=evaluation)

    def problems(self, config: Config) -> list[str]:
        return data_path_problems(config.data) + evaluation_path_problems(config)

    def output_dir(self, config: Config) -> Path:
        return Path(config.train.output_dir)

    def config_text(self, config: Config) -> str:
        return config_to_yaml(config)

    def progress(self, output_dir: Path) -> str | None:
        root = RunDir(output_dir).checkpoints
        newest = newest_plausible(root)
        if newest is not None:
            return f"the newest checkpoint, {newest.name} (verified when the job starts)"
        found = list_checkpoints(root)
        if not found:
            return None
        return (
            f"a valid checkpoint, but none of the {len(found)} there has its recorded sizes: "
            "the job will stop and list them unless train.discard_invalid_checkpoints=true"
        )

    def job(self, config: Config) -> Callable[[], Any]:
        from launch.train_job import TrainJob

        return TrainJob(config)


class EvalJobType:
    """Evaluation of a frozen backbone (`eval.run_seg` / `eval.run_cls` / `eval.run_depth`),
    on as many processes as the job has tasks (each takes a shard of the images)."""

    def __init__(self, kind: str, description: str) -> None:
        self.kind = kind
        self.name = f"eval-{kind}"
        self.description = description

    def load(self, config_path: str, overrides: Sequence[str], output_dir: str | None) -> Any:
        from eval.config import load_eval_config

        extra = [f"output_dir={output_dir}"] if output_dir else []
        config = load_eval_config(config_path, [*overrides, *extra])
        backbone = config.backbone
        if backbone.path:
            backbone = dataclasses.replace(backbone, path=_absolute(backbone.path))
        dataset = config.dataset
        if dataset.root:
            dataset = dataclasses.replace(dataset, root=_absolute(dataset.root))
        return dataclasses.replace(
            config, backbone=backbone, dataset=dataset, output_dir=_absolute(config.output_dir)
        )

    def problems(self, config: Any) -> list[str]:
        found = []
        if not Path(config.backbone.path).exists():
            found.append(f"backbone.path={config.backbone.path}: not found")
        if config.dataset.root and not Path(config.dataset.root).is_dir():
            found.append(f"dataset.root={config.dataset.root}: not a directory")
        return found

    def output_dir(self, config: Any) -> Path:
        return Path(config.output_dir)

    def config_text(self, config: Any) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.structured(config))

    def progress(self, output_dir: Path) -> str | None:
        return None

    def job(self, config: Any) -> Callable[[], Any]:
        from launch.eval_job import EvalJob

        return EvalJob(config, self.kind)


JOB_TYPES: dict[str, JobType] = {
    job.name: job
    for job in (
        TrainJobType(),
        EvalJobType("seg", "linear segmentation probe of a frozen backbone"),
        EvalJobType("cls", "k-NN and linear classification of a frozen backbone"),
        EvalJobType("depth", "linear depth probe of a frozen backbone"),
    )
}
