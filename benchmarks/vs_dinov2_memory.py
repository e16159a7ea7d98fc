"""Peak memory of a training step without a GPU: the bytes held by live tensor storages.

A CPU has no allocator peak to read, so the count follows every operator through the
dispatcher instead. It knows nothing of the benchmark it serves (vs_dinov2.py; also
dinov3_features.py), hence a module of its own: weights, gradients, optimizer state and
the batch held at the start, plus every tensor made during the step until it is freed.
Memory inside a single kernel and allocator caching are not counted.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def held_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, extra: Iterable[Tensor]
) -> list[Tensor]:
    """What a contender holds between steps: weights, buffers, gradients, optimizer state
    (and the batch, which the contenders share)."""
    tensors = [*model.parameters(), *model.buffers(), *extra]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: views of one storage count once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class LiveTensorBytes(TorchDispatchMode):
    """Bytes held by live tensor storages, and their peak, while operators run under it.

    Storages are counted once however many views share them, from the operator that made
    them until they are freed (a finalizer on the storage, which torch keeps alive exactly
    as long as its data). Tensors held when it starts are counted from the start.
    """

    def __init__(self, held: Iterable[Tensor]) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        for tensor in held:
            self._track(tensor)

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._sizes:
            return
        self._sizes[ptr] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out
