"""Emergency level signals: the current level, its reason and when it was set, for watchers.

``LocalSignal`` serves threads of one process. ``SharedMemorySignal`` publishes
the same reading through ``multiprocessing.shared_memory`` to processes on the
same host, which attach by name with ``SharedMemorySignalWatcher``.

Both follow the same rules:

* A reading always has a level, a reason and a timestamp. The timestamp is
  ``time.monotonic()`` in seconds unless the caller passes one, and a new
  signal starts at NOMINAL with an empty reason and its creation time.
* ``clear()`` resets all three: the level becomes NOMINAL, the reason becomes
  empty and the timestamp becomes the time of the clear.
* ``sequence`` counts the ``set`` and ``clear`` calls since creation, so a
  watcher can tell a repeated value from an unchanged one.

On Linux ``time.monotonic()`` reads ``CLOCK_MONOTONIC``, which all processes
of a host share, so a watcher can compare the timestamp with its own clock.

Shared memory layout (little-endian, 304 bytes, version 1)::

    offset  size  type     field
         0     8  bytes    magic b"TLRSIG\\x00\\x01"
         8     4  uint32   layout version (1)
        12     4  uint32   reason capacity in bytes (256)
        16     8  uint64   sequence: even when stable, odd while a write is in progress
        24     8  float64  timestamp, monotonic seconds
        32     4  int32    level
        36     4  uint32   reason length in bytes
        40     8  int64    process id of the writer
        48   256  bytes    reason, UTF-8

Writes follow a sequence lock: the owner makes the sequence odd, writes the
payload, then makes it even again (one more than the odd value). A reader
copies the payload between two reads of the sequence and keeps the copy only
if both reads are the same even number, so it never returns a torn write.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import NamedTuple

from tolaria._signal_memory import (
    HEADER,
    MAGIC,
    OWNED_NAMES,
    PAYLOAD,
    PAYLOAD_OFFSET,
    REASON_CAPACITY,
    SEQUENCE,
    SEQUENCE_OFFSET,
    SIGNAL_LAYOUT_SIZE,
    VERSION,
    ReadOnlyMapping,
    encode_reason,
    mapped,
)
from tolaria.functional.emergency import Level, as_level

__all__ = [
    "SIGNAL_LAYOUT_SIZE",
    "LocalSignal",
    "SharedMemorySignal",
    "SharedMemorySignalWatcher",
    "SignalReading",
]


class SignalReading(NamedTuple):
    """One consistent reading of a signal.

    Attributes:
        level: the emergency level.
        reason: why the level was set; empty after ``clear``.
        timestamp_s: monotonic time of the last ``set`` or ``clear`` (or of creation), in seconds.
        sequence: number of ``set`` and ``clear`` calls since the signal was created.
    """

    level: Level
    reason: str
    timestamp_s: float
    sequence: int


def _timestamp(timestamp_s: float | None, clock: Callable[[], float]) -> float:
    """Return ``timestamp_s``, or the clock's time when it is ``None``; reject non-finite values."""
    value = clock() if timestamp_s is None else timestamp_s
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"timestamp_s={value!r} is invalid; expected finite monotonic seconds or None")
    return float(value)


