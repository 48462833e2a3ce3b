"""Parts of the ``Telemetry`` publisher: its read-only accessors and the adapter channels report through.

``tolaria.telemetry.publisher`` builds ``Telemetry`` on ``PublisherView`` and hands a
``Reporter`` to each delivery channel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tolaria.telemetry.assembly import PacketAssembler
from tolaria.telemetry.delivery import SinkChannel
from tolaria.telemetry.records import TelemetryPacket
from tolaria.telemetry.sinks import Sink

__all__ = ["PublisherView", "Reporter"]


class PublisherView:
    """Read-only accessors of a publisher: its labels, sinks and running totals.

    ``Telemetry`` sets the attributes declared here in its constructor.
    """

    _assembler: PacketAssembler
    _lock: threading.RLock
    _channels: list[SinkChannel]
    _closed: bool

    @property
    def source(self) -> str:
        """Component name written into each packet."""
        return self._assembler.source

    @property
    def attributes(self) -> Mapping[str, Any]:
        """Run-level labels written into each packet."""
        return dict(self._assembler.attributes)

    @property
    def run_id(self) -> str:
        """Identifier of the run, written into each packet."""
        return self._assembler.run_id

    @property
    def rank(self) -> int:
        """Process rank written into each packet."""
        return self._assembler.rank

    @property
    def sinks(self) -> tuple[Sink, ...]:
        """The sinks packets are written to."""
        with self._lock:
            return tuple(channel.sink for channel in self._channels)

    @property
    def counters(self) -> Mapping[str, float]:
        """Running totals of every counter since the publisher was created."""
        with self._lock:
            return dict(self._assembler.counters)

    @property
    def event_counts(self) -> Mapping[str, int]:
        """Number of events recorded so far by name, including any dropped later."""
        with self._lock:
            return dict(self._assembler.event_counts)

    @property
    def emitted_names(self) -> frozenset[str]:
        """Every event, metric and counter name recorded so far."""
        assembler = self._assembler
        with self._lock:
            return frozenset(assembler.event_counts) | frozenset(assembler.metric_names) | frozenset(assembler.counters)

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._closed


class Reporter:
    """Adapter through which the delivery channels report to their publisher."""

    def __init__(
        self,
        sink_failed: Callable[..., None],
        sink_recovered: Callable[[str, int, float], None],
        packets_dropped: Callable[[str, Sequence[TelemetryPacket], str], None],
    ) -> None:
        self.sink_failed = sink_failed
        self.sink_recovered = sink_recovered
        self.packets_dropped = packets_dropped
