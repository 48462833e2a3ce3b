"""``EpochControl``: the end-of-epoch call of the controller (Tamiyo) and executor (Kasmina).

Rank 0 runs the ``ControlLoop`` on the shared worker, with deadlines and circuit
breakers. Under ``torch.distributed`` the outcome is broadcast, and every other rank
applies the same command with its own executor, so all ranks keep the same learning
rates. Timeouts and failures are fed to the ``SafetyGuard`` as step signals, and an
emergency level of CONSERVATIVE or above puts the loop in conservative mode.
"""

from __future__ import annotations

import dataclasses
import logging

from tolaria.control import ControlLoop, ControlOutcome, ControlStatus, EpochState, KasminaClient
from tolaria.distributed import DistributedContext, broadcast_command, is_main_process
from tolaria.results import EpochMetrics
from tolaria.safety import SafetyDecision, SafetyGuard
from tolaria.telemetry import Level, Telemetry

__all__ = ["EpochControl", "SharedOutcome"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SharedOutcome:
    """The part of rank 0's ``ControlOutcome`` every rank needs.

    Attributes:
        status: the outcome's status value.
        command: the applied command as ``(kind, parameters)``, or ``None``.
        timeouts: controller and executor calls that timed out or failed this epoch.
        conservative: whether the control loop is in conservative mode.
    """

    status: str
    command: tuple[str, dict[str, float]] | None
    timeouts: int
    conservative: bool


_TROUBLE = {ControlStatus.TIMED_OUT, ControlStatus.FAILED}


class EpochControl:
    """Runs the control loop once per epoch and spreads its outcome.

    Args:
        loop: the control loop; only rank 0 calls it.
        executor: this rank's executor, used on ranks other than 0.
        context: distributed context.
        guard: receives timeouts and failures as signals; ``None`` ignores them.
        telemetry: where events go.
    """

    def __init__(
        self,
        loop: ControlLoop,
        executor: KasminaClient,
        context: DistributedContext,
        guard: SafetyGuard | None,
        telemetry: Telemetry,
    ) -> None:
        self.loop = loop
        self.executor = executor
        self.context = context
        self.guard = guard
        self.telemetry = telemetry
        self.outcomes: list[ControlOutcome] = []
        self.conservative_epochs = 0

    def run(self, metrics: EpochMetrics) -> SafetyDecision | None:
        """Call the controller for ``metrics``'s epoch and return the guard's decision on timeouts."""
        shared = self._run_on_main(metrics) if is_main_process(self.context) else None
        if self.context.is_distributed:
            shared = broadcast_command(shared, self.context, step=metrics.global_step)
            if not is_main_process(self.context) and shared is not None:
                self._apply_remote(shared, metrics.epoch)
        if shared is None:
            return None
        if shared.conservative:
            self.conservative_epochs += 1
        if self.guard is None:
            return None
        return self.guard.observe_timeouts(shared.timeouts, metrics.global_step)

    def _run_on_main(self, metrics: EpochMetrics) -> SharedOutcome:
        level = None if self.guard is None else int(self.guard.emergency.level)
        state = EpochState(
            epoch=metrics.epoch,
            global_step=metrics.global_step,
            train_loss=dict(metrics.train_loss),
            val_loss=dict(metrics.val_loss),
            val_accuracy=dict(metrics.val_accuracy),
            aggregation=dict(metrics.aggregation),
            learning_rates=metrics.learning_rates,
            conservative=self.loop.conservative,
            emergency_level=level,
        )
        outcome = self.loop.run_epoch(state)
        self.outcomes.append(outcome)
        applied = outcome.status is ControlStatus.APPLIED and outcome.command is not None
        command = (outcome.command.kind, dict(outcome.command.parameters)) if applied and outcome.command else None
        return SharedOutcome(
            status=str(outcome.status),
            command=command,
            timeouts=int(outcome.status in _TROUBLE),
            conservative=outcome.conservative,
        )

    def _apply_remote(self, shared: SharedOutcome, epoch: int) -> None:
        if shared.command is None:
            return
        from tolaria.control import AdaptationCommand

        kind, parameters = shared.command
        command = AdaptationCommand(id=f"rank0-epoch{epoch}", kind=kind, parameters=parameters, epoch=epoch)
        try:
            self.executor.apply_command(command)
        except Exception as error:
            # Rank 0 applied this command, so a failure here leaves the ranks out of step.
            logger.exception("rank %d failed to apply command %s", self.context.rank, command)
            self.telemetry.count("tolaria.command.remote_failures")
            self.telemetry.event(
                "tolaria.command.remote_failed",
                Level.CRITICAL,
                reason="a rank other than 0 could not apply rank 0's command",
                error=type(error).__name__,
                message=str(error),
                rank=self.context.rank,
            )
            raise