class LocalSignal:
    """Thread-safe emergency signal for one process.

    Args:
        clock: monotonic clock in seconds, used when no timestamp is given.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._reading = SignalReading(Level.NOMINAL, "", _timestamp(None, clock), 0)

    def set(self, level: Level | int | str, reason: str, *, timestamp_s: float | None = None) -> SignalReading:
        """Publish ``level`` and ``reason`` and return the new reading.

        Raises:
            ValueError: ``level`` is not a ``Level`` or ``timestamp_s`` is not finite.
        """
        checked = as_level(level)
        stamp = _timestamp(timestamp_s, self._clock)
        with self._lock:
            self._reading = SignalReading(checked, str(reason), stamp, self._reading.sequence + 1)
            return self._reading

    def clear(self, *, timestamp_s: float | None = None) -> SignalReading:
        """Reset to NOMINAL with an empty reason, stamped now (or at ``timestamp_s``), and return the reading."""
        stamp = _timestamp(timestamp_s, self._clock)
        with self._lock:
            self._reading = SignalReading(Level.NOMINAL, "", stamp, self._reading.sequence + 1)
            return self._reading

    def read(self) -> SignalReading:
        """Return the current reading."""
        with self._lock:
            return self._reading

    @property
    def level(self) -> Level:
        """The current level."""
        return self.read().level

    @property
    def reason(self) -> str:
        """The reason of the current level; empty after ``clear``."""
        return self.read().reason

    @property
    def timestamp_s(self) -> float:
        """Monotonic time of the last change, in seconds."""
        return self.read().timestamp_s


def _decode_payload(payload: bytes, sequence: int) -> SignalReading:
    timestamp_s, level, length, _pid, reason = PAYLOAD.unpack(payload)
    return SignalReading(
        as_level(level, name="shared signal level"), reason[:length].decode("utf-8"), timestamp_s, sequence // 2
    )


def _read_consistent(buffer: memoryview, timeout_s: float, name: str) -> SignalReading:
    """Read a reading with the sequence lock protocol, retrying until ``timeout_s`` passes.

    Raises:
        TimeoutError: every attempt overlapped a write, for example because the
            owner died in the middle of one.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        (before,) = SEQUENCE.unpack_from(buffer, SEQUENCE_OFFSET)
        if before % 2 == 0:
            payload = bytes(buffer[PAYLOAD_OFFSET:SIGNAL_LAYOUT_SIZE])
            (after,) = SEQUENCE.unpack_from(buffer, SEQUENCE_OFFSET)
            if before == after:
                return _decode_payload(payload, before)
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"shared signal {name!r} stayed mid-write for {timeout_s} s (sequence {before}); "
                "the owner may have died during a write"
            )
        time.sleep(0)  # Let the writer finish.


