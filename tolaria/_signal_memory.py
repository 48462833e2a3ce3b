"""The shared memory block of a ``SharedMemorySignal``: its layout and how it is mapped.

``tolaria.emergency_signals`` documents the layout and the sequence lock; this module
holds the constants, the reason encoding and the read-only mapping that watchers use.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from multiprocessing import resource_tracker, shared_memory

__all__ = [
    "HEADER",
    "MAGIC",
    "OWNED_NAMES",
    "PAYLOAD",
    "PAYLOAD_OFFSET",
    "REASON_CAPACITY",
    "SEQUENCE",
    "SEQUENCE_OFFSET",
    "SIGNAL_LAYOUT_SIZE",
    "VERSION",
    "ReadOnlyMapping",
    "encode_reason",
    "mapped",
]

MAGIC = b"TLRSIG\x00\x01"
VERSION = 1
REASON_CAPACITY = 256
HEADER = struct.Struct("<8sII")  # magic, version, reason capacity
SEQUENCE = struct.Struct("<Q")
PAYLOAD = struct.Struct(f"<diIq{REASON_CAPACITY}s")  # timestamp, level, reason length, pid, reason
SEQUENCE_OFFSET = 16
PAYLOAD_OFFSET = 24
SIGNAL_LAYOUT_SIZE = PAYLOAD_OFFSET + PAYLOAD.size
"""Size in bytes of the shared memory block of a ``SharedMemorySignal`` (304)."""


def encode_reason(reason: str) -> bytes:
    """Return ``reason`` as UTF-8, cut at a character boundary to fit the reason capacity."""
    encoded = str(reason).encode("utf-8")
    if len(encoded) <= REASON_CAPACITY:
        return encoded
    marker = b"..."
    cut = encoded[: REASON_CAPACITY - len(marker)]
    return cut.decode("utf-8", errors="ignore").encode("utf-8") + marker


def mapped(memory: shared_memory.SharedMemory) -> memoryview:
    """Return the mapped buffer of ``memory``, which exists from construction until ``close``."""
    buffer = memory.buf
    if buffer is None:
        raise ValueError(f"shared memory block {memory.name!r} is not mapped")
    return buffer


# Names of the blocks this process created, so that a watcher in the same process
# (or a forked child) leaves the owner's resource tracker registration alone.
# Only the fallback without /dev/shm needs it.
OWNED_NAMES: set[str] = set()


class ReadOnlyMapping:
    """A read-only mapping of a shared memory block that leaves unlinking to the owner."""

    def __init__(self, name: str) -> None:
        self._mmap: mmap.mmap | None = None
        self._memory: shared_memory.SharedMemory | None = None
        if os.path.isdir(_LINUX_SHM_DIR):
            # glibc and musl keep POSIX shared memory in /dev/shm. Mapping the file with
            # ACCESS_READ makes writes fail in the kernel and bypasses the resource tracker.
            with open(os.path.join(_LINUX_SHM_DIR, name), "rb") as file:
                self._mmap = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            self.buffer = memoryview(self._mmap)
        else:
            self._memory = _attach_tracked(name)
            self.buffer = mapped(self._memory).toreadonly()

    def close(self) -> None:
        self.buffer.release()
        if self._mmap is not None:
            self._mmap.close()
        if self._memory is not None:
            self._memory.close()


_LINUX_SHM_DIR = "/dev/shm"


def _attach_tracked(name: str) -> shared_memory.SharedMemory:
    """Attach through ``SharedMemory`` without making this process responsible for unlinking the block."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
    memory = shared_memory.SharedMemory(name=name)
    # Before 3.13 attaching registers the block with this process's resource tracker,
    # which would unlink it (under the owner) when this process exits.
    # NOTE: only used where /dev/shm is missing and not exercised by the Linux test suite. A child
    # started with "spawn" shares its parent's tracker, so this also drops the owner's registration.
    if os.name == "posix" and memory.name not in OWNED_NAMES:
        resource_tracker.unregister(f"/{memory.name}", "shared_memory")
    return memory
