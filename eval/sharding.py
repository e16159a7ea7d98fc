"""Where one evaluation process stands among several, and how the shards they compute
become one result.

An evaluation job runs unchanged as one process or under torchrun / SLURM. Rank r reads
the images r, r + W, r + 2W, ... of a dataset: the shards are disjoint and nothing is
padded, so no image is counted twice. Tensors computed per image are put back in dataset
order, which makes every result independent of the number of processes.

Gathered tensors travel through a gloo group on the host whatever the main backend:
cached features live in host memory (a feature bank would crowd the accelerator), and the
group's long timeout lets the other ranks wait while rank 0 trains a probe alone, which
NCCL's watchdog would otherwise take for a hang after ten minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from dinospec.config import ConfigError
from dinospec.distributed import DistInfo, host_group, init_distributed

HOST_TIMEOUT = timedelta(hours=24)
"""How long ranks may wait for rank 0's probe training; a crashed rank 0 still fails them
at once, since its connections close."""

Value = TypeVar("Value")


@dataclass(frozen=True)
class Ranks:
    """This process's rank, the number of processes, its device and the host group (None
    when the job runs as a single process)."""

    rank: int
    world_size: int
    device: torch.device
    host_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, size: int) -> range:
        """This rank's positions in a dataset of `size` items."""
        return range(self.rank, size, self.world_size)

    def shard(self, dataset: Dataset) -> Subset:
        """This rank's part of a dataset whose per-image results are gathered afterwards:
        every rank needs at least one image to know the shape of what it sends."""
        size = len(dataset)
        if size < self.world_size:
            raise ConfigError(
                f"{size} image(s) cannot be shared out over {self.world_size} processes"
            )
        return Subset(dataset, self.indices(size))

    def gather(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The rows of every rank's shard, in dataset order, on every rank."""
        if self.host_group is None:
            return local
        padded = self._padded(local, total)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.host_group)
        return _interleave(parts, total)

    def gather_to_main(self, local: torch.Tensor, total: int) -> torch.Tensor | None:
        """The rows of every rank's shard, in dataset order, on rank 0 only (None elsewhere),
        for what only rank 0 trains on: one copy of a large feature bank, not one per rank."""
        if self.host_group is None:
            return local
        padded = self._padded(local, total)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.gather(padded, parts if self.is_main else None, dst=0, group=self.host_group)
        return _interleave(parts, total) if self.is_main else None

    def objects_to_main(self, items: list[Any]) -> list[Any] | None:
        """Every rank's `items` concatenated in rank order on rank 0 (None elsewhere)."""
        if self.host_group is None:
            return items
        lists: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(items, lists, dst=0, group=self.host_group)
        return [item for part in lists for item in part] if lists is not None else None

    def from_main(self, value: Value | None) -> Value:
        """Rank 0's `value` on every rank (the others pass None)."""
        if self.host_group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]

    def share_main_state(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers of `module` on every rank: a probe head only rank
        0 trained then scores every shard of val."""
        state = None
        if self.is_main:
            state = {name: value.cpu() for name, value in module.state_dict().items()}
        module.load_state_dict(self.from_main(state))

    def _padded(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """`local` (on the host) with zero rows appended up to the longest shard's length,
        since all_gather and gather move tensors of one shape."""
        rows = len(self.indices(total))
        if local.shape[0] != rows:
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} rows, its shard {rows}")
        longest = -(-total // self.world_size)
        filler = local.new_zeros(longest - rows, *local.shape[1:], device="cpu")
        return torch.cat([local.cpu(), filler]).contiguous()


def _interleave(parts: list[torch.Tensor], total: int) -> torch.Tensor:
    """Dataset order back from rank-strided shards: row j of rank r is item j * W + r. The
    padding rows land at positions >= total and are cut off."""
    stacked = torch.stack(parts, dim=1)
    return stacked.reshape(-1, *stacked.shape[2:])[:total]


def _device(requested: str, info: DistInfo) -> torch.device:
    """The configured device, except that each of several processes takes its own GPU."""
    device = torch.device(requested)
    if info.world_size > 1 and device.type == "cuda":
        return info.device
    return device


def joined_ranks(device: str) -> Ranks:
    """The Ranks of this process, which joins the process group that torchrun's or SLURM's
    variables describe (if any, and unless it has joined already).

    Both groups are kept for the life of the process, so that a script may run several
    jobs: ranks that left the default group and joined again through the same store could
    read each other's stale addresses.
    """
    info = init_distributed(device)
    group = host_group(HOST_TIMEOUT) if info.world_size > 1 else None
    return Ranks(info.rank, info.world_size, _device(device, info), group)
