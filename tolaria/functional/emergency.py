"""Emergency levels as a pure state machine.

Training reports what went wrong in each step as ``StepSignals`` (a non-finite loss
or gradient, a loss spike, controller timeouts, a failed rollback). ``evaluate``
maps them to a ``Level`` under an ``EmergencyPolicy`` and returns the new
``EmergencyState`` together with the ``Transition`` that happened, or ``None``.

How ``evaluate`` decides:

* Each signal kind has a ladder of ``Threshold(min_count, level)`` entries. The state
  counts the occurrences of each kind in the current episode of trouble. An
  unhealthy step raises the level to the highest ladder level whose count has been
  reached, and never lowers it.
* An episode ends after ``policy.cooldown_steps`` consecutive healthy steps. Then
  the counts return to zero and the level steps down by one, unless it is
  ``NOMINAL`` or ``HALT``. Each lower level again needs a full cooldown, so a
  level falls one step at a time.
* ``HALT`` is absorbing: only ``reset`` leaves it.

Every function here is pure. Time is an argument (``now``: monotonic seconds,
for example ``time.monotonic()``) and so is the step. Nothing is mutated, and
levels outside ``Level`` raise ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

from tolaria.functional._emergency_levels import Actions, Level, actions, as_level
from tolaria.functional._emergency_policy import EmergencyPolicy, Threshold, check_int, level_for_count
from tolaria.functional._emergency_state import EmergencyState, StepSignals, Transition, TransitionKind

__all__ = [
    "Actions",
    "EmergencyPolicy",
    "EmergencyState",
    "Level",
    "StepSignals",
    "Threshold",
    "Transition",
    "TransitionKind",
    "actions",
    "as_level",
    "deescalate",
    "escalate",
    "evaluate",
    "initial",
    "level_for_count",
    "reset",
    "state_from_mapping",
    "state_to_mapping",
]


def _check_step(step: object, name: str = "step") -> int:
    return check_int(name, step, 0)


def _check_now(now: object) -> float:
    """Return ``now`` as a float if it is a finite real number, else raise ``ValueError``."""
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now={now!r} is invalid; expected a finite monotonic time in seconds")
    return float(now)


def _check_state(state: EmergencyState) -> EmergencyState:
    """Return ``state`` after checking that it is an ``EmergencyState`` with a valid level."""
    if not isinstance(state, EmergencyState):
        raise ValueError(f"state={state!r} is invalid; expected an EmergencyState from initial()")
    as_level(state.level, name="state.level")
    return state


def initial(*, step: int = 0, now: float = 0.0) -> EmergencyState:
    """Return the NOMINAL state entered at ``step`` and monotonic time ``now``.

    Raises:
        ValueError: ``step`` is negative or not an int, or ``now`` is not finite.
    """
    return EmergencyState(
        level=Level.NOMINAL,
        reason="initial",
        since_step=_check_step(step),
        since_s=_check_now(now),
        escalations=0,
        healthy_steps=0,
        nonfinite_count=0,
        spike_count=0,
        timeout_count=0,
        rollback_failure_count=0,
    )


def _clear_counts(state: EmergencyState) -> EmergencyState:
    return state._replace(nonfinite_count=0, spike_count=0, timeout_count=0, rollback_failure_count=0)


def escalate(
    state: EmergencyState, level: Level | int | str, *, reason: str, now: float, step: int
) -> tuple[EmergencyState, Transition | None]:
    """Raise the level to ``level``; a level at or below the current one changes nothing.

    Returns:
        The new state and the transition, or ``state`` unchanged and ``None``.

    Raises:
        ValueError: ``level`` or ``state.level`` is not a ``Level``, ``step`` is
            negative, or ``now`` is not finite.
    """
    _check_state(state)
    target = as_level(level)
    time_s = _check_now(now)
    _check_step(step)
    if target <= state.level:
        return state, None

    transition = Transition(TransitionKind.ESCALATED, Level(state.level), target, str(reason), step, time_s)
    new_state = state._replace(
        level=target,
        reason=str(reason),
        since_step=step,
        since_s=time_s,
        escalations=state.escalations + 1,
        healthy_steps=0,
    )
    return new_state, transition


def deescalate(
    state: EmergencyState,
    level: Level | int | str,
    *,
    reason: str,
    now: float,
    step: int,
    policy: EmergencyPolicy,
) -> tuple[EmergencyState, Transition | None]:
    """Lower the level to ``level`` once the cooldown has passed.

    Nothing changes when ``level`` is at or above the current level, when the
    current level is HALT (only ``reset`` leaves it), or when fewer than
    ``policy.cooldown_steps`` healthy steps have passed since the last unhealthy
    step or level change. Lowering the level also ends the episode, so the signal
    counts return to zero.

    Returns:
        The new state and the transition, or ``state`` unchanged and ``None``.

    Raises:
        ValueError: ``level`` or ``state.level`` is not a ``Level``, ``step`` is
            negative, or ``now`` is not finite.
    """
    _check_state(state)
    target = as_level(level)
    time_s = _check_now(now)
    _check_step(step)
    blocked = state.level == Level.HALT or state.healthy_steps < policy.cooldown_steps
    if target >= state.level or blocked:
        return state, None

    transition = Transition(TransitionKind.DEESCALATED, Level(state.level), target, str(reason), step, time_s)
    new_state = _clear_counts(state)._replace(
        level=target, reason=str(reason), since_step=step, since_s=time_s, healthy_steps=0
    )
    return new_state, transition


def reset(state: EmergencyState, *, reason: str, now: float, step: int) -> tuple[EmergencyState, Transition]:
    """Return to NOMINAL from any level, HALT included, and start a new episode.

    The escalation count is kept; the healthy-step and signal counts return to
    zero. A reset always returns a transition, also when the level was NOMINAL.

    Raises:
        ValueError: ``state.level`` is not a ``Level``, ``step`` is negative, or
            ``now`` is not finite.
    """
    _check_state(state)
    time_s = _check_now(now)
    _check_step(step)
    transition = Transition(TransitionKind.RESET, Level(state.level), Level.NOMINAL, str(reason), step, time_s)
    new_state = _clear_counts(state)._replace(
        level=Level.NOMINAL, reason=str(reason), since_step=step, since_s=time_s, healthy_steps=0
    )
    return new_state, transition


def _check_signals(signals: StepSignals) -> StepSignals:
    if not isinstance(signals, StepSignals):
        raise ValueError(f"signals={signals!r} is invalid; expected StepSignals")
    _check_step(signals.step, "signals.step")
    check_int("signals.timeouts", signals.timeouts, 0)
    return signals


# (state field, policy ladder, reason text) for each signal kind, in reporting order.
_KINDS = (
    ("nonfinite_count", "on_nonfinite", "non-finite steps"),
    ("spike_count", "on_spike", "loss spikes"),
    ("timeout_count", "on_timeout", "timeouts"),
    ("rollback_failure_count", "on_rollback_failure", "rollback failures"),
)


def _occurrences(signals: StepSignals) -> tuple[int, int, int, int]:
    """Return this step's occurrences of each kind, in ``_KINDS`` order."""
    nonfinite = int(bool(signals.nonfinite_loss) or bool(signals.nonfinite_grad))
    return nonfinite, int(bool(signals.spike)), signals.timeouts, int(bool(signals.rollback_failed))


