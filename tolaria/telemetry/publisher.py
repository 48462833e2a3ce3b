"""The ``Telemetry`` publisher: the one object the shell reports metrics and events to.

Components call ``event``, ``metric`` and ``count`` as things happen. These calls only
append to the buffers of the next packet, which takes a few microseconds (measured by
``benchmarks/telemetry.py``). The publisher assembles every packet (metrics, counter
totals, events, health, priority, run id, rank, epoch, step and a sequence number) and
hands it to one channel per sink (``tolaria.telemetry.delivery``), which writes it on
a background thread.

When packets leave:

- ``flush(epoch, step)``: the buffered metrics and events, the running total of every
  counter, and a ``tolaria.telemetry.drop_summary`` event when anything was dropped.
- ERROR and CRITICAL events: at once, in a packet of their own.
- WARNING events that find the event buffer full (``DeliveryPolicy.max_pending``): at
  once, together with the buffered events.
- ``close()``: whatever is still buffered, then every sink is closed within a time budget.

What may be lost: a DEBUG or INFO event, or a metric, that finds its buffer full, and a
packet below WARNING that finds a sink's queue full. Each loss is counted in
``tolaria.telemetry.dropped`` (one per event or metric) and summarised in the next packet.
WARNING and higher events are never dropped while the publisher is open; the delivery
module describes the back-pressure that guarantees it.

A sink that raises is retried with back-off. The first failure of a burst is logged at
ERROR with the exception and emits ``tolaria.telemetry.sink_failed``. Every failure is
counted in ``tolaria.telemetry.sink_failures``, and the recovery emits
``tolaria.telemetry.sink_recovered``. Training goes on unless ``strict``
is set: then the next ``event``, ``flush`` or ``close`` on any thread raises
``TelemetrySinkError``.

Command outcomes carry their reasons as event attributes; no special record type is
needed. For example::

    telemetry.event("tolaria.command.rejected", Level.WARNING,
                    command_id=command.id, kind=command.kind, reason="lr must be > 0")
    telemetry.event("tolaria.command.applied", Level.INFO, command_id=command.id, kind="adjust_lr")

Counter names must not end in ``_total``, because Prometheus-style exporters append it.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tolaria.telemetry._publisher_view import PublisherView, Reporter
from tolaria.telemetry.assembly import DROP_SUMMARY, DROPPED, PacketAssembler
from tolaria.telemetry.delivery import SinkChannel, open_channel
from tolaria.telemetry.policy import DeliveryPolicy
from tolaria.telemetry.records import Event, Level, Metric, TelemetryPacket
from tolaria.telemetry.sinks import Sink

__all__ = [
    "DROPPED",
    "DROP_SUMMARY",
    "SINK_FAILED",
    "SINK_FAILURES",
    "SINK_RECOVERED",
    "Telemetry",
    "TelemetrySinkError",
]

logger = logging.getLogger(__name__)

SINK_FAILURES = "tolaria.telemetry.sink_failures"
SINK_FAILED = "tolaria.telemetry.sink_failed"
SINK_RECOVERED = "tolaria.telemetry.sink_recovered"

# Publishers not closed yet. Writer threads are daemon threads, which die with the
# interpreter, so _close_at_exit closes what the program left open.
_open_publishers: weakref.WeakSet[Telemetry] = weakref.WeakSet()


class TelemetrySinkError(RuntimeError):
    """A sink failed while the publisher runs with ``strict=True``; ``__cause__`` is the sink's exception."""


