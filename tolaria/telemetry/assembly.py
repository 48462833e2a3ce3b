"""Packet assembly: the buffers of the next packet, counters, sequence numbers and drop accounting.

``PacketAssembler`` stores everything that goes into a packet and builds packets from it.
It is not thread-safe: ``Telemetry`` calls it with its lock held, and hands the packets
it returns to the sinks after releasing the lock.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from tolaria.telemetry.records import Event, Level, Metric, TelemetryPacket

__all__ = ["DROPPED", "DROP_SUMMARY", "PacketAssembler"]

logger = logging.getLogger(__name__)

DROPPED = "tolaria.telemetry.dropped"
DROP_SUMMARY = "tolaria.telemetry.drop_summary"


class PacketAssembler:
    """Buffers and counters of one publisher, and the packets built from them.

    Args:
        source: ``TelemetryPacket.source`` of every packet.
        attributes: ``TelemetryPacket.attributes`` of every packet.
        run_id: ``TelemetryPacket.run_id`` of every packet.
        rank: ``TelemetryPacket.rank`` of every packet.
        clock: monotonic clock in seconds for event and packet timestamps.
        max_pending: DEBUG and INFO events, and separately metrics, buffered per packet.
    """

    def __init__(
        self,
        *,
        source: str,
        attributes: Mapping[str, Any],
        run_id: str,
        rank: int,
        clock: Callable[[], float],
        max_pending: int,
    ) -> None:
        self.source = source
        self.attributes = dict(attributes)
        self.run_id = run_id
        self.rank = rank
        self.epoch = -1
        self.step = 0
        self.health: dict[str, Any] = {}
        self.failing_sinks: set[str] = set()
        self.counters: defaultdict[str, float] = defaultdict(float)
        self.event_counts: Counter[str] = Counter()
        self.metric_names: set[str] = set()
        self._clock = clock
        self._max_pending = max_pending
        self._metrics: list[Metric] = []
        self._events: list[Event] = []
        self._drops: Counter[str] = Counter()
        self._drop_reasons: set[str] = set()
        self._event_sequence = 0
        self._packet_sequence = 0
        self._counters_changed = False

    @property
    def has_unsent_records(self) -> bool:
        """Whether buffered records, drops or counter changes wait for the next packet."""
        return bool(self._metrics or self._events or self._drops or self._counters_changed)

    def new_event(self, name: str, level: Level, attributes: dict[str, Any]) -> Event:
        """Return an event with the next sequence number, and count it by name."""
        self._event_sequence += 1
        self.event_counts[name] += 1
        return Event(name, level, attributes, self._clock(), self._event_sequence)

    def add_event(self, event: Event) -> TelemetryPacket | None:
        """Buffer ``event``, or return the packet that must leave at once.

        ERROR and CRITICAL events leave in a packet of their own. A WARNING event that
        fills the buffer leaves with the buffered events. A DEBUG or INFO event that finds
        the buffer full is dropped and counted.
        """
        if event.level >= Level.ERROR:
            return self.packet(metrics=(), events=(event,))
        if event.level >= Level.WARNING:
            self._events.append(event)
            if len(self._events) < self._max_pending:
                return None
            events, self._events = tuple(self._events), []
            return self.packet(metrics=(), events=events)
        if len(self._events) < self._max_pending:
            self._events.append(event)
        else:
            self.record_drop(event.level.name, "event buffer full")
        return None

    def add_metric(self, metric: Metric) -> None:
        """Buffer ``metric``, or drop and count it when the metric buffer is full."""
        self.metric_names.add(metric.name)
        if len(self._metrics) < self._max_pending:
            self._metrics.append(metric)
        else:
            self.record_drop("metric", "metric buffer full")

    def count(self, name: str, increment: float) -> None:
        """Add ``increment`` to the running total of counter ``name``."""
        self.counters[name] += increment
        self._counters_changed = True

    def record_drop(self, category: str, reason: str, items: int = 1) -> None:
        """Count ``items`` dropped records of ``category`` (a level name, ``metric`` or ``packet_item``)."""
        self.count(DROPPED, items)
        self._drops[category] += items
        self._drop_reasons.add(reason)

    def period_packet(self) -> TelemetryPacket:
        """Build the packet of the period (buffered records, counter totals, drop summary) and empty the buffers."""
        events = self._events
        degraded = bool(self._drops)
        summary = self._drop_summary()
        if summary is not None:
            events.append(summary)
        counters = tuple(
            Metric(name, float(total), "1", {}, "counter") for name, total in sorted(self.counters.items())
        )
        packet = self.packet(metrics=(*self._metrics, *counters), events=tuple(events), degraded=degraded)
        self._metrics = []
        self._events = []
        self._counters_changed = False
        return packet

    def packet(
        self, *, metrics: tuple[Metric, ...], events: tuple[Event, ...], degraded: bool = False
    ) -> TelemetryPacket:
        """Build a packet at the current position with the next sequence number."""
        self._packet_sequence += 1
        priority = max((event.level for event in events), default=Level.INFO)
        degraded = degraded or bool(self.failing_sinks or self._drops)
        return TelemetryPacket(
            source=self.source,
            epoch=self.epoch,
            step=self.step,
            metrics=metrics,
            events=events,
            wall_time_s=time.time(),
            monotonic_s=self._clock(),
            sequence=self._packet_sequence,
            attributes=dict(self.attributes),
            run_id=self.run_id,
            rank=self.rank,
            priority=max(priority, Level.INFO),
            health={**self.health, "telemetry": "degraded" if degraded else "ok"},
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the sequence numbers and counter totals."""
        return {
            "event_sequence": self._event_sequence,
            "packet_sequence": self._packet_sequence,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from saved sequence numbers and counter totals; sequence numbers never go backwards.

        Raises:
            KeyError: a field written by ``state_dict`` is missing.
        """
        self._event_sequence = max(self._event_sequence, int(state["event_sequence"]))
        self._packet_sequence = max(self._packet_sequence, int(state["packet_sequence"]))
        self.counters = defaultdict(float, {str(name): float(total) for name, total in state["counters"].items()})
        self._counters_changed = True

    def _drop_summary(self) -> Event | None:
        """Return the event that summarises the drops since the last packet, and reset them."""
        if not self._drops:
            return None
        total = sum(self._drops.values())
        reasons = sorted(self._drop_reasons)
        logger.warning("dropped %d telemetry records since the last packet (%s)", total, "; ".join(reasons))
        counts = {f"dropped_{category.lower()}": n for category, n in self._drops.items()}
        summary = self.new_event(DROP_SUMMARY, Level.WARNING, {"dropped": total, **counts, "reasons": reasons})
        self._drops.clear()
        self._drop_reasons.clear()
        return summary
