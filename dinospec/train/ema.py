"""The teacher as an exponential moving average of the student."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    Matching is by name, so a specialized student and teacher also average their prefix
    paths, and a mismatch (different architectures) fails instead of mixing weights.
    """
    _reshard(teacher)
    _reshard(student)
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        diff = sorted(teacher_params.keys() ^ student_params.keys())
        raise ValueError(f"teacher and student parameters differ: {diff[:8]}")
    names = sorted(teacher_params)
    t = [teacher_params[n] for n in names]
    s = [student_params[n].detach() for n in names]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def _reshard(module: nn.Module) -> None:
    """FSDP2 leaves a root module's parameters gathered after a forward with no backward
    (the teacher's); averaging must see the same sharded layout on both sides."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
