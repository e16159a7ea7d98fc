"""Step time and peak memory of dinospec's training step against DINOv2's own, same
weights and same batch.

The peer is DINOv2's `SSLMetaArch` training step run from the unchanged reference code in
../shared/reference/dinov2 (see benchmarks/dinov2_reference.py for how it is imported):
`apply_optim_scheduler`, `zero_grad`, `forward_backward` (teacher, student on all crops,
DINO + iBOT + KoLeo, backward), gradient clipping, AdamW built by DINOv2's
`build_optimizer` from its own parameter groups, and `update_teacher`. dinospec's step is
`Trainer.step` (after `apply_schedule_values`, as its loop does), vanilla and with the
paper's specialization (configs/models/specialization/paper.yaml), the specialized model
converted from the vanilla one so that all three compute the same function.

Stand-ins for what cannot run here (details in dinov2_reference.py): a no-op `dinov2.fsdp`
(identity wrapper, no resharding, `get_fsdp_modules` giving plain parameter lists), an
`xformers.ops.fmha.BlockDiagonalMask` that concatenates and splits the student head's
inputs, `XFORMERS_DISABLED=1` (PyTorch attention), the student's multi-crop call run per
crop size instead of xFormers' block-diagonal pass, `.cuda()` holders for the batch, the
FSDP stream synchronization skipped, `build_optimizer` and `apply_optim_scheduler`
compiled out of train.py unchanged, FSDP's `clip_grad_norm_` replaced by torch's function
per student part, and, for the tests' tiny ViT only, a width DINOv2 does not name.

Same weights and batch: DINOv2's model is built (its initialization; LayerScale raised to
U(0.5, 1) so that every block counts in the checks) and its student's state dict is loaded
into dinospec's student and teacher; the key mapping is the identity (dinospec keeps
DINOv2's names) and is checked key by key and shape by shape, the specialized model's
prefix parameters being copies of the shared ones. The batch is made by DINOv2's
`collate_data_and_cast` with its `MaskingGenerator` from random crops and handed to
dinospec unchanged (its collate produces the same keys and layout, checked).

Agreement, before anything is timed, in float32 without stochastic depth (off in the timed
steps too, so what is timed is what was checked, on twins built the same way): the four
weighted loss terms (DINO global and local, iBOT, KoLeo) of one forward/backward must agree
within LOSS_TOLERANCE (relative), and every parameter's gradient within GRAD_TOLERANCE of
that parameter's largest gradient (a specialized parameter pair is compared through the sum
of its two gradients, which is the gradient of the shared weight it was copied from). Then
one whole step of the reference and of vanilla dinospec from the same state: the update of
each student and teacher parameter (parameter groups, learning-rate and weight-decay
multipliers, clipping, AdamW, EMA) is compared with UPDATE_TOLERANCE of its largest update,
and each parameter beyond it is printed as a WARNING: this last check reports, it does not
stop the run, so that a deliberate departure from DINOv2's optimizer can still be timed.

Timing: contenders step in turn, the order rotating each round; ratios are medians of the
per-round ratios (dinospec / reference). "Peak memory" is, on CUDA, the allocator's peak
during one step (`torch.cuda.max_memory_allocated`) minus what the other contenders in the
process hold; on a CPU, the peak of bytes held by live tensor storages during one step as
the dispatcher sees them: weights, gradients, optimizer state, buffers and the batch held
at the start, plus every tensor made during the step until it is freed (memory inside a
single kernel and allocator caching are not counted). Measured in a separate, untimed
step, because the CPU count tracks every operator.

On a shared machine wall time measures the neighbours as much as the steps; `--clock cpu`
times the process's CPU seconds instead (with `--threads 1` that is the one thread doing
the work), which time spent waiting for a core does not inflate.

The contenders are in vs_dinov2_contenders.py, the agreement checks in vs_dinov2_checks.py,
the timing and profile of a row in vs_dinov2_measure.py and the CPU memory count in
vs_dinov2_memory.py.

    python benchmarks/vs_dinov2.py                      # small and full configuration, ViT-S
    python benchmarks/vs_dinov2.py --configs full --batch-sizes 8,16 --local-crops 4,8
    python benchmarks/vs_dinov2.py --configs full --profile 15   # and top operators
    python benchmarks/vs_dinov2.py --size tiny --rounds 1        # the tests' tiny run
    python benchmarks/vs_dinov2.py --multi-crop-attention one_pass  # dinospec in one pass
    python benchmarks/vs_dinov2.py --clock cpu --threads 1       # CPU seconds, one thread
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import dinov2_reference as ref
import torch
from vs_dinov2_checks import check_agreement
from vs_dinov2_contenders import CONFIGURATIONS, CONTENDERS, Run
from vs_dinov2_measure import CLOCKS, Row, measure_row, print_profile


def median_ratio(row: Row, ours: str, theirs: str) -> float:
    """The median of per-round ratios: a machine whose speed drifts between rounds moves
    numerator and denominator together, which a ratio of medians would not see."""
    return statistics.median(a / b for a, b in zip(row.times[ours], row.times[theirs], strict=True))


def print_table(rows: list[Row], args: argparse.Namespace, dtype: str) -> None:
    """The table, under a header naming everything a figure depends on (BENCHMARKS.md
    quotes the header with each table)."""
    print(
        f"\nDINOv2 training step, dinospec / reference: ViT-{args.size.upper()}/14, "
        f"{args.device} ({device_name(args.device)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, {dtype}, compile={args.compile}, "
        f"dinospec multi-crop={args.multi_crop_attention}, "
        f"{args.rounds} rotating rounds after {args.warmup} warm-up step(s)"
    )
    header = (
        f"{'config':<7}{'crops':<18}{'protos':>7}{'batch':>6}{'ref s':>8}{'van s':>8}"
        f"{'spec s':>8}{'van/ref':>8}{'spec/ref':>9}{'spec/van':>9}"
        f"{'ref MiB':>9}{'van MiB':>9}{'spec MiB':>9}{'van/ref':>8}{'spec/ref':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r.setting
        crops = f"2x{s.global_size}+{s.local_crops}x{s.local_size}"
        med = {n: statistics.median(r.times[n]) for n in CONTENDERS}
        mib = {n: r.peaks[n] / 2**20 for n in CONTENDERS}
        print(
            f"{r.config:<7}{crops:<18}{s.prototypes:>7}{r.batch:>6}"
            + "".join(f"{med[n]:>8.3f}" for n in CONTENDERS)
            + f"{median_ratio(r, 'vanilla', 'reference'):>8.3f}"
            + f"{median_ratio(r, 'specialized', 'reference'):>9.3f}"
            + f"{median_ratio(r, 'specialized', 'vanilla'):>9.3f}"
            + "".join(f"{mib[n]:>9.0f}" for n in CONTENDERS)
            + f"{mib['vanilla'] / mib['reference']:>8.3f}"
            + f"{mib['specialized'] / mib['reference']:>9.3f}"
        )
    print(
        "s: median step time; time ratios: medians of per-round ratios; MiB: peak memory of "
        "one step (CUDA: allocator peak; CPU: live tensor storages, see the docstring)"
    )
    for r in rows:
        if r.config == "full":
            print_targets(r)


def print_targets(row: Row) -> None:
    """Issue 19's targets for the full configuration."""
    checks = [
        (f"{n}/ref time <= 1.00", median_ratio(row, n, "reference"), 1.00) for n in CONTENDERS[1:]
    ]
    checks += [
        (f"{n}/ref peak <= 0.95", row.peaks[n] / row.peaks["reference"], 0.95)
        for n in CONTENDERS[1:]
    ]
    checks.append(("spec/van time <= 1.02", median_ratio(row, "specialized", "vanilla"), 1.02))
    verdicts = [
        f"{label}: {v:.3f} {'met' if v <= limit else 'MISSED'}" for label, v, limit in checks
    ]
    print(f"targets (full, batch {row.batch}): " + "; ".join(verdicts))


