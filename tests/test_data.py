"""EpochBatches: order from (seed, epoch), shards that add up to the global batch."""

from __future__ import annotations

import pytest
import torch

from tolaria.data import EpochBatches


def collect(batches: EpochBatches) -> list[torch.Tensor]:
    return [batch[0] for batch in batches]


def test_order_depends_only_on_seed_and_epoch() -> None:
    data = torch.arange(100)
    first = EpochBatches(data, batch_size=16, seed=3)
    second = EpochBatches(data, batch_size=16, seed=3)
    first.set_epoch(4)
    second.set_epoch(4)
    assert all(torch.equal(a, b) for a, b in zip(collect(first), collect(second), strict=True))
    second.set_epoch(5)
    assert not torch.equal(torch.cat(collect(first)), torch.cat(collect(second)))


def test_every_sample_once_per_epoch() -> None:
    batches = EpochBatches(torch.arange(37), batch_size=8, seed=1)
    seen = torch.cat(collect(batches))
    assert sorted(seen.tolist()) == list(range(37))
    assert len(batches) == 5


def test_global_rng_untouched() -> None:
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)
    collect(EpochBatches(torch.arange(50), batch_size=10, seed=0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_partition_each_global_batch(world_size: int) -> None:
    data = torch.arange(64)
    whole = collect(EpochBatches(data, batch_size=12, seed=2))
    shards = [
        collect(EpochBatches(data, batch_size=12, seed=2, rank=rank, world_size=world_size))
        for rank in range(world_size)
    ]
    assert all(len(rank_batches) == len(whole) for rank_batches in shards)
    for index, batch in enumerate(whole):
        joined = torch.cat([rank_batches[index] for rank_batches in shards])
        assert torch.equal(joined, batch)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"batch_size": 0}, r"batch_size must be >= 1, got 0"),
        ({"batch_size": 4, "rank": 2, "world_size": 2}, r"rank must be in \[0, world_size\), got rank=2"),
    ],
)
def test_invalid_arguments_rejected(kwargs: dict[str, int], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        EpochBatches(torch.arange(10), **kwargs)


def test_tensors_of_different_lengths_rejected() -> None:
    with pytest.raises(ValueError, match=r"same first dimension, got lengths \[3, 4\]"):
        EpochBatches(torch.zeros(3), torch.zeros(4), batch_size=2)
