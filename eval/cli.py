"""`dinospec eval-seg`, `eval-cls` and `eval-depth`, plugged into the `dinospec` command through
the `dinospec.commands` entry-point group (dinospec itself never imports eval).

    dinospec eval-seg configs/eval/camvid_linear.yaml backbone.path=runs/vits14
    python -m eval.cli eval-cls configs/eval/imagenette_knn_linear.yaml seed=1

Under torchrun or srun the same commands share the work out over the processes (one GPU
each with `device: cuda`) and give the results of one process:

    torchrun --nproc_per_node 8 -m eval.cli eval-cls configs/eval/imagenet_knn.yaml \
        backbone.path=runs/vitl14
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dinospec.config import ConfigError
from dinospec.data.datasets import TooManyBadImagesError
from dinospec.models.checkpoints import CheckpointError
from eval.config import EvalConfig, load_eval_config

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, TooManyBadImagesError)
"""Problems with the inputs: reported as one message, not a traceback."""

Job = Callable[[EvalConfig], dict[str, Any]]


def _run(job_name: str, load_job: Callable[[], Job]) -> Callable[[argparse.Namespace], None]:
    """A subcommand handler; the job module is imported only when it runs, so `--help`
    stays fast and does not pull in matplotlib."""

    def handler(args: argparse.Namespace) -> None:
        try:
            config = load_eval_config(args.config, args.overrides)
            load_job()(config)
        except USER_ERRORS as err:
            print(f"dinospec {job_name}: {type(err).__name__}: {err}", file=sys.stderr)
            raise SystemExit(2) from err

    return handler


def _segmentation_job() -> Job:
    from eval.run_seg import evaluate_segmentation

    return evaluate_segmentation


def _depth_job() -> Job:
    from eval.run_depth import evaluate_depth

    return evaluate_depth


def _classification_job() -> Job:
    from eval.run_cls import evaluate_classification

    return evaluate_classification


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval-seg`, `eval-cls` and `eval-depth` to a command's subparsers."""
    jobs = (
        ("eval-seg", "linear segmentation probe (mIoU) of a frozen backbone", _segmentation_job),
        ("eval-cls", "k-NN and linear classification of a frozen backbone", _classification_job),
        ("eval-depth", "linear depth probe (RMSE) of a frozen backbone", _depth_job),
    )
    for name, help_text, job in jobs:
        parser = subparsers.add_parser(name, help=help_text)
        parser.add_argument("config", help="evaluation YAML, e.g. configs/eval/camvid_linear.yaml")
        parser.add_argument(
            "overrides", nargs="*", help="key=value overrides, e.g. backbone.path=runs/x"
        )
        parser.set_defaults(func=_run(name, job))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m eval.cli`: the same subcommands without installing the entry point."""
    parser = argparse.ArgumentParser(prog="python -m eval.cli", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
