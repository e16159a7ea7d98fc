"""Numerical checks of the paths a GPU run takes by default and CI (CPU only) cannot see.

The test suite checks bf16, FSDP2 and compiled blocks on a CPU; on CUDA the kernels
differ (flash attention, cuBLAS bf16, Triton, NCCL), so the lent GPU's run starts here. One
row per check: the largest relative difference measured, the bound it must stay within,
and whether it did; exit status 1 if any check failed.

- flash attention: ViT-S/14 (specialized) in bf16 with SDPA restricted to the flash
  kernel (an error if the inputs do not qualify for it) against SDPA's math kernel;
- bf16 step: one full DINOv2 step of the quickstart model under bf16 autocast against fp32;
- FSDP2 bf16 step: the same step sharded over a group of one (bf16 parameters, fp32
  gradient reduction) against the plain bf16 step;
- compiled step: the bf16 step with compiled blocks against the eager one;
- one-pass step: the compiled bf16 step with the student's crops in one sequence
  (model.multi_crop_attention=one_pass, SDPA per crop size) against the eager per-crop one;
- one-pass xformers step (CUDA, where xformers imports): the same with xformers'
  block-diagonal kernel, eager.

    python benchmarks/gpu/checks.py                 # on the lent GPU (run.sh runs it first)
    python benchmarks/gpu/checks.py --device cpu    # the same code paths on a CPU
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from dinospec.config import load_config
from dinospec.models import build_backbone
from dinospec.train.data import build_loader, to_device
from dinospec.train.loop import Trainer
from dinospec.train.optim import apply_schedule_values

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# bf16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4%); a step's loss terms after a
# dozen bf16 layers and reductions stay within a few of those.
BF16_STEP_BOUND = 2e-2
# The two attention kernels see the same bf16 inputs and differ in summation order and in
# where they round (math rounds the softmax to bf16 before the product with V).
ATTENTION_BOUND = 2e-2


@dataclass
class Check:
    name: str
    difference: float
    bound: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.difference <= self.bound


def relative_difference(got: dict[str, float], expected: dict[str, float]) -> float:
    """The largest |got - expected| / |expected| over the loss terms of a step."""
    if got.keys() != expected.keys():
        raise ValueError(f"loss terms differ: {sorted(got)} against {sorted(expected)}")
    return max(abs(got[k] - expected[k]) / max(abs(expected[k]), 1e-12) for k in expected)


def one_step(device: str, run_dir: Path, *overrides: str) -> tuple[dict[str, float], Trainer]:
    """Loss terms of one full training step of the quickstart model after the lr warm-up,
    with a fixed seed for the step's random choices."""
    fixed = ["data.num_workers=0", "train.batch_size_per_gpu=16", f"train.output_dir={run_dir}"]
    config = load_config(CONFIGS / "quickstart.yaml", [*fixed, *overrides])
    trainer = Trainer(config, device)
    batch = to_device(next(build_loader(config, trainer.images, 0, 1, 0)), trainer.info.device)
    values = trainer.schedules.at(config.optim.warmup_epochs * config.train.epoch_length)
    apply_schedule_values(trainer.optimizer, values)
    torch.manual_seed(1)
    result = trainer.step(batch, values)
    return {term: float(value) for term, value in result.losses.items()}, trainer


def flash_attention(device: str, _: Path) -> Check:
    # Without LayerScale: at DINOv2's 1e-5 the residual branches, attention among them,
    # would move the outputs by too little for a kernel difference to show.
    config = load_config(CONFIGS / "train" / "vits14_in1k_spec.yaml", ["model.init_values=null"])
    torch.manual_seed(0)
    model = build_backbone(config.model).to(device).eval()
    images = torch.randn(8, 3, 224, 224, device=device)
    outputs = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with torch.no_grad(), torch.autocast(device, torch.bfloat16), sdpa_kernel(backend):
            out = model(images, is_training=True)
        outputs[backend] = torch.cat(
            [out["x_norm_clstoken"][:, None], out["x_norm_patchtokens"]], 1
        )
    flash, math = (outputs[b].float() for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH))
    difference = float((flash - math).abs().max() / math.abs().max())
    return Check(
        "flash attention",
        difference,
        ATTENTION_BOUND,
        "ViT-S/14 spec, no LayerScale, bf16, vs math",
    )