def device_name(device: str) -> str:
    """The hardware the header names, since absolute times mean nothing without it."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def parse_ints(text: str) -> list[int]:
    """A comma-separated list such as `8,16`, so one run can sweep several rows."""
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="s", choices=["tiny", "s", "b", "l"])
    parser.add_argument("--configs", default="small,full", help="small, full (tiny: --size)")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[8], help="e.g. 8,16")
    parser.add_argument(
        "--local-crops", type=parse_ints, default=[], help="e.g. 4,8 (default: the config's)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--clock", choices=list(CLOCKS), default="wall", help="cpu: the process's CPU seconds"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", default="off", choices=["off", "on"], help="dinospec's")
    parser.add_argument(
        "--multi-crop-attention",
        default="per_crop",
        choices=["per_crop", "one_pass"],
        help="dinospec's student: crop sizes one after the other, or one sequence",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="top N operators")
    parser.add_argument("--reference", type=Path, default=ref.DEFAULT_ROOT)
    args = parser.parse_args()
    if 0 in args.local_crops:
        parser.error("--local-crops: DINOv2's collate cannot stack zero local crops")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures host work only: use it with --device cpu")
    if args.size == "tiny":
        args.configs = "tiny"
    return args


def rows_to_run(args: argparse.Namespace) -> list[Row]:
    """Every configuration x local-crop count x batch size asked for, in that order."""
    rows = []
    for config in args.configs.split(","):
        setting = CONFIGURATIONS[config.strip()]
        for n_local in args.local_crops or [setting.local_crops]:
            for batch in args.batch_sizes:
                rows.append(Row(config.strip(), replace(setting, local_crops=n_local), batch))
    return rows


def main() -> None:
    """Each row checked (once per configuration) before it is timed, then the table."""
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")
    reference = ref.load_reference(args.reference)
    rows = rows_to_run(args)
    checked: set[str] = set()
    with tempfile.TemporaryDirectory() as run_dir:
        args.run_dir = run_dir
        for row in rows:
            run = Run(args, reference, row.setting, row.batch)
            label = f"{row.config} 2x{row.setting.global_size}+{row.setting.local_crops}x"
            print(f"== {label}{row.setting.local_size}, batch {row.batch}", flush=True)
            if row.config not in checked:
                check_agreement(run)
                checked.add(row.config)
                gc.collect()
            clock = CLOCKS[args.clock]
            contenders = measure_row(run, row, dtype, args.rounds, args.warmup, clock)
            if args.profile and row is rows_for(rows, row.config)[0]:
                print_profile(contenders, run.device, args.profile)
            del contenders
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, args, dtype)


def rows_for(rows: list[Row], config: str) -> list[Row]:
    """The rows of one configuration; only the first of them is profiled."""
    return [r for r in rows if r.config == config]


if __name__ == "__main__":
    main()
