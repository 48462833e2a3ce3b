"""The data of the emergency state machine: its state, the step signals it reads and its transitions.

The state, the signals and the transition are NamedTuples, so optree flattens them
natively. Public through ``tolaria.functional.emergency``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from tolaria.functional._emergency_levels import Level

__all__ = ["EmergencyState", "StepSignals", "Transition", "TransitionKind"]


class TransitionKind(enum.StrEnum):
    """Kind of level change a transition made."""

    ESCALATED = "escalated"
    DEESCALATED = "deescalated"
    RESET = "reset"


class Transition(NamedTuple):
    """A level change, as data.

    Attributes:
        kind: escalated, deescalated or reset.
        previous: level before the transition.
        level: level after the transition (equal to ``previous`` only for a reset).
        reason: why it happened, for logs and events.
        step: global step at which it happened.
        time_s: monotonic time at which it happened, in seconds.
    """

    kind: TransitionKind
    previous: Level
    level: Level
    reason: str
    step: int
    time_s: float


class EmergencyState(NamedTuple):
    """Immutable emergency state.

    A NamedTuple, so optree flattens it natively. Every field is a leaf: Python
    ints, a float and a string (``level`` is a ``Level``, which is an ``int``).

    Attributes:
        level: current level.
        reason: why the current level was entered.
        since_step: global step at which the current level was entered.
        since_s: monotonic time at which the current level was entered, in seconds.
        escalations: number of escalations since ``initial``; ``reset`` keeps it.
        healthy_steps: consecutive healthy steps since the last unhealthy step or
            level change.
        nonfinite_count: steps with a non-finite loss or gradient in this episode.
        spike_count: steps with a loss spike in this episode.
        timeout_count: controller timeouts in this episode.
        rollback_failure_count: failed rollbacks in this episode.
    """

    level: Level
    reason: str
    since_step: int
    since_s: float
    escalations: int
    healthy_steps: int
    nonfinite_count: int
    spike_count: int
    timeout_count: int
    rollback_failure_count: int


class StepSignals(NamedTuple):
    """Trouble reported for one training step.

    A step is healthy when every flag is false and ``timeouts`` is 0.

    Attributes:
        step: global step the signals belong to, ``>= 0``.
        nonfinite_loss: the loss of some objective was NaN or infinite.
        nonfinite_grad: some gradient was NaN or infinite.
        spike: the loss monitor flagged a spike.
        timeouts: number of controller calls that timed out during the step, ``>= 0``.
        rollback_failed: a rollback was attempted and failed.
    """

    step: int
    nonfinite_loss: bool = False
    nonfinite_grad: bool = False
    spike: bool = False
    timeouts: int = 0
    rollback_failed: bool = False

    @property
    def healthy(self) -> bool:
        """Whether nothing went wrong in the step."""
        return not (self.nonfinite_loss or self.nonfinite_grad or self.spike or self.timeouts or self.rollback_failed)
