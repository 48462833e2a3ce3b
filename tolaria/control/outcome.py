"""Results of the control loop: ``ControlOutcome`` for each epoch and ``CallResult`` for each call."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from tolaria.control.commands import AdaptationCommand

__all__ = ["CallResult", "ControlOutcome", "ControlStatus"]


class ControlStatus(enum.StrEnum):
    """Status of an epoch's command."""

    APPLIED = "applied"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    FAILED = "failed"
    SKIPPED_CONSERVATIVE = "skipped_conservative"


@dataclasses.dataclass(frozen=True)
class ControlOutcome:
    """The immutable result of ``ControlLoop.run_epoch``.

    Attributes:
        epoch: the epoch the outcome belongs to.
        status: what became of the command.
        command: the command the controller returned, or ``None`` when it was not
            called, timed out or failed.
        stage: ``"tamiyo"`` or ``"kasmina"``, the call that timed out, failed, was
            skipped or rejected the command; ``None`` when the command was applied.
        reason: why, in words.
        error_type: name of the exception class of a failure or rejection, else ``None``.
        tamiyo_latency_s: seconds the controller call took, ``None`` when not called.
        kasmina_latency_s: seconds the executor call took, ``None`` when not called.
        conservative: whether training is in conservative mode after this epoch.
        entered_conservative: whether this epoch entered conservative mode.
        exited_conservative: whether this epoch left conservative mode.
    """

    epoch: int
    status: ControlStatus
    command: AdaptationCommand | None
    stage: str | None
    reason: str
    error_type: str | None
    tamiyo_latency_s: float | None
    kasmina_latency_s: float | None
    conservative: bool
    entered_conservative: bool
    exited_conservative: bool

    @property
    def effective_command(self) -> AdaptationCommand:
        """The command that took effect: the applied one, or the conservative ``noop``."""
        if self.status is ControlStatus.APPLIED and self.command is not None:
            return self.command
        return AdaptationCommand.noop(
            epoch=self.epoch, reason=f"conservative: {self.reason}", command_id=f"conservative-e{self.epoch}"
        )


@dataclasses.dataclass(frozen=True)
class CallResult:
    """The result of one controller or executor call through the worker and its breaker.

    Attributes:
        status: ``"ok"``, ``"rejected"``, ``"timed_out"``, ``"failed"`` or ``"skipped"``.
        task: the worker task name, for example ``"tamiyo.evaluate_epoch"``.
        value: what the call returned, when ``status`` is ``"ok"``.
        latency_s: seconds from submission to result, ``None`` when skipped.
        error: the exception of a failure, timeout or rejection.
        reason: why, in words.
    """

    status: str
    task: str = ""
    value: Any = None
    latency_s: float | None = None
    error: BaseException | None = None
    reason: str = ""

    @property
    def error_type(self) -> str | None:
        """Name of the exception class of ``error``, or ``None``."""
        return type(self.error).__name__ if self.error is not None else None
