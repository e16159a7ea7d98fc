"""Forward+backward time of a specialized ViT against its vanilla twin, on this machine.

The paper promises no extra compute; FLOPs are equal by construction, so what is left to
measure is the cost of routing tokens (slicing, concatenation, per-type affines). The two
models run alternately so drift in machine speed hits both alike; the table reports the
median of the per-round ratios. It also counts the kernels one step runs, since on a GPU
small ones cost time out of proportion to their FLOPs: eager, the operators dispatched
(views and allocations left out); with `--compile` (the blocks compiled as in training),
the kernels the profiler sees: every GPU kernel on CUDA, and on a CPU every loop inductor
generated plus the matrix products and attention it calls.

On a shared machine wall time measures the neighbours as much as the models; `--clock cpu`
times the process's CPU seconds instead (with `--threads 1` that is the one thread doing
the work), which time spent waiting for a core does not inflate.

    python benchmarks/specialize_overhead.py [--model vits14] [--batch 16] [--rounds 7] [--compile]
        [--clock {wall,cpu}] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch._inductor import config as inductor_config
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from dinospec.config import load_config
from dinospec.models import build_backbone
from dinospec.models.convert import specialize_backbone
from dinospec.train.accelerate import compile_blocks

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
# What inductor's CPU code calls instead of generating a loop.
EXTERN_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_seconds(
    model: torch.nn.Module, images: torch.Tensor, clock: Callable[[], float] = time.perf_counter
) -> float:
    start = clock()
    out = model(images, is_training=True)
    (out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].mean()).backward()
    if images.is_cuda:
        torch.cuda.synchronize()
    return clock() - start


class OperatorCount(TorchDispatchMode):
    """Counts the operators that read or write tensor data: a view (an output aliasing an
    input, nothing written) and an allocation (`empty*`) run no kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: tuple,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> object:
        returns = func._schema.returns
        alias = returns[0].alias_info if returns else None
        is_view = alias is not None and not alias.is_write
        if not is_view and not func.__name__.startswith(("empty", "new_empty")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def operators_per_step(model: torch.nn.Module, images: torch.Tensor) -> int:
    with OperatorCount() as counter:
        step_seconds(model, images)
    model.zero_grad(set_to_none=True)
    return counter.count


def compiled_kernels_per_step(model: torch.nn.Module, images: torch.Tensor) -> int:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if images.is_cuda else [])
    with profile(activities=activities) as prof:
        step_seconds(model, images)
    model.zero_grad(set_to_none=True)
    events = prof.events()
    if images.is_cuda:
        return sum(e.device_type == DeviceType.CUDA for e in events)
    return sum("cpp_fused" in e.name or e.name.startswith(EXTERN_KERNELS) for e in events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vits14")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="compile the blocks first")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures host work only: use it with --device cpu")

    spec = load_config(CONFIGS / f"{args.model}_spec.yaml").model.specialize
    vanilla_cfg = load_config(CONFIGS / f"{args.model}.yaml").model
    vanilla = build_backbone(replace(vanilla_cfg, drop_path_rate=0.0)).to(args.device).train()
    specialized = specialize_backbone(vanilla, spec)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    models = {"vanilla": vanilla, "specialized": specialized}
    count = operators_per_step
    if args.compile:
        inductor_config.cpp.enable_kernel_profile = True
        for model in models.values():
            compile_blocks(model.blocks)
            step_seconds(model, images)
        count = compiled_kernels_per_step
    kernels = {name: count(model, images) for name, model in models.items()}

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            times[name].append(step_seconds(model, images, CLOCKS[args.clock]))
    ratios = [s / v for s, v in zip(times["specialized"], times["vanilla"], strict=True)]

    print(
        f"{args.model}, batch {args.batch} x {args.img_size}px, fwd+bwd, {args.rounds} "
        f"alternating rounds, {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"{'compiled blocks' if args.compile else 'eager'}, {args.clock} clock"
    )
    print(f"{'model':<12}{'median s':>10}{'min s':>10}{'max s':>10}{'kernels':>9}")
    for name, values in times.items():
        print(
            f"{name:<12}{statistics.median(values):>10.3f}{min(values):>10.3f}"
            f"{max(values):>10.3f}{kernels[name]:>9}"
        )
    print(f"specialized / vanilla, median of per-round ratios: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
