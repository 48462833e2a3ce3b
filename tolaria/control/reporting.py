"""Logs, metrics and events of the control loop, in one place."""

from __future__ import annotations

import logging

from tolaria.control.commands import AdaptationCommand
from tolaria.control.outcome import CallResult, ControlStatus
from tolaria.functional.breaker import BreakerDecision, BreakerPhase
from tolaria.telemetry import Level, Telemetry
from tolaria.worker import AsyncWorker

__all__ = ["ControlReporter"]

logger = logging.getLogger(__name__)

EXIT_REASON = "the controller and executor calls succeeded and both circuit breakers are closed"


class ControlReporter:
    """Reports what the control loop did to ``logging`` and to ``telemetry``.

    Every timeout and failure is logged (failures with their exception), emitted as a
    WARNING event with its reason, and counted: ``timeout_inference`` for the controller,
    ``tolaria.command.failed`` for the executor.
    """

    def __init__(self, telemetry: Telemetry, worker: AsyncWorker) -> None:
        self.telemetry = telemetry
        self.worker = worker

    def breaker_changed(self, role: str, decision: BreakerDecision, epoch: int) -> None:
        """Report a phase change of ``role``'s circuit breaker."""
        opened = decision.phase is BreakerPhase.OPEN
        log = logger.warning if opened else logger.info
        log("%s circuit breaker %s -> %s: %s", role, decision.previous.name, decision.phase.name, decision.reason)
        if opened:
            self.telemetry.count(f"tolaria.breaker.{role}.opened")
        self.telemetry.event(
            "tolaria.breaker.changed",
            Level.WARNING if opened else Level.INFO,
            client=role,
            previous=decision.previous.name.lower(),
            phase=decision.phase.name.lower(),
            reason=decision.reason,
            epoch=epoch,
        )

    def call_finished(self, role: str, result: CallResult, timeout_s: float, epoch: int) -> None:
        """Report the latency and result of one call that ran on the worker."""
        assert result.latency_s is not None
        self.telemetry.metric(f"tolaria.control.{role}.latency_ms", result.latency_s * 1e3, "ms")
        if result.status in ("ok", "rejected"):
            self.telemetry.count(f"tolaria.control.{role}.successes")
            return

        self.telemetry.count(f"tolaria.control.{role}.failures")
        if result.status == "timed_out":
            self.telemetry.count(f"tolaria.timeout.{role}")
            logger.warning(
                "%s call timed out after %.3f s (timeout %.3f s) at epoch %d", role, result.latency_s, timeout_s, epoch
            )
            self._report_cancellation(result, epoch)
        else:
            logger.error("%s call failed at epoch %d: %s", role, epoch, result.reason, exc_info=result.error)
        self.telemetry.event(
            "timeout_inference" if role == "tamiyo" else "tolaria.command.failed",
            Level.WARNING,
            task=result.task,
            timeout_s=timeout_s,
            elapsed_s=result.latency_s,
            error=result.error_type,
            status=result.status,
            reason=result.reason,
            epoch=epoch,
        )

    def _report_cancellation(self, result: CallResult, epoch: int) -> None:
        # The worker reports its cancellations to its own telemetry. A worker shared with
        # other components may report elsewhere, so this one is reported here as well.
        if self.worker.telemetry is self.telemetry:
            return
        self.telemetry.count("tolaria.worker.cancelled")
        self.telemetry.event("tolaria.timeout.cancelled", Level.INFO, task=result.task, cause="deadline", epoch=epoch)

    def command_finished(
        self, status: ControlStatus, command: AdaptationCommand | None, reason: str, epoch: int
    ) -> None:
        """Report an applied or rejected command."""
        if command is None:
            return
        if status is ControlStatus.APPLIED:
            self.telemetry.count("tolaria.command.applied")
            self.telemetry.event(
                "tolaria.command.applied",
                Level.INFO,
                command_id=command.id,
                kind=command.kind,
                reason=command.reason,
                epoch=epoch,
            )
        elif status is ControlStatus.REJECTED:
            logger.warning("command %r (%s) rejected by the executor: %s", command.id, command.kind, reason)
            self.telemetry.count("tolaria.command.rejected")
            self.telemetry.event(
                "tolaria.command.rejected",
                Level.WARNING,
                command_id=command.id,
                kind=command.kind,
                reason=reason,
                epoch=epoch,
            )

    def mode(self, epoch: int, *, conservative: bool, reason: str, entered: bool, exited: bool) -> None:
        """Count a conservative epoch and report entering or leaving conservative mode."""
        if conservative:
            self.telemetry.count("tolaria.control.conservative_epochs")
        if entered:
            logger.warning("entering conservative mode at epoch %d: %s", epoch, reason)
            self.telemetry.event("tolaria.conservative_mode.entered", Level.WARNING, reason=reason, epoch=epoch)
        if exited:
            logger.info("leaving conservative mode at epoch %d: %s", epoch, EXIT_REASON)
            self.telemetry.event("tolaria.conservative_mode.exited", Level.INFO, reason=EXIT_REASON, epoch=epoch)

    def worker_gauges(self) -> None:
        """Report the shared worker's in-flight, abandoned and queued tasks."""
        stats = self.worker.stats()
        self.telemetry.metric("tolaria.worker.in_flight", stats.in_flight, "1")
        self.telemetry.metric("tolaria.worker.abandoned_running", stats.abandoned_running, "1")
        self.telemetry.metric("tolaria.worker.still_cancelling", stats.still_cancelling, "1")
        self.telemetry.metric("tolaria.worker.queue_depth", stats.queue_depth, "1")
        if stats.lateness_samples:
            self.telemetry.metric("tolaria.worker.lateness_p99_ms", stats.lateness_p99_ms, "ms")