class SharedMemorySignal:
    """Emergency signal in a shared memory block, written by its owner and read by watchers.

    The owner creates the block, writes NOMINAL stamped with its creation time, and
    unlinks the block in ``close`` (also on leaving a ``with`` block). Other processes
    attach with ``SharedMemorySignalWatcher(signal.name)``. Reasons longer than 256
    UTF-8 bytes are cut and end in ``...``; that is the one difference from ``LocalSignal``.

    Args:
        name: name of the block, or ``None`` for a fresh unique name.
        clock: monotonic clock in seconds, used when no timestamp is given.

    Raises:
        FileExistsError: a block called ``name`` already exists.
    """

    def __init__(self, name: str | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._memory = shared_memory.SharedMemory(name=name, create=True, size=SIGNAL_LAYOUT_SIZE)
        self._buffer: memoryview | None = mapped(self._memory)
        self._sequence = 0
        OWNED_NAMES.add(self._memory.name)
        # No watcher can attach before the constructor returns, so no sequence lock is needed here.
        HEADER.pack_into(self._open_buffer(), 0, MAGIC, VERSION, REASON_CAPACITY)
        SEQUENCE.pack_into(self._open_buffer(), SEQUENCE_OFFSET, 0)
        self._write_payload(Level.NOMINAL, "", _timestamp(None, clock))

    @property
    def name(self) -> str:
        """Name that watchers attach to."""
        return self._memory.name

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called."""
        return self._buffer is None

    def _open_buffer(self) -> memoryview:
        if self._buffer is None:
            raise ValueError(f"shared signal {self.name!r} is closed")
        return self._buffer

    def _write_payload(self, level: Level, reason: str, timestamp_s: float) -> None:
        encoded = encode_reason(reason)
        payload = PAYLOAD.pack(timestamp_s, int(level), len(encoded), os.getpid(), encoded)
        self._open_buffer()[PAYLOAD_OFFSET:SIGNAL_LAYOUT_SIZE] = payload

    def _publish(self, level: Level, reason: str, timestamp_s: float) -> SignalReading:
        with self._lock:
            buffer = self._open_buffer()
            # Odd while writing, so readers discard what they copy meanwhile.
            SEQUENCE.pack_into(buffer, SEQUENCE_OFFSET, self._sequence + 1)
            self._write_payload(level, reason, timestamp_s)
            self._sequence += 2
            SEQUENCE.pack_into(buffer, SEQUENCE_OFFSET, self._sequence)
            return _decode_payload(bytes(buffer[PAYLOAD_OFFSET:SIGNAL_LAYOUT_SIZE]), self._sequence)

    def set(self, level: Level | int | str, reason: str, *, timestamp_s: float | None = None) -> SignalReading:
        """Publish ``level`` and ``reason`` and return the new reading.

        Raises:
            ValueError: ``level`` is not a ``Level``, ``timestamp_s`` is not finite, or the signal is closed.
        """
        return self._publish(as_level(level), reason, _timestamp(timestamp_s, self._clock))

    def clear(self, *, timestamp_s: float | None = None) -> SignalReading:
        """Reset to NOMINAL with an empty reason, stamped now (or at ``timestamp_s``), and return the reading.

        Raises:
            ValueError: ``timestamp_s`` is not finite, or the signal is closed.
        """
        return self._publish(Level.NOMINAL, "", _timestamp(timestamp_s, self._clock))

    def read(self) -> SignalReading:
        """Return the current reading.

        Raises:
            ValueError: the signal is closed.
        """
        with self._lock:
            return _read_consistent(self._open_buffer(), 1.0, self.name)

    @property
    def level(self) -> Level:
        """The current level."""
        return self.read().level

    @property
    def reason(self) -> str:
        """The reason of the current level; empty after ``clear``."""
        return self.read().reason

    @property
    def timestamp_s(self) -> float:
        """Monotonic time of the last change, in seconds."""
        return self.read().timestamp_s

    def close(self) -> None:
        """Release and unlink the block; watchers that are still attached keep their mapping. Idempotent."""
        with self._lock:
            if self._buffer is None:
                return
            self._buffer = None
            self._memory.close()
            self._memory.unlink()
            OWNED_NAMES.discard(self._memory.name)

    def __enter__(self) -> SharedMemorySignal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SharedMemorySignalWatcher:
    """Read-only view of a ``SharedMemorySignal`` owned by another process (or object).

    Args:
        name: the owner's ``SharedMemorySignal.name``.
        read_timeout_s: how long ``read`` retries while the owner is mid-write.

    Raises:
        FileNotFoundError: no block called ``name`` exists.
        ValueError: ``name`` is empty or contains ``/``, or the block is not a version 1 tolaria signal.
    """

    def __init__(self, name: str, *, read_timeout_s: float = 1.0) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name={name!r} is invalid; expected the name of a SharedMemorySignal, without '/'")
        self._name = name
        self.read_timeout_s = read_timeout_s
        self._mapping = ReadOnlyMapping(name)
        self._buffer: memoryview | None = self._mapping.buffer
        size = len(self._mapping.buffer)
        if size < SIGNAL_LAYOUT_SIZE:
            self.close()
            raise ValueError(
                f"shared memory block {name!r} is not a tolaria signal: "
                f"it has {size} bytes, a signal needs {SIGNAL_LAYOUT_SIZE}"
            )
        magic, version, capacity = HEADER.unpack_from(self._buffer, 0)
        if magic != MAGIC or version != VERSION or capacity != REASON_CAPACITY:
            self.close()
            raise ValueError(
                f"shared memory block {name!r} is not a version {VERSION} tolaria signal "
                f"(magic {magic!r}, version {version}, reason capacity {capacity})"
            )

    @property
    def name(self) -> str:
        """Name of the block."""
        return self._name

    def read(self) -> SignalReading:
        """Return a consistent reading.

        Raises:
            TimeoutError: the owner stayed mid-write for ``read_timeout_s``.
            ValueError: the watcher is closed.
        """
        if self._buffer is None:
            raise ValueError(f"watcher of shared signal {self.name!r} is closed")
        return _read_consistent(self._buffer, self.read_timeout_s, self.name)

    def close(self) -> None:
        """Detach from the block without unlinking it. Idempotent."""
        if self._buffer is None:
            return
        self._buffer = None
        self._mapping.close()

    def __enter__(self) -> SharedMemorySignalWatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
