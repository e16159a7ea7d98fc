"""An endless, sharded, resumable stream of dataset indices.

Training is measured in iterations, not epochs, so the sampler never ends. All ranks
agree on one global stream: pass k is a permutation of the dataset seeded by (seed, k),
and the passes are laid end to end. Global position p belongs to rank p % world_size.

Positions are counted globally (samples consumed by all ranks together), not per rank:
the global stream does not depend on the world size, so a run checkpointed on 64 GPUs
and resumed on 32 continues with exactly the samples that had not been seen yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler


def pass_order(dataset_size: int, seed: int, pass_index: int, shuffle: bool) -> np.ndarray:
    """Index order of one pass; a function of its arguments only, so every rank (and every
    restart) computes the same pass without communicating."""
    if not shuffle:
        return np.arange(dataset_size)
    return np.random.default_rng([seed, pass_index]).permutation(dataset_size)


class InfiniteDistributedSampler(Sampler[int]):
    """Yields this rank's share of the global stream forever, starting at `start_index`.

    `start_index` and the `position` in `state_dict()` are global sample counts. With all
    ranks drawing in lockstep, every rank reports the same position after the same number
    of draws, so any rank's state dict can be saved. Under a DataLoader the sampler runs
    ahead of training by the prefetched batches; a loop that knows how many samples it
    trained on should resume with `start_index=consumed` rather than the sampler's state.
    One iterator at a time: each iterator continues from the sampler's current position.
    """

    def __init__(
        self,
        dataset_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_index: int = 0,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be positive, got {dataset_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._start = start_index
        self._drawn = 0

    @property
    def position(self) -> int:
        """Global samples consumed, assuming every rank drew as many as this one."""
        return self._start + self._drawn * self.world_size

    def __iter__(self) -> Iterator[int]:
        for _, index in self.with_positions():
            yield index

    def with_positions(self) -> Iterator[tuple[int, int]]:
        """(global position, dataset index) pairs: the position identifies a draw, so
        per-sample randomness seeded by it is the same whoever draws it and whenever."""
        p = self._first_position()
        while True:
            pass_index, offset = divmod(p, self.dataset_size)
            order = pass_order(self.dataset_size, self.seed, pass_index, self.shuffle)
            mine = order[offset :: self.world_size].tolist()
            for k, index in enumerate(mine):
                self._drawn += 1
                yield p + k * self.world_size, index
            p += len(mine) * self.world_size

    def _first_position(self) -> int:
        """This rank's next global position: the first p >= position with p % world == rank."""
        start = self.position
        return start + (self.rank - start) % self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global position; rank and world size may differ from the
        saving run, but the stream must be the same one, or the resume would not be exact."""
        mine = {"seed": self.seed, "dataset_size": self.dataset_size, "shuffle": self.shuffle}
        changed = {k: (state[k], v) for k, v in mine.items() if state[k] != v}
        if changed:
            detail = ", ".join(
                f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items()
            )
            raise ValueError(f"sampler state is from a different stream ({detail})")
        self._start = int(state["position"])
        self._drawn = 0
