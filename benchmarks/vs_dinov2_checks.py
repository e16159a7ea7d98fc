"""The agreement checks that vs_dinov2.py runs before it times anything.

A time ratio means something only if both steps compute the same thing, so a row is timed
only after the loss terms and gradients of one forward/backward agree with DINOv2's, and
the updates of one whole step are compared (vs_dinov2.py's docstring gives the protocol).
The tolerances are relative: to the reference's loss term, or to the largest gradient or
update of the same parameter, so that one bar fits tensors of every scale.
"""

from __future__ import annotations

import torch
from torch import Tensor
from vs_dinov2_contenders import CONTENDERS, Contender, Run

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
UPDATE_TOLERANCE = 5e-4  # a weight-decay slip on a 0.02-scale weight shows as 2e-3
ADAM_SENSITIVE = 1e-6  # 100 x AdamW's eps; see compare_updates


def relative_difference(a: float, b: float) -> float:
    """|a - b| relative to the reference's `b`; the floor keeps a zero term finite."""
    return abs(a - b) / max(abs(b), 1e-12)


def compare_losses(ours: dict[str, float], theirs: dict[str, float], label: str) -> str:
    """Stops the run if a loss term differs beyond LOSS_TOLERANCE; else its largest gap."""
    if ours.keys() != theirs.keys():
        raise SystemExit(f"{label}: loss terms {sorted(ours)} vs DINOv2's {sorted(theirs)}")
    gaps = {k: relative_difference(ours[k], theirs[k]) for k in theirs}
    worst = max(gaps, key=gaps.__getitem__)
    values = ", ".join(f"{k} {ours[k]:.6f}/{theirs[k]:.6f}" for k in sorted(theirs))
    if gaps[worst] > LOSS_TOLERANCE:
        raise SystemExit(
            f"{label}: loss term {worst} differs from DINOv2's by {gaps[worst]:.2e} relative "
            f"> {LOSS_TOLERANCE} (dinospec/DINOv2: {values})"
        )
    return f"{label} losses ({values}): max relative difference {gaps[worst]:.1e} ({worst})"


def compare_grads(ours: dict[str, Tensor], theirs: dict[str, Tensor], label: str) -> str:
    """Stops the run if any gradient differs beyond GRAD_TOLERANCE of that parameter's
    largest gradient; else reports the largest such difference."""
    if ours.keys() != theirs.keys():
        raise SystemExit(f"{label}: parameters differ: {sorted(ours.keys() ^ theirs.keys())}")
    gaps = {}
    for name, g in theirs.items():
        scale = float(g.abs().max()) or 1.0
        gaps[name] = float((ours[name].float() - g.float()).abs().max()) / scale
    worst = max(gaps, key=gaps.__getitem__)
    if gaps[worst] > GRAD_TOLERANCE:
        bad = sorted((n for n in gaps if gaps[n] > GRAD_TOLERANCE), key=gaps.__getitem__)
        raise SystemExit(
            f"{label}: gradients differ from DINOv2's beyond {GRAD_TOLERANCE} in "
            f"{len(bad)} parameters, worst {worst} by {gaps[worst]:.2e}: {bad[-8:]}"
        )
    return f"{label} gradients: max relative difference {gaps[worst]:.1e} ({worst})"


def snapshot(contender: Contender) -> dict[str, Tensor]:
    """Copies of the student's and teacher's parameters, keyed `part.name`, to diff a step."""
    return {
        f"{part}.{name}": p.detach().clone()
        for part, module in contender.parts().items()
        for name, p in module.named_parameters()
    }


def compare_updates(
    before: dict[str, Tensor],
    ours: dict[str, Tensor],
    theirs: dict[str, Tensor],
    grads: dict[str, Tensor],
) -> list[str]:
    """The largest difference between the two updates (after - before) relative to each
    parameter's largest update, and each parameter beyond UPDATE_TOLERANCE.

    Elements whose gradient is under ADAM_SENSITIVE are left out: on a first AdamW step the
    update is lr * g / (|g| + eps), so where |g| is near eps (1e-8) the float rounding of
    the gradient (1e-10 here, against gradients up to 1e-2) moves the update by percents.
    Differences up to two float32 ulps of the parameter are rounding of the new value
    itself and are not counted: the teacher's update is (1 - momentum) times the student's,
    small enough next to the weight (0.008 x 3e-4 against 0.02) that one ulp of the
    weight is about 1e-3 of it.
    """
    gaps, skipped, total = {}, 0, 0
    for name, start in before.items():
        counted = grads[name.split(".", 1)[1]].abs() >= ADAM_SENSITIVE
        skipped += int((~counted).sum())
        total += counted.numel()
        step = (theirs[name] - start)[counted]
        ulps = 2 * torch.finfo(start.dtype).eps * start[counted].abs()
        gap = ((ours[name] - theirs[name])[counted].abs() - ulps).clamp(min=0)
        gaps[name] = float(gap.abs().max()) / float(step.abs().max()) if step.numel() else 0.0
    worst = max(gaps, key=gaps.__getitem__)
    lines = [
        f"one whole step (clip, AdamW, EMA): updates of student and teacher: max relative "
        f"difference {gaps[worst]:.1e} ({worst}); {skipped} of {total} elements with "
        f"|gradient| < {ADAM_SENSITIVE:g} left out"
    ]
    lines += [
        f"WARNING: the update of {name} differs from DINOv2's by {gaps[name]:.1e}"
        for name in sorted(n for n in gaps if gaps[n] > UPDATE_TOLERANCE)
    ]
    return lines


def check_agreement(run: Run) -> None:
    """Losses and gradients of one forward/backward, then one whole step (see vs_dinov2.py's
    docstring); float32, fresh contenders built from the same weights."""
    contenders = run.build_all("fp32")
    terms = {name: c.forward_backward() for name, c in contenders.items()}
    grads = {name: c.grads() for name, c in contenders.items()}
    for name in CONTENDERS[1:]:
        print(compare_losses(terms[name], terms["reference"], name), flush=True)
        print(compare_grads(grads[name], grads["reference"], name), flush=True)
    del contenders, grads
    pair = {name: run.build(name, "fp32") for name in CONTENDERS[:2]}
    before = snapshot(pair["reference"])
    losses = {name: c.step() for name, c in pair.items()}
    print(compare_losses(losses["vanilla"], losses["reference"], "vanilla Trainer.step"))
    after = {name: snapshot(c) for name, c in pair.items()}
    grads = pair["reference"].grads()
    for line in compare_updates(before, after["vanilla"], after["reference"], grads):
        print(line, flush=True)
