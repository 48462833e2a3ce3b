"""Telling listeners about emergency level changes, and reporting each change and failure.

The shell half of ``tolaria.emergency``: ``broadcast`` runs every listener of a
transition on the shared ``AsyncWorker`` against one deadline, ``record_transition``
logs, counts and emits the transition, and ``report_failure`` does the same for a
listener that failed. ``EmergencyController`` calls them; the public names are
re-exported by ``tolaria.emergency``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from tolaria.emergency_signals import SignalReading
from tolaria.functional.emergency import Level, Transition, TransitionKind
from tolaria.telemetry import Level as Severity
from tolaria.telemetry import Telemetry
from tolaria.worker import AsyncWorker, TaskHandle, TaskTimeout, WorkerClosed, WorkerSaturated

__all__ = [
    "BroadcastReport",
    "LevelSignal",
    "Listener",
    "SignalPublisher",
    "broadcast",
    "check_timeout",
    "record_transition",
    "report_failure",
]

# Named after the public module, so that log configuration for the controller covers these records too.
logger = logging.getLogger("tolaria.emergency")

Listener = Callable[[Transition], object]
"""Called with each ``Transition``; the return value is ignored and an exception is a failure."""

_ESCALATION_SEVERITY = {
    Level.NOTICE: Severity.INFO,
    Level.ELEVATED: Severity.WARNING,
    Level.CONSERVATIVE: Severity.ERROR,
    Level.HALT: Severity.CRITICAL,
}

# Counter, log level and verb of each kind of transition.
_KIND_REPORTING = {
    TransitionKind.ESCALATED: ("tolaria.emergency.escalations", logging.WARNING, "raised"),
    TransitionKind.DEESCALATED: ("tolaria.emergency.deescalations", logging.INFO, "lowered"),
    TransitionKind.RESET: ("tolaria.emergency.resets", logging.WARNING, "reset"),
}


class LevelSignal(Protocol):
    """Protocol of the signals ``add_signal`` accepts, such as ``LocalSignal`` and ``SharedMemorySignal``."""

    def set(self, level: Level | int | str, reason: str, *, timestamp_s: float | None = None) -> SignalReading:
        """Publish a level and its reason."""
        ...


@dataclasses.dataclass(frozen=True)
class BroadcastReport:
    """Outcome of telling the listeners about one transition.

    Attributes:
        transition: the transition that was broadcast.
        delivered: names of the listeners that returned in time.
        failed: ``(name, exception)`` for each listener that raised, timed out or
            could not be submitted.
        latency_s: seconds from the start of the broadcast until every result was in
            or the deadline passed.
    """

    transition: Transition
    delivered: tuple[str, ...]
    failed: tuple[tuple[str, Exception], ...]
    latency_s: float


class SignalPublisher:
    """Listener that copies each new level, reason and time into a ``LevelSignal``."""

    def __init__(self, signal: LevelSignal) -> None:
        self.signal = signal

    def __call__(self, transition: Transition) -> None:
        self.signal.set(transition.level, transition.reason, timestamp_s=transition.time_s)


def check_timeout(broadcast_timeout_s: object) -> float:
    """Return ``broadcast_timeout_s`` as a float.

    Raises:
        ValueError: it is not a finite number of seconds > 0.
    """
    if isinstance(broadcast_timeout_s, bool) or not isinstance(broadcast_timeout_s, (int, float)):
        raise ValueError(f"broadcast_timeout_s={broadcast_timeout_s!r} is invalid; expected seconds > 0")
    if not 0 < broadcast_timeout_s < float("inf"):
        raise ValueError(f"broadcast_timeout_s={broadcast_timeout_s!r} is invalid; expected seconds > 0")
    return float(broadcast_timeout_s)


def record_transition(telemetry: Telemetry, transition: Transition) -> None:
    """Log the transition, count it and emit its event."""
    counter, log_level, verb = _KIND_REPORTING[transition.kind]
    if transition.kind is TransitionKind.ESCALATED:
        severity = _ESCALATION_SEVERITY[transition.level]
    else:
        severity = Severity.INFO if transition.kind is TransitionKind.DEESCALATED else Severity.WARNING

    logger.log(
        log_level,
        "emergency level %s from %s to %s at step %d: %s",
        verb,
        transition.previous.name,
        transition.level.name,
        transition.step,
        transition.reason,
    )
    telemetry.count(counter)
    telemetry.event(
        f"tolaria.emergency.{transition.kind.value}",
        severity,
        previous=transition.previous.name,
        level=transition.level.name,
        reason=transition.reason,
        step=transition.step,
    )


def broadcast(
    worker: AsyncWorker,
    telemetry: Telemetry,
    listeners: Sequence[tuple[str, Listener]],
    transition: Transition,
    timeout_s: float,
    on_failure: Callable[[str, Exception, Transition], None],
) -> BroadcastReport:
    """Submit every listener, then collect all results against one deadline ``timeout_s`` seconds away.

    Each listener that raises, times out or cannot be submitted is passed to ``on_failure``
    and listed in the report; the broadcast itself never raises.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    failed: list[tuple[str, Exception]] = []
    pending: list[tuple[str, TaskHandle[object]]] = []

    for name, listener in listeners:
        try:
            # A small floor keeps the timeout valid when submitting itself used up the budget.
            timeout = max(deadline - time.monotonic(), 1e-3)
            pending.append((name, worker.submit(listener, transition, timeout=timeout, name=f"listener {name}")))
        except (WorkerSaturated, WorkerClosed) as error:
            on_failure(name, error, transition)
            failed.append((name, error))

    delivered: list[str] = []
    for name, handle in pending:
        try:
            handle.result()
        except Exception as error:  # noqa: BLE001 - listeners may raise anything; each failure is reported
            on_failure(name, error, transition)
            failed.append((name, error))
        else:
            delivered.append(name)

    latency_s = time.monotonic() - started
    report = BroadcastReport(transition, tuple(delivered), tuple(failed), latency_s)
    telemetry.count("tolaria.emergency.broadcasts")
    telemetry.metric("tolaria.emergency.broadcast_latency_ms", latency_s * 1000.0, "ms")
    return report


def report_failure(telemetry: Telemetry, name: str, error: Exception, transition: Transition) -> None:
    """Log, count and emit one listener failure."""
    timed_out = isinstance(error, TaskTimeout)
    logger.error(
        "emergency listener %r failed on %s to %s at step %d%s",
        name,
        transition.kind.value,
        transition.level.name,
        transition.step,
        " (timed out)" if timed_out else "",
        exc_info=error,
    )
    telemetry.count("tolaria.emergency.broadcast_failures")
    telemetry.event(
        "tolaria.emergency.broadcast_failed",
        Severity.CRITICAL,
        listener=name,
        error=type(error).__name__,
        message=str(error),
        timed_out=timed_out,
        transition=transition.kind.value,
        level=transition.level.name,
        step=transition.step,
    )
