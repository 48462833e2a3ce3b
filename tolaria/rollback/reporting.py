"""Telemetry and logs of snapshots and rollbacks.

Counters ``tolaria.rollback.snapshots``, ``.evictions``, ``.fast_hits``, ``.full_restores``,
``.failures`` and ``.deadline_exceeded``; metrics ``tolaria.rollback.snapshot_ms`` and
``.cache_bytes``; events ``tolaria.rollback.completed`` (INFO), ``.failed`` (ERROR) and
``.deadline_exceeded`` (ERROR), each with the rollback's ``reason``.
"""

from __future__ import annotations

import logging

from tolaria.functional.rollback import RestoreAttempt, Tier
from tolaria.rollback.results import DeadlineSignal
from tolaria.telemetry import Level, Telemetry

__all__ = ["report_deadline", "report_failure", "report_snapshot", "report_success"]

logger = logging.getLogger("tolaria.rollback.manager")


def report_snapshot(
    telemetry: Telemetry, step: int, size: int, evicted: int, elapsed_ms: float, cache_bytes: int
) -> None:
    """Count a snapshot of ``size`` bytes that evicted ``evicted`` older ones."""
    telemetry.count("tolaria.rollback.snapshots")
    if evicted:
        telemetry.count("tolaria.rollback.evictions", evicted)
    telemetry.metric("tolaria.rollback.snapshot_ms", elapsed_ms, "ms")
    telemetry.metric("tolaria.rollback.cache_bytes", float(cache_bytes), "B")
    logger.debug("snapshot of step %d: %d bytes in %.2f ms, %d evicted", step, size, elapsed_ms, evicted)


def report_failure(telemetry: Telemetry, attempt: RestoreAttempt, reason: str, elapsed_ms: float) -> None:
    """Count, emit and log a failed restore attempt."""
    telemetry.count("tolaria.rollback.failures")
    telemetry.event(
        "tolaria.rollback.failed",
        Level.ERROR,
        reason=reason,
        target_step=attempt.decision.target_step,
        tier=attempt.decision.tier.name.lower(),
        error=attempt.error,
        elapsed_ms=elapsed_ms,
    )
    logger.error("rollback to step %d failed: %s", attempt.decision.target_step, attempt.error)


def report_success(telemetry: Telemetry, attempt: RestoreAttempt, reason: str, latency_ms: float) -> None:
    """Count, emit and log a completed rollback."""
    tier = attempt.decision.tier
    telemetry.count("tolaria.rollback.fast_hits" if tier is Tier.FAST else "tolaria.rollback.full_restores")
    telemetry.event(
        "tolaria.rollback.completed",
        Level.INFO,
        reason=reason,
        target_step=attempt.decision.target_step,
        restored_step=attempt.restored_step,
        tier=tier.name.lower(),
        latency_ms=latency_ms,
    )
    logger.info("rolled back to step %s (%s tier) in %.2f ms", attempt.restored_step, tier.name.lower(), latency_ms)


def report_deadline(telemetry: Telemetry, attempt: RestoreAttempt, signal: DeadlineSignal) -> None:
    """Count, emit and log a rollback that missed its deadline."""
    telemetry.count("tolaria.rollback.deadline_exceeded")
    telemetry.event(
        "tolaria.rollback.deadline_exceeded",
        Level.ERROR,
        reason=signal.reason,
        target_step=signal.target_step,
        tier=signal.tier.name.lower(),
        deadline_s=signal.deadline_s,
        error=attempt.error,
    )
    logger.error(
        "rollback to step %d missed its %.3f s deadline; the staged load was cancelled and discarded",
        signal.target_step,
        signal.deadline_s,
    )
