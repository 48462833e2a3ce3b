"""``SafetyGuard``: the trainer's reaction to anomalies, through emergency levels and rollback.

After every step the guard turns the step's flags (non-finite loss or gradient, loss
spike) into ``StepSignals`` for the ``EmergencyController`` and decides what the loop
does next:

* NOMINAL, NOTICE: continue.
* ELEVATED: continue, with snapshots every ``snapshot_every_elevated`` steps.
* CONSERVATIVE reached through non-finite values or spikes: roll back to the newest
  snapshot taken before the trouble started, skip ``skip_batches`` batches and continue.
  More than ``max_rollbacks`` rollbacks within ``rollback_window_steps`` executed
  steps, or a failed rollback, escalate to HALT.
* HALT: stop training.

Snapshots are taken before a step runs, so a snapshot at step ``s`` is the state in
which step ``s`` has not happened yet. Its ``extra`` contains the data position and
the loss monitor state.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from tolaria.distributed import DistributedContext, agree_any, agree_rollback_step
from tolaria.emergency import EmergencyController
from tolaria.functional.emergency import Level, StepSignals, Transition
from tolaria.functional.rollback import AttemptStatus
from tolaria.rollback import RollbackManager
from tolaria.rollback.results import DeadlineSignal
from tolaria.settings import SafetyConfig
from tolaria.step import StepOutcome
from tolaria.telemetry import Level as EventLevel
from tolaria.telemetry import Telemetry

__all__ = ["Position", "SafetyDecision", "SafetyGuard"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Position:
    """The loop's position: the next batch to run.

    Attributes:
        epoch: 0-based epoch index.
        batch: index of the next batch within the epoch's order.
        global_step: optimizer steps applied so far.
    """

    epoch: int
    batch: int
    global_step: int

    def to_extra(self) -> dict[str, int]:
        """Return the position as plain integers for snapshots and checkpoints."""
        return {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step}

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> Position:
        """Read a position saved by ``to_extra``.

        Raises:
            KeyError: a field is missing.
        """
        return cls(int(extra["epoch"]), int(extra["batch"]), int(extra["global_step"]))


@dataclasses.dataclass(frozen=True)
class SafetyDecision:
    """The loop's next action after a step.

    Attributes:
        halt: stop training; ``reason`` gives the cause.
        resume_at: after a rollback, the position to continue from; ``None`` otherwise.
        restored_extra: the values saved with the restored snapshot (loss monitor state).
        reason: why training halted or rolled back.
    """

    halt: bool = False
    resume_at: Position | None = None
    restored_extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""


CONTINUE = SafetyDecision()


class SafetyGuard:
    """Snapshots, emergency evaluation and rollback for one training run.

    Args:
        config: snapshot and rollback settings.
        emergency: the controller holding the emergency level.
        rollback: the manager that takes snapshots and restores them.
        telemetry: where events and counters go.
        capture_extra: returns the values saved with each snapshot besides the
            position (for example the loss monitor state).
        context: under ``torch.distributed``, ranks agree on the rollback target, the
            newest step every rank has a snapshot for. They also agree on its success,
            so a rollback that fails on any rank counts as failed on every rank.
    """

    def __init__(
        self,
        config: SafetyConfig,
        emergency: EmergencyController,
        rollback: RollbackManager,
        telemetry: Telemetry,
        capture_extra: Callable[[], Mapping[str, Any]],
        context: DistributedContext | None = None,
    ) -> None:
        self.config = config
        self.emergency = emergency
        self.rollback = rollback
        self.telemetry = telemetry
        self._capture_extra = capture_extra
        self._context = context if context is not None and context.is_distributed else None
        self._executed_steps = 0
        self._rollback_marks: deque[int] = deque()
        self._trouble_step: int | None = None
        self._last_snapshot_step: int | None = None
        self.rollbacks = 0
        self.spikes = 0
        self.skipped_batches = 0

    def snapshot_due(self, global_step: int) -> bool:
        """Whether a snapshot should be taken before running ``global_step``."""
        if self._last_snapshot_step == global_step:
            return False
        interval = self.config.snapshot_every
        if self.emergency.level >= Level.ELEVATED:
            interval = self.config.snapshot_every_elevated
        return self._last_snapshot_step is None or global_step - self._last_snapshot_step >= interval

    def before_step(self, position: Position) -> None:
        """Take a snapshot when one is due."""
        if not self.snapshot_due(position.global_step):
            return
        extra = {**position.to_extra(), **self._capture_extra()}
        self.rollback.snapshot(position.global_step, extra=extra)
        self._last_snapshot_step = position.global_step

    def after_step(self, outcome: StepOutcome, position: Position) -> SafetyDecision:
        """Evaluate the step's signals and return what the loop should do next.

        Args:
            outcome: the step's result.
            position: the position of the step just run (before ``global_step`` advanced).
        """
        self._executed_steps += 1
        signals = StepSignals(
            position.global_step,
            nonfinite_loss=outcome.nonfinite_loss,
            nonfinite_grad=outcome.nonfinite and not outcome.nonfinite_loss,
            spike=outcome.spike,
        )
        if outcome.spike:
            self._report_spike(outcome, position)
        if not signals.healthy and self._trouble_step is None:
            self._trouble_step = position.global_step
        transition = self.emergency.observe(signals)
        if self.emergency.level == Level.NOMINAL:
            self._trouble_step = None
        return self._react(transition, position, spike=outcome.spike)

    def observe_timeouts(self, count: int, global_step: int) -> SafetyDecision:
        """Feed controller or executor timeouts of an epoch into the emergency level."""
        if count <= 0:
            return CONTINUE
        transition = self.emergency.observe(StepSignals(global_step, timeouts=count))
        return self._react(transition, None, spike=False)

    def on_deadline_exceeded(self, signal: DeadlineSignal) -> None:
        """Escalate when a rollback missed its deadline (connected to ``RollbackManager``)."""
        self.emergency.observe(StepSignals(signal.target_step, rollback_failed=True))

    def _react(self, transition: Transition | None, position: Position | None, *, spike: bool) -> SafetyDecision:
        level = self.emergency.level
        if level >= Level.HALT:
            return SafetyDecision(halt=True, reason=self.emergency.state.reason or "emergency level HALT")
        if position is None or self._trouble_step is None or level < Level.CONSERVATIVE:
            return CONTINUE
        # Roll back when trouble first reaches CONSERVATIVE, and again for every spike at
        # that level: a spike's update was applied, while a non-finite step changed nothing.
        rises = transition is not None and transition.previous < Level.CONSERVATIVE
        if rises or spike:
            return self._roll_back(position)
        return CONTINUE

    def _roll_back(self, position: Position) -> SafetyDecision:
        window_start = self._executed_steps - self.config.rollback_window_steps
        while self._rollback_marks and self._rollback_marks[0] <= window_start:
            self._rollback_marks.popleft()
        if len(self._rollback_marks) >= self.config.max_rollbacks:
            reason = f"{len(self._rollback_marks)} rollbacks within {self.config.rollback_window_steps} steps"
            self.emergency.escalate(Level.HALT, reason=reason, step=position.global_step)
            return SafetyDecision(halt=True, reason=reason)
        trouble = self._trouble_step if self._trouble_step is not None else position.global_step
        # The snapshot at step `trouble` was taken before that step ran, so it is clean.
        target = self._agreed_target(trouble, position.global_step)
        result = self.rollback.rollback(target, reason=self.emergency.state.reason or "anomaly")
        if self._context is not None and agree_any(not result.ok, self._context, step=position.global_step):
            result = result._replace(status=AttemptStatus.FAILED, error=result.error or "failed on another rank")
        if not result.ok:
            self.emergency.observe(StepSignals(position.global_step, rollback_failed=True))
            reason = f"rollback to step {trouble} failed: {result.error}"
            if self.emergency.level >= Level.HALT:
                return SafetyDecision(halt=True, reason=reason)
            logger.error("%s; training continues from the current state", reason)
            return CONTINUE
        self._rollback_marks.append(self._executed_steps)
        self.rollbacks += 1
        self._trouble_step = None
        restored = Position.from_extra(result.extra)
        # Snapshots newer than the restored one were dropped: the schedule restarts from it.
        self._last_snapshot_step = restored.global_step
        logger.warning(
            "rolled back from step %d to step %d; skipping the next %d batches",
            position.global_step,
            restored.global_step,
            self.config.skip_batches,
        )
        return SafetyDecision(resume_at=restored, restored_extra=result.extra, reason=result.reason)

    def _agreed_target(self, trouble: int, global_step: int) -> int:
        """Return the rollback target step.

        In one process it is ``trouble``. Under distributed training it is the newest
        step at or before ``trouble`` that every rank has a snapshot for.
        """
        if self._context is None:
            return trouble
        available = [step for step in self.rollback.cached_steps if step <= trouble]
        agreed = agree_rollback_step(available, self._context, step=global_step)
        # With no common snapshot every rank requests `trouble`, which the full tier may serve.
        return trouble if agreed is None else agreed

    def _report_spike(self, outcome: StepOutcome, position: Position) -> None:
        self.spikes += 1
        self.telemetry.count("tolaria.anomaly.spike")
        self.telemetry.event(
            "tolaria.anomaly.spike",
            EventLevel.WARNING,
            reason="loss far above its recent median",
            score=outcome.spike_score,
            epoch=position.epoch,
            step=position.global_step,
        )
