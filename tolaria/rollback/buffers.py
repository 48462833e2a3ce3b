"""Preallocated host buffers that snapshots copy tensors into.

A ``HostBuffer`` is one flat ``uint8`` tensor with a typed view per tensor of a
``Layout``. Capturing a snapshot is then one ``copy_`` per tensor into memory that
already exists, and buffers of evicted snapshots are reused by later ones with the
same layout. For CUDA tensors the buffer is pinned, so copies can be asynchronous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["ALIGNMENT_BYTES", "BufferPool", "HostBuffer", "Layout", "TensorSlot", "plan_layout"]

ALIGNMENT_BYTES = 64
"""Every view starts at a multiple of this, so a typed view of the byte buffer is always valid."""


class TensorSlot(NamedTuple):
    """Place of one tensor in a buffer: its shape, dtype, source device and byte range."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    offset: int
    nbytes: int


class Layout(NamedTuple):
    """The slots of a buffer, its total size in bytes and whether it is pinned."""

    slots: tuple[TensorSlot, ...]
    total_bytes: int
    pinned: bool

    @property
    def signature(self) -> tuple[object, ...]:
        """What two layouts must share for one's buffer to serve the other."""
        return (self.pinned, tuple((slot.shape, slot.dtype, slot.device) for slot in self.slots))


def _check_copyable(index: int, tensor: torch.Tensor) -> None:
    if tensor.layout is not torch.strided or tensor.is_quantized:
        raise TypeError(
            f"tensor {index} of the snapshot has layout {tensor.layout} (quantized={tensor.is_quantized}); "
            "only dense strided tensors can be snapshotted"
        )


def plan_layout(tensors: Sequence[torch.Tensor]) -> Layout:
    """Lay ``tensors`` out back to back in one byte buffer, each view aligned to 64 bytes.

    The buffer is pinned when any tensor lives on a CUDA device.

    Raises:
        TypeError: a tensor is sparse, quantized or otherwise not dense and strided.
    """
    slots = []
    offset = 0
    for index, tensor in enumerate(tensors):
        _check_copyable(index, tensor)
        size = tensor.numel() * tensor.element_size()
        slots.append(TensorSlot(tensor.shape, tensor.dtype, tensor.device, offset, size))
        offset += -(-size // ALIGNMENT_BYTES) * ALIGNMENT_BYTES
    pinned = any(slot.device.type == "cuda" for slot in slots)
    return Layout(tuple(slots), offset, pinned)


class HostBuffer:
    """One flat host allocation with a typed view per slot of ``layout``.

    Attributes:
        layout: the layout the views follow.
        views: one tensor per slot, of the slot's shape and dtype, on the CPU.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        # Pinned (page-locked) memory lets CUDA copy asynchronously into and out of it.
        self._flat = torch.empty(layout.total_bytes, dtype=torch.uint8, pin_memory=layout.pinned)
        self.views = tuple(
            self._flat[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
            for slot in layout.slots
        )

    @property
    def nbytes(self) -> int:
        """Size of the allocation in bytes."""
        return self.layout.total_bytes


class BufferPool:
    """Spare buffers of evicted snapshots, kept for the next snapshot with the same layout.

    At most ``max_spare`` buffers are kept; older spares and spares of another layout
    are dropped, so the memory held outside the cache stays bounded.
    """

    def __init__(self, max_spare: int = 1) -> None:
        if isinstance(max_spare, bool) or not isinstance(max_spare, int) or max_spare < 0:
            raise ValueError(f"max_spare must be a non-negative int, got {max_spare!r}")
        self.max_spare = max_spare
        self._spare: list[HostBuffer] = []
        self.allocations = 0
        self.reuses = 0

    @property
    def spare_bytes(self) -> int:
        """Bytes held by spare buffers."""
        return sum(buffer.nbytes for buffer in self._spare)

    def release(self, buffer: HostBuffer) -> None:
        """Keep ``buffer`` for reuse; its contents are overwritten by the next user."""
        self._spare.append(buffer)
        surplus = len(self._spare) - self.max_spare
        if surplus > 0:
            del self._spare[:surplus]

    def acquire(self, layout: Layout) -> HostBuffer:
        """Return a spare buffer with ``layout``'s signature, or allocate a new one."""
        for index, buffer in enumerate(self._spare):
            if buffer.layout.signature == layout.signature:
                self.reuses += 1
                return self._spare.pop(index)
        self._spare.clear()
        self.allocations += 1
        return HostBuffer(layout)

    def clear(self) -> None:
        """Drop every spare buffer."""
        self._spare.clear()