@functools.cache
def eager_bf16(device: str, run_dir: Path) -> dict[str, float]:
    """The reference of the step checks below, run once."""
    losses, _ = one_step(device, run_dir, "train.precision=bf16", "train.compile=off")
    return losses


def bf16_step(device: str, run_dir: Path) -> Check:
    fp32, _ = one_step(device, run_dir / "fp32", "train.precision=fp32", "train.compile=off")
    bf16 = eager_bf16(device, run_dir.parent / "eager_bf16")
    if bf16 == fp32:
        raise RuntimeError("the bf16 step gave the fp32 numbers: autocast did not run")
    return Check("bf16 step", relative_difference(bf16, fp32), BF16_STEP_BOUND, "vs fp32")


def against_eager_bf16(
    name: str, detail: str, device: str, run_dir: Path, *overrides: str
) -> Check:
    """One bf16 step with `overrides` against the eager bf16 step of the same seed (so
    stochastic depth drops the same samples in both)."""
    eager = eager_bf16(device, run_dir.parent / "eager_bf16")
    losses, _ = one_step(device, run_dir, "train.precision=bf16", *overrides)
    return Check(name, relative_difference(losses, eager), BF16_STEP_BOUND, detail)


def compiled_step(device: str, run_dir: Path) -> Check:
    return against_eager_bf16(
        "compiled step", "bf16, vs eager bf16", device, run_dir, "train.compile=on"
    )


def one_pass_step(device: str, run_dir: Path) -> Check:
    return against_eager_bf16(
        "one-pass step",
        "compiled bf16, vs eager per-crop",
        device,
        run_dir,
        "train.compile=on",
        "model.multi_crop_attention=one_pass",
    )


def one_pass_xformers_step(device: str, run_dir: Path) -> Check:
    return against_eager_bf16(
        "one-pass xformers",
        "xformers BlockDiagonalMask, bf16, vs eager per-crop SDPA",
        device,
        run_dir,
        "train.compile=off",
        "model.multi_crop_attention=one_pass",
        "model.attn_backend=xformers",
    )


def fsdp_step(device: str, run_dir: Path) -> Check:
    """Last: it starts the process group that the other checks' trainers must not join."""
    plain = eager_bf16(device, run_dir.parent / "eager_bf16")
    try:
        sharded, trainer = one_step(
            device, run_dir, "train.precision=bf16", "train.compile=off", "train.fsdp=true"
        )
        backend = dist.get_backend()
        if not isinstance(next(trainer.model.student.backbone.blocks[0].parameters()), DTensor):
            raise RuntimeError("train.fsdp=true left the block weights unsharded")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    difference = relative_difference(sharded, plain)
    return Check("FSDP2 bf16 step", difference, BF16_STEP_BOUND, f"{backend}, vs unsharded bf16")


CHECKS: list[Callable[[str, Path], Check]] = [
    flash_attention,
    bf16_step,
    compiled_step,
    one_pass_step,
    one_pass_xformers_step,
    fsdp_step,
]


def checks_for(device: str) -> list[Callable[[str, Path], Check]]:
    """xformers' kernels run on CUDA only, where the package is installed."""
    if device == "cuda" and importlib.util.find_spec("xformers") is not None:
        return CHECKS
    return [check for check in CHECKS if check is not one_pass_xformers_step]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}")
    header = f"{'check':<18}{'rel. difference':>17}{'bound':>9}  {'result':<8}detail"
    print(header)
    print("-" * len(header))
    failed = 0
    with tempfile.TemporaryDirectory() as run_dir:
        for check in checks_for(args.device):
            try:
                row = check(args.device, Path(run_dir) / check.__name__)
            except RuntimeError as error:
                failed += 1
                print(f"{check.__name__:<18}{'':>17}{'':>9}  {'ERROR':<8}{error}", flush=True)
                continue
            failed += not row.passed
            result = "ok" if row.passed else "FAILED"
            print(
                f"{row.name:<18}{row.difference:>17.2e}{row.bound:>9.0e}  {result:<8}{row.detail}",
                flush=True,
            )
    if importlib.util.find_spec("xformers") is None:
        print("xformers is not installed: its optional attention backend was not checked")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
