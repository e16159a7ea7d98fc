"""Evaluation jobs (linear segmentation, k-NN and linear classification, linear depth) as
submitit runs them: one process per task, each on its shard of the images, from scratch
each time (an evaluation writes no checkpoints; a requeued one simply runs again)."""

from __future__ import annotations

from typing import Any

from eval.config import EvalConfig


class EvalJob:
    """Picklable evaluation of a frozen backbone; `kind` is 'seg', 'cls' or 'depth'."""

    def __init__(self, config: EvalConfig, kind: str) -> None:
        self.config = config
        self.kind = kind

    def __call__(self) -> dict[str, Any]:
        if self.kind == "seg":
            from eval.run_seg import evaluate_segmentation

            return evaluate_segmentation(self.config)
        if self.kind == "depth":
            from eval.run_depth import evaluate_depth

            return evaluate_depth(self.config)
        from eval.run_cls import evaluate_classification

        return evaluate_classification(self.config)

    def checkpoint(self) -> Any:
        """Requeued as is on preemption: the evaluation restarts."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)
