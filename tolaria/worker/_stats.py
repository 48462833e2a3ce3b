"""Counters of the worker and the snapshot ``AsyncWorker.stats()`` returns."""

from __future__ import annotations

import collections
import dataclasses
import math

__all__ = ["LATENESS_WINDOW", "Counters", "WorkerStats", "percentile"]

# Lateness percentiles are taken over the most recent timeouts only, so a worker that
# lives for the whole run keeps a bounded amount of memory.
LATENESS_WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class WorkerStats:
    """A snapshot of the worker's counters.

    Cumulative counts since the worker started: ``submitted``, ``completed``, ``failed``,
    ``timed_out``, ``cancelled``, ``rejected`` (``WorkerSaturated``), ``abandoned``,
    ``late_failures`` (abandoned or cancelled work that raised after its caller was
    released) and ``process_restarts``.

    Gauges at the moment of the snapshot: ``in_flight`` (started tasks whose outcome is
    undecided), ``queue_depth`` (accepted tasks waiting for a slot), ``abandoned_running``
    (threads that ignored cancellation and still run), ``still_cancelling`` (cancelled
    coroutines and cooperative threads that have not ended yet) and ``threads`` (task
    threads alive).

    Lateness is how long after the deadline a timed-out task released its caller, in
    milliseconds, over the last ``LATENESS_WINDOW`` timeouts (``nan`` before the first).
    """

    submitted: int
    completed: int
    failed: int
    timed_out: int
    cancelled: int
    rejected: int
    abandoned: int
    late_failures: int
    process_restarts: int
    in_flight: int
    queue_depth: int
    abandoned_running: int
    still_cancelling: int
    threads: int
    lateness_samples: int
    lateness_p50_ms: float
    lateness_p99_ms: float
    lateness_max_ms: float


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ascending ``sorted_values`` (``nan`` when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[rank]


@dataclasses.dataclass
class Counters:
    """Mutable counters; the worker guards every access with its lock."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    cancelled: int = 0
    rejected: int = 0
    abandoned: int = 0
    late_failures: int = 0
    process_restarts: int = 0
    lateness_s: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=LATENESS_WINDOW)
    )

    def count(self, outcome: str, lateness_s: float | None) -> None:
        """Count one decided task; ``outcome`` is ``"completed"``, ``"failed"``, ``"timed_out"`` or ``"cancelled"``."""
        setattr(self, outcome, getattr(self, outcome) + 1)
        if outcome == "timed_out":
            self.lateness_s.append(lateness_s or 0.0)

    def snapshot(
        self, *, in_flight: int, queue_depth: int, abandoned_running: int, still_cancelling: int, threads: int
    ) -> WorkerStats:
        """Freeze the counters into a ``WorkerStats``."""
        lateness_ms = sorted(value * 1e3 for value in self.lateness_s)
        return WorkerStats(
            submitted=self.submitted,
            completed=self.completed,
            failed=self.failed,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            rejected=self.rejected,
            abandoned=self.abandoned,
            late_failures=self.late_failures,
            process_restarts=self.process_restarts,
            in_flight=in_flight,
            queue_depth=queue_depth,
            abandoned_running=abandoned_running,
            still_cancelling=still_cancelling,
            threads=threads,
            lateness_samples=len(lateness_ms),
            lateness_p50_ms=percentile(lateness_ms, 0.50),
            lateness_p99_ms=percentile(lateness_ms, 0.99),
            lateness_max_ms=lateness_ms[-1] if lateness_ms else math.nan,
        )
