"""``EpochBatches``: in-memory mini-batches whose order depends only on the seed and epoch.

The trainer accepts any iterable of batches. It calls ``set_epoch(epoch)`` before
each pass on an iterable that has that method, like this one or a loader backed by
``torch.utils.data.DistributedSampler``. Because the order of an ``EpochBatches`` pass is a
pure function of ``(seed, epoch)``, a resumed or rolled-back run can re-create the
exact order and skip to any position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["EpochBatches"]


class EpochBatches:
    """Mini-batches of equal-length tensors, reshuffled each epoch from ``(seed, epoch)``.

    Args:
        tensors: tensors whose first dimension indexes samples; each batch is a tuple
            with one slice of each, in the same order.
        batch_size: samples per batch; the last batch of a pass may be smaller.
        shuffle: draw a new permutation per epoch (from a local generator, never the
            global RNG); when False the order is the stored order.
        seed: base seed of the permutations.
        drop_last: drop a final batch smaller than ``batch_size``.
        rank: index of this process among ``world_size``.
        world_size: number of processes sharing the data. Every rank walks the same
            permutation in global batches of ``batch_size`` samples and takes the
            ``rank``-th of ``world_size`` contiguous shards of each. When the shards are
            equal in size, averaging the ranks' gradients of mean losses therefore
            reproduces a one-process step on the same global batch. A final global batch with
            fewer than ``world_size`` samples is dropped so that no rank gets an empty
            shard.

    Raises:
        ValueError: no tensors, tensors of different lengths, or a non-positive size.
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not tensors:
            raise ValueError("EpochBatches needs at least one tensor")
        lengths = {int(tensor.shape[0]) for tensor in tensors}
        if len(lengths) != 1:
            raise ValueError(f"EpochBatches tensors must have the same first dimension, got lengths {sorted(lengths)}")
        if batch_size < 1:
            raise ValueError(f"EpochBatches batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"EpochBatches rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.tensors: Sequence[torch.Tensor] = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Number of samples in the whole data set (all ranks)."""
        return int(self.tensors[0].shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of pass ``epoch``."""
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def _global_batch_count(self) -> int:
        full, remainder = divmod(self.num_samples, self.batch_size)
        keep_partial = remainder >= self.world_size and not self.drop_last
        return full + (1 if keep_partial else 0)

    def __len__(self) -> int:
        """Number of batches per pass, the same on every rank."""
        return self._global_batch_count()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield this rank's shard of each global batch of the current epoch's permutation."""
        order = self._order()
        for batch_index in range(self._global_batch_count()):
            indices = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            if self.world_size > 1:
                indices = torch.tensor_split(indices, self.world_size)[self.rank]
            yield tuple(tensor[indices] for tensor in self.tensors)
