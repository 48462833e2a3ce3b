"""Logs and telemetry of the worker's cancellations, abandoned threads and late failures.

Repeated warnings are logged at the 1st, 2nd, 4th, 8th... occurrence with the running
count, so a controller that hangs every epoch cannot flood the log; telemetry counts
every occurrence.
"""

from __future__ import annotations

import logging

from tolaria.telemetry import Level, Telemetry
from tolaria.worker._job import Job

__all__ = ["report_abandoned", "report_cancelled", "report_late_failure", "worth_logging"]

logger = logging.getLogger(__name__)


def worth_logging(count: int) -> bool:
    """Return whether the ``count``-th repeat of a warning is logged: the 1st, 2nd, 4th, 8th..."""
    return count & (count - 1) == 0


def report_cancelled(telemetry: Telemetry, job: Job, cause: str, state: str) -> None:
    """Count and emit ``tolaria.timeout.cancelled`` for work the worker cancelled."""
    telemetry.count("tolaria.worker.cancelled")
    telemetry.event(
        "tolaria.timeout.cancelled",
        Level.INFO,
        task=job.handle.name,
        kind=job.kind,
        cause=cause,
        state=state,
        timeout_s=job.handle.timeout_s,
    )


def report_abandoned(telemetry: Telemetry, job: Job, cause: str, count: int) -> None:
    """Log and count a thread abandoned because its work ignored cancellation; ``count`` is the total so far."""
    if worth_logging(count):
        thread = job.thread.name if job.thread is not None else "its pool thread"
        logger.warning(
            "task %r ignores cancellation (%s); %s is abandoned and keeps its slot until the call returns "
            "(%d abandoned so far, logged at powers of two)",
            job.handle.name,
            cause,
            thread,
            count,
        )
    telemetry.count("tolaria.worker.abandoned")


def report_late_failure(telemetry: Telemetry, job: Job, error: BaseException, count: int) -> None:
    """Log, count and emit an error raised by work whose caller was already released."""
    if worth_logging(count):
        logger.warning(
            "task %r raised %s after its outcome was decided (%s); nobody receives this error "
            "(%d such errors so far, logged at powers of two)",
            job.handle.name,
            type(error).__name__,
            job.handle.outcome,
            count,
            exc_info=error,
        )
    telemetry.count("tolaria.worker.late_failures")
    telemetry.event(
        "tolaria.worker.late_failure",
        Level.WARNING,
        task=job.handle.name,
        kind=job.kind,
        error=type(error).__name__,
        reason=str(error),
    )
