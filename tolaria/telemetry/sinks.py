"""Telemetry sinks: where packets go once they are assembled.

A sink receives whole ``TelemetryPacket`` objects. ``InMemorySink`` keeps them in a
list for tests and notebooks; ``JsonlSink`` appends one JSON object per line and
flushes after every packet, so the file can be read while the run is going.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from tolaria.telemetry.records import Event, Metric, TelemetryPacket

__all__ = ["InMemorySink", "JsonlSink", "Sink", "read_jsonl"]


@runtime_checkable
class Sink(Protocol):
    """Destination of telemetry packets.

    ``Telemetry`` calls ``write`` from one thread at a time (the sink's writer thread, or
    a producer doing a synchronous write under back-pressure), so a sink needs no locking
    of its own. ``write`` may raise: the publisher logs, counts and reports the failure
    and retries the packet later. ``close`` is called once, after the last ``write``.
    """

    def write(self, packet: TelemetryPacket) -> None:
        """Store or send one packet."""

    def close(self) -> None:
        """Flush and release resources; later writes are errors."""


class InMemorySink:
    """A sink that keeps every packet in ``packets``, in arrival order.

    ``Telemetry`` writes it on the thread that hands out the packet, so a test can read
    ``packets`` right after ``flush`` or after an ERROR event without waiting.
    """

    def __init__(self) -> None:
        self.packets: list[TelemetryPacket] = []
        self._lock = threading.Lock()
        self.closed = False

    def write(self, packet: TelemetryPacket) -> None:
        """Append ``packet`` to ``packets``."""
        with self._lock:
            self.packets.append(packet)

    def close(self) -> None:
        """Mark the sink closed; the packets stay readable."""
        self.closed = True

    def events(self, name: str | None = None) -> list[Event]:
        """Return all events, or those called ``name``, across packets in arrival order."""
        with self._lock:
            packets = list(self.packets)
        return [event for packet in packets for event in packet.events if name is None or event.name == name]

    def metrics(self, name: str | None = None) -> list[Metric]:
        """Return all metrics, or those called ``name``, across packets in arrival order."""
        with self._lock:
            packets = list(self.packets)
        return [metric for packet in packets for metric in packet.metrics if name is None or metric.name == name]


class JsonlSink:
    """Append packets to a JSON Lines file, one object per line.

    The file is opened in append mode, so an existing file from an earlier part of
    the run (a resume) is extended rather than replaced. Each packet is flushed to
    the operating system as soon as it is written; ``close`` also calls ``fsync``.

    Raises:
        OSError: the file cannot be opened (from the constructor) or written.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, packet: TelemetryPacket) -> None:
        """Write ``packet`` as one line and flush it."""
        line = json.dumps(packet.to_dict(), allow_nan=False, separators=(",", ":"))
        with self._lock:
            if self._file.closed:
                raise ValueError(f"cannot write to closed telemetry file {self.path}")
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        """Flush, ``fsync`` and close the file; calling it twice is harmless."""
        with self._lock:
            if self._file.closed:
                return
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_jsonl(
    path: str | os.PathLike[str], *, on_invalid: Callable[[int, str], None] | None = None
) -> Iterator[TelemetryPacket]:
    """Yield the packets of a JSONL telemetry file in file order; blank lines are skipped.

    Args:
        path: the file written by ``JsonlSink``.
        on_invalid: called with the 1-based line number and the problem for each line
            that is not a valid packet (for example the cut-off last line of a run that
            crashed); the line is then skipped. When ``None``, such a line raises.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a valid packet and ``on_invalid`` is ``None``; the message
            gives the line number.
    """
    with Path(path).open(encoding="utf-8", errors="replace") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                packet = TelemetryPacket.from_dict(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
                problem = f"{type(error).__name__}: {error}"
                if on_invalid is None:
                    raise ValueError(f"{path}: line {line_number} is not a telemetry packet: {problem}") from error
                on_invalid(line_number, problem)
                continue
            yield packet
