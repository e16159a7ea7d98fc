"""Process-group set-up from torchrun or SLURM variables, and FSDP2 wrapping.

One code path for one CPU process, several gloo processes on a workstation, and many nodes
of GPUs under SLURM: only the environment differs.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from dinospec.heartbeat import peer_timeout, start_heartbeat

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_slurm() -> dict[str, str]:
    """torchrun-style variables for a task that srun started, under submitit or not. The
    node list is expanded by submitit's SLURM job environment (SLURM's compressed syntax,
    `gpu[003-005,010],cpu1`, has more forms than a hand-written parser ever covers); rank 0
    runs on its first host, which therefore hosts the rendezvous store."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", job.hostnames[0]),
        "MASTER_PORT": os.environ.get("MASTER_PORT", str(rendezvous_port(job.raw_job_id))),
    }


def rendezvous_port(job_id: str) -> int:
    """A port in 20000-39999 that every task of a job derives alike, without talking to
    the others; a requeued job keeps its id and so its port."""
    return 20000 + int(job_id) % 20000


def init_distributed(device: str = "auto", need_group: bool = False) -> DistInfo:
    """Join the process group described by the environment, if any.

    torchrun's variables win; otherwise SLURM's (one task per GPU); otherwise a single
    process, with a process group of its own only when `need_group` (FSDP2 shards over one,
    even of size 1). gloo on CPU, NCCL on GPU.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.update(_env_from_slurm())
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if dist.is_initialized():
        return DistInfo(rank, world_size, local_rank, dev)
    backend = "nccl" if use_cuda else "gloo"
    if world_size > 1:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    elif need_group:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if dist.is_initialized():
        atexit.register(_destroy_gloo_world)
    if world_size > 1:
        _joined(rank, world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def _joined(rank: int, world_size: int) -> None:
    """Say where this rank runs (its log records its host), and watch its peers when the
    job may span nodes (dinospec.heartbeat; its watch stops at exit before the groups are
    destroyed, atexit running last what it registered first)."""
    logger.info(
        "rank %d of %d on host %s (rendezvous %s:%s)",
        rank,
        world_size,
        socket.gethostname(),
        os.environ.get("MASTER_ADDR"),
        os.environ.get("MASTER_PORT"),
    )
    timeout = peer_timeout()
    if timeout is not None:
        start_heartbeat(rank, world_size, timeout)


# A gloo group left to interpreter shutdown makes its process abort ("terminate called
# without an active exception") in a third to two thirds of 2-rank runs (torch 2.8 to 2.14,
# measured), so the gloo groups made here are destroyed at exit. Not on torch < 2.8, where
# destroying a gloo group just after a collective can deadlock instead (its destructor
# waits for a worker thread that needs the GIL; pytorch/pytorch#154976). NCCL groups are
# left alone: destroying one flushes its queued collectives, which hangs a rank that exits
# on an error while the others wait in a collective.
GLOO_DESTROY_IS_SAFE = torch.__version__ >= (2, 8)


def _destroy_gloo_world() -> None:
    if GLOO_DESTROY_IS_SAFE and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], mixed_precision: bool) -> None:
    """FSDP2: every transformer block is its own unit (gathered just before it runs), the
    rest (embeddings, final norm, heads) forms the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _require_fsdp_on(next(model.parameters()).device)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def _require_fsdp_on(device: torch.device) -> None:
    """FSDP2 orders its collectives with stream events, which CPU streams gained in torch
    2.7; on 2.6 it would fail in the first forward pass, after the model is built."""
    if device.type == "cpu" and not hasattr(torch.cpu.current_stream(), "record_event"):
        raise RuntimeError(
            f"FSDP2 on a CPU needs torch >= 2.7, this is torch {torch.__version__}: "
            "run on CUDA, or in one process with train.fsdp=false"
        )


_HOST_GROUPS: dict[tuple[dist.ProcessGroup, timedelta | None], dist.ProcessGroup] = {}


def host_group(timeout: timedelta | None = None) -> dist.ProcessGroup:
    """A gloo group over all ranks for collectives on host tensors, which over NCCL would
    first wait for every queued GPU kernel. Made on first use (every rank must reach it
    together), kept while the default group lives (no destroy just after a collective, see
    GLOO_DESTROY_IS_SAFE) and destroyed at exit."""
    key = (dist.group.WORLD, timeout)
    if key not in _HOST_GROUPS:
        if not _HOST_GROUPS:
            atexit.register(_destroy_host_groups)
        _HOST_GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    return _HOST_GROUPS[key]


def _destroy_host_groups() -> None:
    """Those of the current default group are still registered (a destroyed default group
    takes its groups with it), so only they can be destroyed; all are let go."""
    if GLOO_DESTROY_IS_SAFE and dist.is_initialized():
        for (owner, _), group in _HOST_GROUPS.items():
            if owner is dist.group.WORLD:
                dist.destroy_process_group(group)
    _HOST_GROUPS.clear()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (for logging); identity without a process group."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
