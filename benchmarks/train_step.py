"""Images/s, peak memory and model FLOPs utilization of the full DINOv2 training step.

The step timed is the training loop's own (`Trainer.step`): teacher on the global crops,
student on all crops with iBOT masks, DINO + iBOT + KoLeo losses, backward, gradient
clipping, AdamW and the EMA update, on a batch made by the training data pipeline. Vanilla
and specialized (the paper's specialization) twins of each size run alternately in one
process, so drift in machine speed hits both alike; the ratio is the median of the
per-round ratios. `--multi-crop-attention per_crop,one_pass` adds a twin of each running
the student's multi-crop call as one sequence (dinospec.models.one_pass), and the one/per
column gives its step time over the per-crop twin's.

FLOPs are model FLOPs: the backbone's forward counted by fvcore as `dinospec info` does
(multiply-adds x 2), the heads' linear layers analytically; training counts the student's
forward and backward as 3 forwards and the teacher's forward as 1. Recomputation by
activation checkpointing and samples skipped by stochastic depth are not subtracted or
added, as usual for MFU. The utilization is against the device's dense bf16 peak.

    python benchmarks/train_step.py                        # ViT-S/B/L, DINOv2's step
    python benchmarks/train_step.py --models s --batch 4 --global-size 112 --local-size 56 \\
        --prototypes 4096 --rounds 3                        # about 2 minutes on a CPU
    python benchmarks/train_step.py --models l --profile 25  # and where ViT-L's step time goes
    python benchmarks/train_step.py --models l --multi-crop-attention per_crop,one_pass
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinospec.config import Config, load_config
from dinospec.config.schema import MULTI_CROP_ATTENTIONS
from dinospec.models import build_backbone
from dinospec.models.heads import DINOHead
from dinospec.report import count_gflops
from dinospec.train.data import build_loader, to_device
from dinospec.train.loop import Trainer
from dinospec.train.optim import apply_schedule_values

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
VARIANTS = {"vanilla": "", "specialized": "_spec"}
# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; the first name contained
# in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def step_config(
    size: str, variant: str, mode: str, args: argparse.Namespace, run_dir: str
) -> Config:
    """DINOv2's ImageNet-1k recipe for one size, fed by the embedded synthetic images (the
    data pipeline runs once, outside the timing) at the requested crop sizes, with the
    multi-crop call run by `mode` (model.multi_crop_attention)."""
    recipe = CONFIGS / f"vit{size}14_in1k{VARIANTS[variant]}.yaml"
    return load_config(
        recipe,
        [
            "data.dataset=synthetic",
            f"data.synthetic_size={args.batch}",
            "data.num_workers=0",
            f"crops.global_crops_size={args.global_size}",
            f"crops.local_crops_size={args.local_size}",
            f"crops.local_crops_number={args.local_crops}",
            f"dino.head_n_prototypes={args.prototypes}",
            f"ibot.head_n_prototypes={args.prototypes}",
            f"train.batch_size_per_gpu={args.batch}",
            f"train.compile={args.compile}",
            f"train.precision={args.dtype}",
            f"train.activation_checkpointing={args.activation_checkpointing}",
            f"train.output_dir={run_dir}",
            f"model.multi_crop_attention={mode}",
            f"model.attn_backend={args.attn_backend}",
        ],
    )


def head_macs(head: DINOHead) -> int:
    """Multiply-adds per token: one per weight of each linear layer (biases, GELU and the
    normalizations are negligible beside them)."""
    linears = [m.weight for m in head.mlp if isinstance(m, nn.Linear)]
    return sum(w.numel() for w in linears) + head.last_layer.weight_v.numel()


def step_flops(trainer: Trainer, batch: dict[str, Any]) -> float:
    """Model FLOPs of one training step on this batch (see the module docstring)."""
    config, model = trainer.config, trainer.model
    backbone = build_backbone(config.model)
    global_macs = count_gflops(backbone, config.crops.global_crops_size) * 1e9
    local_macs = count_gflops(backbone, config.crops.local_crops_size) * 1e9
    n_images = batch["collated_global_crops"].shape[0] // 2
    n_local = config.crops.local_crops_number
    n_masked = int(batch["mask_indices_list"].numel())
    cls_head = head_macs(model.student.dino_head)
    patch_head = head_macs(getattr(model.student, model.ibot_head_name))
    student = n_images * (2 * global_macs + n_local * local_macs + (2 + n_local) * cls_head)
    teacher = n_images * 2 * (global_macs + cls_head)
    patches = n_masked * patch_head
    return 2.0 * (3 * (student + patches) + teacher + patches)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def resident_bytes(trainer: Trainer) -> int:
    """Memory a trainer holds between steps: weights, buffers, gradients, optimizer state."""
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class Contender:
    """One model's trainer, batch and schedule values, timed one step at a time."""

    def __init__(self, config: Config, device: str) -> None:
        self.trainer = Trainer(config, device)
        self.device = self.trainer.info.device
        images = self.trainer.images
        batches: Iterator[dict[str, Any]] = build_loader(config, images, 0, 1, 0)
        self.batch = to_device(next(batches), self.device)
        after_warmup = config.optim.warmup_epochs * config.train.epoch_length
        self.values = self.trainer.schedules.at(after_warmup)
        apply_schedule_values(self.trainer.optimizer, self.values)
        self.flops = step_flops(self.trainer, self.batch)
        self.times: list[float] = []
        self.peak_bytes = 0

    def step(self, others: list[Contender]) -> float:
        """Seconds of one step; on CUDA also the peak memory it would need alone (the
        other models held in this process are subtracted)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            held_by_others = sum(resident_bytes(o.trainer) for o in others)
        start = time.perf_counter()
        result = self.trainer.step(self.batch, self.values)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if result.nonfinite:
            raise RuntimeError(f"non-finite loss terms {result.nonfinite} in the benchmark step")
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - held_by_others
            self.peak_bytes = max(self.peak_bytes, peak)
        return seconds


def model_name(size: str) -> str:
    return f"ViT-{size.upper()}/14"


def progress(size: str, message: str) -> None:
    """One line per warm-up and round as they finish, so that a run stopped by a time limit
    (the device call's) still shows the steps it timed."""
    print(f"[{model_name(size)}] {message}", flush=True)


def profile_step(label: str, contender: Contender, others: list[Contender], rows: int) -> None:
    """The operators of one more step, those taking the most time first, so that a run on
    a lent GPU also says where the step's time goes when its MFU falls short."""
    cuda = contender.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        contender.step(others)
    clock = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"{label}: one step's top {rows} operators by {clock}", flush=True)
    print(profiler.key_averages().table(sort_by=clock, row_limit=rows), flush=True)


