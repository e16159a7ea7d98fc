"""AdamW step time over a student's parameters: torch's fused kernel against its foreach path.

The parameters are those the trainer optimizes for a model size (backbone plus DINO head,
in the trainer's layer-wise groups), with random gradients. The two optimizers alternate
in rounds over the same parameters; the ratio is the median of per-round ratios. The
trainer uses the fused kernel on every device.

    python benchmarks/optimizer_step.py --model vits14 --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from dinospec.config import load_config
from dinospec.models import build_backbone
from dinospec.models.heads import DINOHead
from dinospec.train.optim import param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
KINDS = ("foreach", "fused")


def student_groups(model: str, device: str) -> list[dict]:
    backbone = build_backbone(load_config(CONFIGS / f"{model}.yaml").model).to(device)
    head = DINOHead(backbone.embed_dim).to(device)
    for param in [*backbone.parameters(), *head.parameters()]:
        param.grad = torch.randn_like(param)
    return param_groups({"backbone": backbone, "dino_head": head})


def seconds_per_step(optimizer: torch.optim.Optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vits14")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    args = parser.parse_args()

    groups = student_groups(args.model, args.device)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    optimizers = {kind: torch.optim.AdamW(groups, **{kind: True}) for kind in KINDS}
    for optimizer in optimizers.values():
        seconds_per_step(optimizer, 3)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind, optimizer in optimizers.items():
            times[kind].append(seconds_per_step(optimizer, args.steps))

    print(
        f"{args.model} + DINO head, {n_params / 1e6:.1f}M parameters, AdamW, {args.rounds} "
        f"alternating rounds of {args.steps} steps, {args.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}"
    )
    print(f"{'kernel':<10}{'median ms':>11}")
    for kind, values in times.items():
        print(f"{kind:<10}{1e3 * statistics.median(values):>11.1f}")
    ratios = [f / e for f, e in zip(times["fused"], times["foreach"], strict=True)]
    print(f"fused / foreach, median of per-round ratios: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