class Telemetry(PublisherView):
    """Collects metrics, counters and events and hands packets to the sinks.

    Thread-safe: the training thread, worker threads and listeners may all report.

    Args:
        sinks: destinations of every packet. ``InMemorySink`` is written on the calling
            thread; every other sink by a writer thread of its own.
        source: name written into each packet, for example ``"trainer"``.
        attributes: run-level labels copied into each packet.
        strict: raise ``TelemetrySinkError`` from the next ``event``, ``flush`` or ``close``
            after a sink fails, instead of only logging and counting the failure.
        clock: monotonic clock in seconds for event and packet timestamps; tests may pass
            a fake one. Delivery deadlines always use ``time.monotonic``.
        run_id: identifier written into every packet; a random 12-digit hex string by default.
        rank: process rank written into every packet, 0 for a single process.
        policy: buffer sizes, time-outs and retry back-off; ``DeliveryPolicy()`` by default.

    Raises:
        ValueError: ``rank`` is negative.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        *,
        source: str = "trainer",
        attributes: Mapping[str, Any] | None = None,
        strict: bool = False,
        clock: Callable[[], float] = time.monotonic,
        run_id: str | None = None,
        rank: int = 0,
        policy: DeliveryPolicy | None = None,
    ) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank!r}")
        self.strict = strict
        self.policy = policy if policy is not None else DeliveryPolicy()
        self._assembler = PacketAssembler(
            source=source,
            attributes=attributes or {},
            run_id=run_id if run_id is not None else uuid.uuid4().hex[:12],
            rank=rank,
            clock=clock,
            max_pending=self.policy.max_pending,
        )
        self._lock = threading.RLock()
        self._failure: tuple[str, BaseException] | None = None
        self._closed = False
        self._warned_closed = False
        self._reporter = Reporter(self._on_sink_failed, self._on_sink_recovered, self._on_packets_dropped)
        self._channels: list[SinkChannel] = [open_channel(sink, self._reporter, self.policy) for sink in sinks]
        _open_publishers.add(self)

    def add_sink(self, sink: Sink) -> None:
        """Send later packets to ``sink`` too.

        Raises:
            ValueError: the publisher is closed.
        """
        with self._lock:
            if self._closed:
                raise ValueError(f"cannot add sink {sink!r}: telemetry is closed; create a new Telemetry")
            self._channels.append(open_channel(sink, self._reporter, self.policy))

    def set_position(self, epoch: int, step: int) -> None:
        """Record the current epoch and global step, written into the packets that leave before the next flush."""
        with self._lock:
            self._assembler.epoch = epoch
            self._assembler.step = step

    def set_health(self, **fields: Any) -> None:
        """Merge ``fields`` (for example ``emergency_level="ELEVATED"``) into the health of later packets."""
        with self._lock:
            self._assembler.health.update(fields)

    def event(self, name: str, level: Level | int | str = Level.INFO, /, **attributes: Any) -> Event:
        """Record an event and return it.

        ERROR and CRITICAL events are handed to the sinks before this returns; lower
        levels leave with the next ``flush``. Reasons, error types and outcomes belong
        in ``attributes``.

        Raises:
            ValueError: ``level`` names no level.
            TelemetrySinkError: ``strict`` is set and a sink has failed since the last check.
        """
        if self._failure is not None:
            self._raise_failure()
        return self._record_event(name, level if level.__class__ is Level else Level.parse(level), attributes)

    def metric(self, name: str, value: float, unit: str = "", /, **attributes: Any) -> None:
        """Record a measurement for the current period; ``value`` is converted with ``float``."""
        record = Metric(name, float(value), unit, attributes)
        with self._lock:
            if self._closed:
                self._assembler.metric_names.add(name)
                self._record_after_close(name)
            else:
                self._assembler.add_metric(record)

    def count(self, name: str, increment: float = 1.0) -> None:
        """Add ``increment`` to the counter ``name``; running totals go out with every ``flush``.

        Raises:
            ValueError: ``name`` ends in ``_total``, or ``increment`` is negative or not finite.
        """
        if name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must not end in '_total'; exporters add that suffix")
        if not 0.0 <= increment < float("inf"):
            raise ValueError(f"counter increment for {name!r} must be finite and >= 0, got {increment!r}")
        with self._lock:
            self._assembler.count(name, increment)

    def flush(self, epoch: int, step: int) -> TelemetryPacket:
        """Hand the buffered metrics, events and counter totals to the sinks as one packet and return it.

        Raises:
            TelemetrySinkError: ``strict`` is set and a sink has failed since the last check.
        """
        if self._failure is not None:
            self._raise_failure()
        with self._lock:
            self._assembler.epoch = epoch
            self._assembler.step = step
            packet = self._assembler.period_packet()
            closed = self._closed
        if closed:
            self._record_after_close("flush", len(packet.events) + len(packet.metrics))
        else:
            self._dispatch(packet)
        return packet

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait up to ``timeout_s`` seconds until every packet handed out so far is written or dropped.

        Returns whether all sinks finished in time. Buffered records that were not flushed
        are not included.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            channels = list(self._channels)
        # Every channel is drained, even after one has run out of time.
        finished = [channel.drain(max(0.0, deadline - time.monotonic())) for channel in channels]
        return all(finished)

    def close(self, timeout_s: float | None = None) -> bool:
        """Write what is still buffered, then close every sink within ``timeout_s`` seconds.

        The budget defaults to ``policy.close_timeout_s``. A sink that is still writing
        when the budget is spent (a hung exporter) is abandoned: its packets are counted
        as dropped, an ERROR is logged, and this returns ``False``. Calling ``close`` again
        does nothing and returns ``True``. A publisher that is still open when the
        interpreter exits is closed then, with the default budget.

        Raises:
            TelemetrySinkError: ``strict`` is set and a sink failed, including while closing.
        """
        budget = self.policy.close_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._closed:
                return True
            packet = self._assembler.period_packet() if self._assembler.has_unsent_records else None
            channels = list(self._channels)
            self._closed = True
        _open_publishers.discard(self)
        if packet is not None:
            self._dispatch(packet)
        deadline = time.monotonic() + budget
        finished = [self._close_channel(channel, deadline, budget) for channel in channels]
        if self._failure is not None:
            self._raise_failure()
        return all(finished)

    def state_dict(self) -> dict[str, Any]:
        """Return the sequence numbers and counter totals, to be saved with a checkpoint."""
        with self._lock:
            return self._assembler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the sequence numbers and counter totals of a saved run.

        Sequence numbers never go backwards: each becomes the larger of the current and
        the saved value, so packets stay ordered across a resume or a rollback.

        Raises:
            KeyError: a field written by ``state_dict`` is missing.
        """
        with self._lock:
            self._assembler.load_state_dict(state)

    def _record_event(self, name: str, level: Level, attributes: dict[str, Any]) -> Event:
        """Buffer the event or hand its packet to the sinks.

        The publisher's own events come here directly, skipping the strict-mode check of ``event``.
        """
        with self._lock:
            event = self._assembler.new_event(name, level, attributes)
            if self._closed:
                self._record_after_close(name)
                return event
            packet = self._assembler.add_event(event)
        if packet is not None:
            self._dispatch(packet)
        return event

    def _dispatch(self, packet: TelemetryPacket) -> None:
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            channel.offer(packet)

    def _record_after_close(self, name: str, items: int = 1) -> None:
        """Count records that arrived after ``close`` as dropped, warning once."""
        with self._lock:
            self._assembler.count(DROPPED, items)
            if self._warned_closed:
                return
            self._warned_closed = True
        logger.warning("telemetry is closed; %r and later records are dropped", name)

    def _close_channel(self, channel: SinkChannel, deadline: float, budget: float) -> bool:
        if channel.close(deadline):
            return True
        packets = channel.undelivered()
        items = sum(len(packet.events) + len(packet.metrics) for packet in packets)
        logger.error(
            "telemetry sink %s did not finish within %.3g s; abandoning it with %d packets (%d records) not written",
            channel.name,
            budget,
            len(packets),
            items,
        )
        with self._lock:
            self._assembler.count(DROPPED, items)
        return False

    def _on_sink_failed(self, sink: str, error: BaseException, *, operation: str, first_in_burst: bool) -> None:
        with self._lock:
            self._assembler.count(SINK_FAILURES, 1.0)
            self._assembler.failing_sinks.add(sink)
            if self.strict and self._failure is None:
                self._failure = (sink, error)
            closed = self._closed
        if not first_in_burst:
            return
        retry = "it is retried with back-off" if operation == "write" else "the sink is not retried"
        logger.error("telemetry sink %s failed to %s a packet; %s", sink, operation, retry, exc_info=error)
        if not closed:
            attributes = {"sink": sink, "operation": operation, "error": type(error).__name__, "message": str(error)}
            self._record_event(SINK_FAILED, Level.ERROR, attributes)

    def _on_sink_recovered(self, sink: str, failures: int, downtime_s: float) -> None:
        with self._lock:
            self._assembler.failing_sinks.discard(sink)
            closed = self._closed
        logger.warning("telemetry sink %s recovered after %d failed attempts over %.3f s", sink, failures, downtime_s)
        if not closed:
            attributes = {"sink": sink, "failures": failures, "downtime_s": downtime_s}
            self._record_event(SINK_RECOVERED, Level.INFO, attributes)

    def _on_packets_dropped(self, sink: str, packets: Sequence[TelemetryPacket], reason: str) -> None:
        items = sum(len(packet.events) + len(packet.metrics) for packet in packets)
        with self._lock:
            self._assembler.record_drop("packet_item", f"{sink}: {reason}", items)
            closed = self._closed
        if closed:
            # No later packet will carry a summary, so the log is the only record left.
            logger.error(
                "%d telemetry packets (%d records) were not written to %s: %s", len(packets), items, sink, reason
            )

    def _raise_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            sink, error = failure
            raise TelemetrySinkError(f"telemetry sink {sink} failed in strict mode: {error!r}") from error


@atexit.register
def _close_at_exit() -> None:
    """Close the publishers a program left open, so their queued packets reach the sinks before exit."""
    for telemetry in list(_open_publishers):
        if not telemetry.closed:
            logger.info("closing telemetry of run %s at interpreter exit", telemetry.run_id)
            telemetry.close()
