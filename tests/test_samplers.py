"""The infinite sharded sampler: one global stream, disjoint shards, exact resume."""

from __future__ import annotations

from itertools import islice

import pytest
from torch.utils.data import DataLoader

from dinospec.data import InfiniteDistributedSampler


def take(sampler: InfiniteDistributedSampler, n: int) -> list[int]:
    return list(islice(iter(sampler), n))


def global_stream(size: int, world_size: int, n: int, seed: int = 0, start: int = 0) -> list[int]:
    """Re-interleave the ranks' shards into the global order they were cut from."""
    per_rank = -(-n // world_size) + 1
    shards = [
        take(InfiniteDistributedSampler(size, r, world_size, seed, start_index=start), per_rank)
        for r in range(world_size)
    ]
    first_rank = start % world_size
    ranks = [(first_rank + k) % world_size for k in range(n)]
    cursor = [0] * world_size
    stream = []
    for rank in ranks:
        stream.append(shards[rank][cursor[rank]])
        cursor[rank] += 1
    return stream


def test_each_pass_is_a_permutation_and_passes_differ() -> None:
    stream = global_stream(10, 1, 30)
    passes = [stream[k * 10 : (k + 1) * 10] for k in range(3)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert passes[0] != passes[1] and passes[1] != passes[2]


def test_ranks_get_disjoint_shards_of_one_pass() -> None:
    size, world = 12, 4
    shards = [
        take(InfiniteDistributedSampler(size, r, world, seed=3), size // world)
        for r in range(world)
    ]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(size))


def test_global_stream_does_not_depend_on_world_size() -> None:
    reference = global_stream(11, 1, 40)
    assert global_stream(11, 3, 40) == reference
    assert global_stream(11, 4, 40) == reference


def test_rank_takes_every_world_size_th_position() -> None:
    reference = global_stream(9, 1, 30, seed=5)
    rank2 = take(InfiniteDistributedSampler(9, rank=2, world_size=3, seed=5), 10)
    assert rank2 == reference[2::3]


def test_same_seed_same_stream_and_other_seed_differs() -> None:
    assert take(InfiniteDistributedSampler(50, seed=1), 120) == take(
        InfiniteDistributedSampler(50, seed=1), 120
    )
    assert take(InfiniteDistributedSampler(50, seed=1), 50) != take(
        InfiniteDistributedSampler(50, seed=2), 50
    )


def test_without_shuffle_the_stream_is_sequential() -> None:
    sampler = InfiniteDistributedSampler(4, rank=1, world_size=2, shuffle=False)
    assert take(sampler, 5) == [1, 3, 1, 3, 1]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_from_state_dict_continues_exactly(world: int) -> None:
    for rank in range(world):
        sampler = InfiniteDistributedSampler(7, rank, world, seed=9)
        stream = iter(sampler)
        list(islice(stream, 11))
        state = sampler.state_dict()
        expected = list(islice(stream, 20))
        restored = InfiniteDistributedSampler(7, rank, world, seed=9)
        restored.load_state_dict(state)
        assert take(restored, 20) == expected


def test_state_is_a_global_count_equal_on_all_ranks() -> None:
    positions = set()
    for rank in range(4):
        sampler = InfiniteDistributedSampler(10, rank, 4, start_index=6)
        take(sampler, 5)
        positions.add(sampler.state_dict()["position"])
    assert positions == {6 + 5 * 4}


def test_resume_on_a_different_world_size() -> None:
    reference = global_stream(13, 1, 60, seed=4)
    saver = InfiniteDistributedSampler(13, rank=1, world_size=2, seed=4)
    take(saver, 9)
    state = saver.state_dict()
    assert state["position"] == 18
    resumed = []
    for rank in range(3):
        sampler = InfiniteDistributedSampler(13, rank, 3, seed=4)
        sampler.load_state_dict(state)
        resumed.append(take(sampler, 5))
    interleaved = [resumed[k % 3][k // 3] for k in range(15)]
    assert interleaved == reference[18:33]


def test_start_index_not_multiple_of_world_size() -> None:
    reference = global_stream(8, 1, 40, seed=2)
    assert global_stream(8, 3, 20, seed=2, start=7) == reference[7:27]


def test_state_from_another_stream_is_refused() -> None:
    state = InfiniteDistributedSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        InfiniteDistributedSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size"):
        InfiniteDistributedSampler(11, seed=1).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dataset_size": 0},
        {"dataset_size": 5, "rank": 2, "world_size": 2},
        {"dataset_size": 5, "start_index": -1},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        InfiniteDistributedSampler(**kwargs)


def test_feeds_a_dataloader() -> None:
    sampler = InfiniteDistributedSampler(6, seed=0)
    loader = DataLoader(list(range(100, 106)), batch_size=4, sampler=sampler)
    batches = list(islice(iter(loader), 3))
    values = [int(v) - 100 for b in batches for v in b]
    assert values == global_stream(6, 1, 12)
