"""What Gram anchoring and distillation add to a training step, in time and memory.

Issue #24's cost rows. One `Trainer` per contender, built from the same config and seed,
steps the same batch: the plain DINOv2 step; Gram anchoring with its teacher fed the crops
at 1x and at 2x; distillation from a frozen teacher twice as wide (random weights: the
cost does not depend on what the teacher knows). Contenders alternate round by round and
each row is the median of the per-round ratios to the plain step, so a machine whose
speed drifts during the run moves numerator and denominator together. Memory is the peak
of live tensor storages during one step (weights, gradients, optimizer state and the
frozen networks included), measured by vs_dinov2's LiveTensorBytes on CPU and by the
allocator's peak on CUDA. A high-resolution phase costs nothing per step beyond what its
crop sizes cost (it changes crops and the position grid once), so it has no row.

    python benchmarks/dinov3_features.py                       # CPU, a small ViT
    python benchmarks/dinov3_features.py --device cuda --size s --crop 224 --batch 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from vs_dinov2_memory import LiveTensorBytes, held_tensors

from dinospec.config import Config, load_config
from dinospec.models import build_backbone
from dinospec.models.checkpoints import save_backbone
from dinospec.train.data import build_image_dataset, build_loader, to_device
from dinospec.train.loop import Trainer
from dinospec.train.optim import apply_schedule_values

SIZES = {"tiny": (192, 6, 3), "s": (384, 12, 6), "b": (768, 12, 12)}


def base_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    width, depth, heads = SIZES[args.size]
    return [
        f"model.embed_dim={width}",
        f"model.depth={depth}",
        f"model.num_heads={heads}",
        f"model.img_size={args.crop}",
        f"model.patch_size={args.patch}",
        "model.drop_path_rate=0.0",
        "data.dataset=synthetic",
        f"data.synthetic_size={args.batch}",
        f"data.synthetic_image_size={args.crop}",
        "data.num_workers=0",
        f"crops.global_crops_size={args.crop}",
        f"crops.local_crops_size={args.crop // 2 // args.patch * args.patch}",
        f"crops.local_crops_number={args.local_crops}",
        f"dino.head_n_prototypes={args.prototypes}",
        f"ibot.head_n_prototypes={args.prototypes}",
        f"train.batch_size_per_gpu={args.batch}",
        f"train.output_dir={run_dir}",
        "train.compile=off",
    ]


def teacher_file(args: argparse.Namespace, work: Path) -> Path:
    """A frozen teacher twice as wide as the student, same depth and patch."""
    width, depth, heads = SIZES[args.size]
    config = load_config(
        None,
        [
            f"model.embed_dim={2 * width}",
            f"model.depth={depth}",
            f"model.num_heads={2 * heads}",
            f"model.img_size={args.crop}",
            f"model.patch_size={args.patch}",
            f"crops.global_crops_size={args.crop}",
            f"crops.local_crops_size={args.patch}",
        ],
    )
    path = work / "teacher.safetensors"
    save_backbone(build_backbone(config.model), path)
    return path


class Contender:
    """A Trainer stepping one fixed batch, with or without the Gram term."""

    def __init__(self, config: Config, device: str, gram: bool) -> None:
        torch.manual_seed(0)
        self.trainer = Trainer(config, device)
        self.gram = gram
        if gram:
            self.trainer.model.gram_teacher.refresh(self.trainer.model.teacher.backbone, 0)
        loader = build_loader(config, build_image_dataset(config), 0, 1, 0)
        self.batch = to_device(next(loader), self.trainer.info.device)
        self.values = self.trainer.schedules.at(config.optim.warmup_epochs * 10)

    def step(self) -> None:
        apply_schedule_values(self.trainer.optimizer, self.values)
        result = self.trainer.step(self.batch, self.values, gram=self.gram)
        if result.nonfinite:
            raise RuntimeError(f"non-finite terms {result.nonfinite}")

    def seconds(self) -> float:
        start = time.perf_counter()
        self.step()
        if self.trainer.info.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def peak_bytes(self) -> int:
        device = self.trainer.info.device
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        batch = [v for v in self.batch.values() if isinstance(v, torch.Tensor)]
        held = held_tensors(self.trainer.model, self.trainer.optimizer, batch)
        with LiveTensorBytes(held) as tracker:
            self.step()
        return tracker.peak


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--crop", type=int, default=64, help="global crop size (px)")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--prototypes", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = base_overrides(args, work / "run")
        gram = ["gram.loss_weight=1.0", "gram.start_iteration=1"]
        variants = {
            "plain": base,
            "gram 1x": [*base, *gram],
            "gram 2x": [*base, *gram, "gram.upscale=2.0"],
            "distill (2x wide)": [*base, f"distill.teacher={teacher_file(args, work)}"],
        }
        contenders = {
            name: Contender(load_config(None, o), args.device, name.startswith("gram"))
            for name, o in variants.items()
        }
        for _ in range(args.warmup):
            for contender in contenders.values():
                contender.step()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, contender in contenders.items():
                times[name].append(contender.seconds())
        peaks = {name: c.peak_bytes() for name, c in contenders.items()}
    width, depth, _ = SIZES[args.size]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.device}; ViT width {width} depth {depth} patch {args.patch}, batch {args.batch}, "
        f"2 x {args.crop} px + {args.local_crops} local crops, {args.prototypes} prototypes; "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"{'step':<20}{'time / plain':>14}{'peak MiB':>10}{'/ plain':>9}")
    for name in contenders:
        ratio = statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))
        mib = peaks[name] / 2**20
        print(f"{name:<20}{ratio:>14.3f}{mib:>10.0f}{peaks[name] / peaks['plain']:>9.2f}")


if __name__ == "__main__":
    main()
