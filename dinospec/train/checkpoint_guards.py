"""What a checkpoint save checks before it writes: that the state is finite and fits on
disk, with every rank taking the same branch so that none blocks in a collective the
others skipped; and how a full disk is recognised when the write fails anyway.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from dinospec.distributed import host_group
from dinospec.models.checkpoints import CheckpointError
from dinospec.nested import flatten

SPACE_MARGIN = 1.1
"""A checkpoint takes its tensors' bytes plus DCP's metadata and alignment; 10% covers it."""

_NO_SPACE_SYMPTOMS = ("No space left", "unexpected pos", "file write failed")
"""How ENOSPC reaches us from torch's zip writer, which drops the errno."""


class NonFiniteState(CheckpointError):
    """The state to save holds NaN or inf: saving it would replace a good checkpoint."""


class NoSpaceLeft(CheckpointError):
    """The checkpoint does not fit on its file system."""


def all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank, so that all ranks take the same branch."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=host_group())
    return bool(value.item())


def _total(value: int) -> int:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, group=host_group())
    return int(tensor.item())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def nonfinite_entries(state: dict[str, Any]) -> list[str]:
    """Keys of floating tensors holding NaN or inf on this rank, with one device sync."""
    floats = [
        (key, _local(v))
        for key, v in flatten(state)
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    if not floats:
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in floats]).tolist()
    return [key for (key, _), ok in zip(floats, flags, strict=True) if not ok]


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes this rank's share of `state` occupies once written."""
    return sum(
        _local(v).numel() * v.element_size()
        for _, v in flatten(state)
        if isinstance(v, torch.Tensor)
    )


def ensure_space(root: Path, state: dict[str, Any]) -> int:
    """The bytes all ranks' shares of `state` take; NoSpaceLeft unless, with the margin,
    they fit on `root`'s file system (checked on every rank: ranks may not share it)."""
    needed = _total(state_bytes(state))
    free = shutil.disk_usage(root).free
    if not all_ranks(free >= int(needed * SPACE_MARGIN)):
        raise NoSpaceLeft(
            f"no space left on device for {root} (need ~{needed * SPACE_MARGIN / 2**20:.1f} MB"
            f" for the checkpoint, {free / 2**20:.1f} MB free); free some space and rerun: "
            "the run resumes from its newest checkpoint"
        )
    return needed


def is_out_of_space(err: BaseException | None) -> bool:
    """Whether ENOSPC is behind `err`: DCP gathers each rank's exception into a
    CheckpointException, and torch's zip writer reports it without its errno."""
    if err is None:
        return False
    if isinstance(err, CheckpointException):
        return any(is_out_of_space(failure) for failure, _ in err.failures.values())
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if any(symptom in str(err) for symptom in _NO_SPACE_SYMPTOMS):
        return True
    return is_out_of_space(err.__cause__ or err.__context__)