Key = tuple[str, str]
"""A contender: (variant, multi-crop mode)."""


def label(key: Key, modes: list[str]) -> str:
    """The variant, and the mode where more than one is measured."""
    return key[0] if len(modes) == 1 else f"{key[0]} {key[1]}"


def round_ratios(contenders: dict[Key, Contender], modes: list[str]) -> dict[Key, float]:
    """This round's ratios: specialized / vanilla per mode, and each mode after the first
    over the first, per variant."""
    last = {key: c.times[-1] for key, c in contenders.items()}
    ratios = {("specialized", m): last["specialized", m] / last["vanilla", m] for m in modes}
    for mode in modes[1:]:
        ratios |= {(v, f"{mode}/{modes[0]}"): last[v, mode] / last[v, modes[0]] for v in VARIANTS}
    return ratios


def run_size(size: str, args: argparse.Namespace, run_dir: str) -> list[dict[str, Any]]:
    modes = args.multi_crop_attention
    contenders = {
        (v, m): Contender(step_config(size, v, m, args, run_dir), args.device)
        for m in modes
        for v in VARIANTS
    }
    others = {key: [c for k, c in contenders.items() if k != key] for key in contenders}
    for key, contender in contenders.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            contender.step(others[key])
        elapsed = time.perf_counter() - start
        progress(size, f"{label(key, modes)}: {args.warmup} warm-up steps in {elapsed:.1f} s")
    ratios: dict[Key, list[float]] = {}
    for i in range(args.rounds):
        for key, contender in contenders.items():
            contender.times.append(contender.step(others[key]))
        for key, value in round_ratios(contenders, modes).items():
            ratios.setdefault(key, []).append(value)
        times = ", ".join(f"{label(k, modes)} {c.times[-1]:.4f} s" for k, c in contenders.items())
        spec = ", ".join(f"{ratios['specialized', m][-1]:.3f}" for m in modes)
        mode_ratios = "".join(
            f", {v} {key}: {ratios[v, key][-1]:.3f}"
            for key in (f"{m}/{modes[0]}" for m in modes[1:])
            for v in VARIANTS
        )
        progress(size, f"round {i + 1}/{args.rounds}: {times}, spec/van {spec}{mode_ratios}")
    if args.profile:
        for key, contender in contenders.items():
            profile_step(
                f"{model_name(size)} {label(key, modes)}", contender, others[key], args.profile
            )
    peak = peak_tflops(contenders["vanilla", modes[0]].device, args.peak_tflops)
    rows = []
    for (variant, mode), c in contenders.items():
        median = statistics.median(c.times)
        mode_ratio = ratios.get((variant, f"{mode}/{modes[0]}"))
        rows.append(
            {
                "model": model_name(size),
                "variant": variant,
                "attention": mode,
                "median_s": median,
                "images_per_s": args.batch / median,
                "peak_gib": c.peak_bytes / 2**30 if c.device.type == "cuda" else None,
                "tflops_per_s": c.flops / median / 1e12,
                "mfu": c.flops / median / (peak * 1e12) if peak else None,
                "ratio": statistics.median(ratios[variant, mode])
                if variant == "specialized"
                else None,
                "mode_ratio": statistics.median(mode_ratio) if mode_ratio else None,
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, device: str) -> None:
    modes = args.multi_crop_attention
    print(
        f"DINOv2 training step: batch {args.batch} x (2 x {args.global_size}px + "
        f"{args.local_crops} x {args.local_size}px), {args.prototypes} prototypes, "
        f"compile={args.compile}, precision={args.dtype}, "
        f"activation checkpointing={args.activation_checkpointing}, "
        f"attn_backend={args.attn_backend}, {args.rounds} alternating "
        f"rounds after {args.warmup} warm-up steps"
    )
    print(f"{device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    header = (
        f"{'model':<10}{'variant':<13}{'multi-crop':<11}{'median s':>10}{'img/s':>9}"
        f"{'peak GiB':>10}{'TFLOP/s':>9}{'MFU':>7}{'spec/van':>10}"
        + (f"{'/' + modes[0]:>10}" if len(modes) > 1 else "")
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        mode_ratio = f"{r['mode_ratio']:>10.3f}" if r["mode_ratio"] is not None else ""
        print(
            f"{r['model']:<10}{r['variant']:<13}{r['attention']:<11}{r['median_s']:>10.3f}"
            f"{r['images_per_s']:>9.1f}{peak:>10}{r['tflops_per_s']:>9.3f}{mfu:>7}{ratio:>10}"
            f"{mode_ratio}"
        )
    print(
        "peak GiB: CUDA max allocated during a step, minus what the other models in the "
        "process hold (n/a on CPU); MFU against the device's dense bf16 peak (n/a where "
        "unknown); spec/van: median of per-round step-time ratios, per multi-crop mode"
        + (f"; /{modes[0]}: the same against the {modes[0]} twin" if len(modes) > 1 else "")
    )


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MULTI_CROP_ATTENTIONS]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give distinct values of {list(MULTI_CROP_ATTENTIONS)}, comma-separated"
        )
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="s,b,l", help="comma-separated sizes: s, b, l, g")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU")
    parser.add_argument(
        "--multi-crop-attention",
        type=parse_modes,
        default=["per_crop"],
        help="model.multi_crop_attention values to measure, e.g. per_crop,one_pass",
    )
    parser.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "xformers"])
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N operators of a step"
    )
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for size in args.models.split(","):
            rows += run_size(size.strip(), args, run_dir)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print_table(rows, args, device_name(args.device))


if __name__ == "__main__":
    main()
