"""Delivery of assembled packets to sinks: one bounded queue per sink, retries, back-pressure.

Every sink gets a channel. ``InMemorySink`` gets an inline channel, which writes on the
thread that offers the packet (an append to a list is as cheap as enqueueing it). Every
other sink gets a threaded channel: the offering thread only appends to the channel's
bounded queue and one daemon writer thread per sink writes the packets, so a slow or hung
exporter never delays training nor the other sinks.

Rules of a channel, in the order they apply:

1. A packet that fits in the queue (``DeliveryPolicy.max_queue`` packets) is queued.
   ERROR and CRITICAL packets go ahead of the queued packets of lower priority, except
   the one at the head, which may already be being written.
2. When the queue is full, a packet whose ``priority`` is below WARNING is dropped and
   reported to the ``DeliveryReporter``.
3. A WARNING or higher packet waits up to ``backpressure_timeout_s`` for room. If none
   appears, the offering thread writes it itself (a synchronous write) when the sink is
   free within another ``backpressure_timeout_s``. When the sink is busy (a hung write) or
   its last write raised, the packet is queued beyond the bound instead, so such packets
   are never dropped while the channel is open.
4. A write that raises leaves the packet at the head of the queue. It is retried after
   an exponential back-off (``retry_initial_s`` doubling up to ``retry_max_s``), and every
   failure is reported: the reporter logs the first one of a burst and counts all of them.
5. ``close`` lets the writer empty the queue until a shared deadline, then drops what is
   left (reported) and closes the sink. A writer stuck in a hung sink is abandoned: it is
   a daemon thread, so it never keeps the process alive.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from tolaria.telemetry.policy import DeliveryPolicy
from tolaria.telemetry.records import Level, TelemetryPacket
from tolaria.telemetry.sinks import InMemorySink, Sink

__all__ = ["DeliveryReporter", "SinkChannel", "open_channel"]

# Channels that are inside a sink write or a reporter call on the current thread. An
# offer to one of them from that thread only queues, so a failure report that emits an
# event cannot re-enter the write that failed.
_active = threading.local()


class DeliveryReporter(Protocol):
    """Receiver of what happens to packets after they leave the publisher."""

    def sink_failed(self, sink: str, error: BaseException, *, operation: str, first_in_burst: bool) -> None:
        """Record that ``operation`` (``"write"`` or ``"close"``) of ``sink`` raised ``error``."""

    def sink_recovered(self, sink: str, failures: int, downtime_s: float) -> None:
        """Record that ``sink`` accepted a packet again after ``failures`` failed attempts."""

    def packets_dropped(self, sink: str, packets: Sequence[TelemetryPacket], reason: str) -> None:
        """Record that ``packets`` will never reach ``sink``, and why."""


def _is_active(channel: SinkChannel) -> bool:
    return id(channel) in getattr(_active, "channels", ())


class _Activity:
    """Context manager that marks a channel as active on the current thread."""

    def __init__(self, channel: SinkChannel) -> None:
        self._key = id(channel)

    def __enter__(self) -> None:
        if not hasattr(_active, "channels"):
            _active.channels = set()
        _active.channels.add(self._key)

    def __exit__(self, *exc_info: object) -> None:
        _active.channels.discard(self._key)


@dataclasses.dataclass(frozen=True)
class _WriteOutcome:
    """Result of one write attempt, reported after the locks are released."""

    error: Exception | None = None
    first_in_burst: bool = False
    recovered_after: int = 0
    downtime_s: float = 0.0


class SinkChannel:
    """The queue, retry state and failure bookkeeping of one sink, written on the caller's thread.

    ``_ThreadedChannel`` adds the writer thread. Use ``open_channel`` to get the right
    channel for a sink.
    """

    def __init__(self, sink: Sink, reporter: DeliveryReporter, policy: DeliveryPolicy) -> None:
        self.sink = sink
        self.name = type(sink).__name__
        self._reporter = reporter
        self._policy = policy
        # _cond guards the queue and the retry state; _write_lock is held for every sink
        # write, so two threads never write to one sink at once and sinks need not be
        # thread-safe. Neither is held while the reporter runs.
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._queue: collections.deque[TelemetryPacket] = collections.deque()
        self._failures = 0
        self._burst_start = 0.0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._deadline: float | None = None
        self._writing = False

    @property
    def pending(self) -> int:
        """Packets offered but neither written nor dropped yet, the one being written included."""
        with self._cond:
            return len(self._queue)

    def undelivered(self) -> list[TelemetryPacket]:
        """Return the packets still queued, the one being written first."""
        with self._cond:
            return list(self._queue)

    @property
    def failing(self) -> bool:
        """Whether the last write attempt raised."""
        with self._cond:
            return self._failures > 0

    def offer(self, packet: TelemetryPacket) -> None:
        """Queue ``packet`` under the rules in the module docstring and write what is due."""
        admission = self._admit(packet)
        if admission == "closed":
            self._report_dropped([packet], "telemetry is closed")
        elif admission == "dropped":
            self._report_dropped([packet], f"queue full ({self._policy.max_queue} packets)")
        elif admission == "synchronous":
            self._write_synchronously(packet)
        self._pump()

    def drain(self, timeout_s: float) -> bool:
        """Write what is due now; return whether nothing is left to write."""
        del timeout_s
        self._pump()
        return self.pending == 0

    def close(self, deadline: float) -> bool:
        """Write what is queued, drop what still fails, then close the sink.

        Returns whether the channel finished before ``deadline`` (``time.monotonic()`` seconds);
        an inline channel always finishes.
        """
        with self._cond:
            self._deadline = deadline
            self._retry_at = 0.0
        self._pump()
        self._drop_remaining("not written before close")
        self._close_sink()
        return True

    def _admit(self, packet: TelemetryPacket) -> str:
        """Queue ``packet`` or decide what happens to it: queued, dropped, closed or synchronous."""
        with self._cond:
            if self._deadline is not None:
                return "closed"
            if len(self._queue) < self._policy.max_queue or _is_active(self):
                self._append(packet)
                return "queued"
            if packet.priority < Level.WARNING:
                return "dropped"
            if self._failures:
                # Waiting for a sink that raises would only stall the caller; keep the packet for the retry.
                self._append(packet)
                return "queued"
            return self._admit_urgent(packet)

    def _admit_urgent(self, packet: TelemetryPacket) -> str:
        """Handle a WARNING+ packet offered to a full queue (``_cond`` held)."""
        # The caller writes this queue itself right after, so there is nothing to wait for.
        self._append(packet)
        return "queued"

    def _append(self, packet: TelemetryPacket) -> None:
        """Queue ``packet``; an ERROR or CRITICAL one goes ahead of every lower packet but the head (``_cond`` held)."""
        position = len(self._queue)
        if packet.priority >= Level.ERROR:
            # The head may be being written or awaiting its retry, so it keeps its place.
            while position > 1 and self._queue[position - 1].priority < Level.ERROR:
                position -= 1
        self._queue.insert(position, packet)
        self._cond.notify_all()

    def _pump(self) -> None:
        """Write queued packets in order until the queue is empty, a retry is not due, or a write fails."""
        if _is_active(self):
            return
        while True:
            with self._write_lock:
                packet = self._due_head()
                if packet is None:
                    return
                outcome = self._write(packet)
                self._settle_head(outcome)
            self._report(outcome)
            if outcome.error is not None:
                return

    def _due_head(self) -> TelemetryPacket | None:
        with self._cond:
            if not self._queue or time.monotonic() < self._retry_at:
                return None
            self._writing = True
            return self._queue[0]

    def _settle_head(self, outcome: _WriteOutcome) -> None:
        """Remove the head after a successful write; leave it for a retry otherwise."""
        with self._cond:
            self._writing = False
            if outcome.error is None:
                self._queue.popleft()
            self._cond.notify_all()

    def _write_synchronously(self, packet: TelemetryPacket) -> None:
        """Write ``packet`` on the calling thread; queue it beyond the bound if the sink stays busy or fails."""
        if not self._write_lock.acquire(timeout=self._policy.backpressure_timeout_s):
            with self._cond:
                self._append(packet)
            return
        try:
            outcome = self._write(packet)
        finally:
            self._write_lock.release()
        if outcome.error is not None:
            with self._cond:
                self._append(packet)
        self._report(outcome)

    def _write(self, packet: TelemetryPacket) -> _WriteOutcome:
        """Write ``packet`` once and update the retry state (``_write_lock`` held)."""
        try:
            with _Activity(self):
                self.sink.write(packet)
        except Exception as error:  # noqa: BLE001 - any sink error is reported, counted and retried
            return self._record_failure(error)
        return self._record_success()

    def _record_failure(self, error: Exception) -> _WriteOutcome:
        now = time.monotonic()
        with self._cond:
            first = self._failures == 0
            self._failures += 1
            if first:
                self._burst_start = now
                self._backoff = self._policy.retry_initial_s
            else:
                self._backoff = min(2.0 * self._backoff, self._policy.retry_max_s)
            self._retry_at = now + self._backoff
        return _WriteOutcome(error=error, first_in_burst=first)

    def _record_success(self) -> _WriteOutcome:
        with self._cond:
            outcome = _WriteOutcome(recovered_after=self._failures, downtime_s=time.monotonic() - self._burst_start)
            self._failures = 0
            self._backoff = 0.0
            self._retry_at = 0.0
        return outcome

    def _report(self, outcome: _WriteOutcome) -> None:
        with _Activity(self):
            if outcome.error is not None:
                self._reporter.sink_failed(
                    self.name, outcome.error, operation="write", first_in_burst=outcome.first_in_burst
                )
            elif outcome.recovered_after:
                self._reporter.sink_recovered(self.name, outcome.recovered_after, outcome.downtime_s)

    def _drop_remaining(self, reason: str) -> None:
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if dropped:
            self._report_dropped(dropped, reason)

    def _report_dropped(self, packets: Sequence[TelemetryPacket], reason: str) -> None:
        with _Activity(self):
            self._reporter.packets_dropped(self.name, packets, reason)

    def _close_sink(self) -> None:
        try:
            # The write lock lets a synchronous write that is still running finish first.
            with self._write_lock, _Activity(self):
                self.sink.close()
        except Exception as error:  # noqa: BLE001 - any sink error is reported and counted
            with _Activity(self):
                self._reporter.sink_failed(self.name, error, operation="close", first_in_burst=True)


class _ThreadedChannel(SinkChannel):
    """A channel whose sink is written by its own daemon thread."""

    def __init__(self, sink: Sink, reporter: DeliveryReporter, policy: DeliveryPolicy) -> None:
        super().__init__(sink, reporter, policy)
        self._thread = threading.Thread(target=self._run, name=f"tolaria-telemetry-{self.name}", daemon=True)
        self._thread.start()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds until every queued packet is written or dropped."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._writing, timeout_s)

    def close(self, deadline: float) -> bool:
        """Ask the writer to finish by ``deadline`` and wait for it until then."""
        with self._cond:
            self._deadline = deadline
            self._retry_at = 0.0
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def _admit_urgent(self, packet: TelemetryPacket) -> str:
        has_room = self._cond.wait_for(
            lambda: len(self._queue) < self._policy.max_queue, self._policy.backpressure_timeout_s
        )
        if has_room:
            self._append(packet)
            return "queued"
        return "synchronous"

    def _pump(self) -> None:
        # Only the writer thread writes queued packets; _append has already woken it.
        return

    def _run(self) -> None:
        while True:
            packet = self._next_packet()
            if packet is None:
                break
            with self._write_lock:
                outcome = self._write(packet)
                self._settle_head(outcome)
            self._report(outcome)
        self._drop_remaining("not written before the close deadline")
        self._close_sink()

    def _next_packet(self) -> TelemetryPacket | None:
        """Wait for the next packet that is due; ``None`` once closing is done or late."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._deadline is not None and (now >= self._deadline or not self._queue):
                    return None
                if self._queue and now >= self._retry_at:
                    self._writing = True
                    return self._queue[0]
                self._cond.wait(self._wait_time(now))

    def _wait_time(self, now: float) -> float | None:
        """Seconds until a retry is due or the close deadline passes; ``None`` to wait for work."""
        times = [t for t in (self._retry_at if self._queue else None, self._deadline) if t is not None]
        return max(0.0, min(times) - now) if times else None


def open_channel(sink: Sink, reporter: DeliveryReporter, policy: DeliveryPolicy) -> SinkChannel:
    """Return the channel for ``sink``: inline for ``InMemorySink``, threaded for any other sink."""
    if isinstance(sink, InMemorySink):
        return SinkChannel(sink, reporter, policy)
    return _ThreadedChannel(sink, reporter, policy)