def _on_unhealthy_step(
    state: EmergencyState, signals: StepSignals, policy: EmergencyPolicy, now: float
) -> tuple[EmergencyState, Transition | None]:
    """Add the step's occurrences to the counts and escalate to the level their ladders reach."""
    updates: dict[str, Any] = {"healthy_steps": 0}
    target = Level.NOMINAL
    reasons: list[str] = []
    for (field, ladder_name, text), occurred in zip(_KINDS, _occurrences(signals), strict=True):
        if not occurred:
            continue
        count = getattr(state, field) + occurred
        updates[field] = count
        target = max(target, level_for_count(getattr(policy, ladder_name), count))
        reasons.append(f"{text}: {count}")

    counted = state._replace(**updates)
    return escalate(counted, target, reason=", ".join(reasons), now=now, step=signals.step)


def _on_healthy_step(
    state: EmergencyState, step: int, policy: EmergencyPolicy, now: float
) -> tuple[EmergencyState, Transition | None]:
    """Count a healthy step; after a full cooldown end the episode and step down by one level."""
    healthy = state.healthy_steps + 1
    counted = state._replace(healthy_steps=healthy)
    if healthy < policy.cooldown_steps:
        return counted, None

    counted = _clear_counts(counted)
    if counted.level in (Level.NOMINAL, Level.HALT):
        return counted, None
    lower = Level(counted.level - 1)
    reason = f"{healthy} healthy steps at {Level(counted.level).name}"
    return deescalate(counted, lower, reason=reason, now=now, step=step, policy=policy)


def evaluate(
    state: EmergencyState, signals: StepSignals, policy: EmergencyPolicy, *, now: float
) -> tuple[EmergencyState, Transition | None]:
    """Apply one step's signals and return the new state and the transition, if any.

    An unhealthy step adds its occurrences to the episode counts, resets the
    healthy-step count and escalates to the highest level the ladders of the
    signals seen in this step reach (never lower than the current level). A
    healthy step counts towards the cooldown; at ``policy.cooldown_steps`` the
    episode ends and the level steps down by one (NOMINAL and HALT stay).

    Raises:
        ValueError: ``state`` or ``signals`` is invalid, or ``now`` is not finite.
    """
    _check_state(state)
    _check_signals(signals)
    time_s = _check_now(now)
    if signals.healthy:
        return _on_healthy_step(state, signals.step, policy, time_s)
    return _on_unhealthy_step(state, signals, policy, time_s)


_COUNTS = ("since_step", "escalations", "healthy_steps", "nonfinite_count", "spike_count", "timeout_count")


def state_to_mapping(state: EmergencyState, *, now: float) -> dict[str, Any]:
    """Return ``state`` as plain ints, floats and strings, for weights-only checkpoints.

    ``since_s`` is a monotonic time, which means nothing in another process, so the
    mapping stores the level's age ``now - since_s`` in seconds instead.
    """
    data: dict[str, Any] = {name: int(getattr(state, name)) for name in _COUNTS}
    data["rollback_failure_count"] = int(state.rollback_failure_count)
    data["level"] = int(state.level)
    data["reason"] = str(state.reason)
    data["age_s"] = max(0.0, _check_now(now) - state.since_s)
    return data


def state_from_mapping(data: Any, *, now: float) -> EmergencyState:
    """Rebuild a state saved by ``state_to_mapping``, its level entered ``age_s`` before ``now``.

    Raises:
        ValueError: a field is missing or invalid; the message names it.
    """
    try:
        counts = {name: _check_step(data[name], name) for name in (*_COUNTS, "rollback_failure_count")}
        level = as_level(data["level"])
        reason = str(data["reason"])
        age_s = float(data["age_s"])
    except KeyError as error:
        raise ValueError(f"emergency state mapping is missing the field {error.args[0]!r}") from error
    return EmergencyState(level=level, reason=reason, since_s=_check_now(now) - age_s, **counts)

