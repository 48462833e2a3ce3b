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

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

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
]


class Level(enum.IntEnum):
    """Emergency level, from normal training (0) to stopped training (4)."""

    NOMINAL = 0
    NOTICE = 1
    ELEVATED = 2
    CONSERVATIVE = 3
    HALT = 4


_LEVEL_CHOICES = ", ".join(f"{level.name}={level.value}" for level in Level)


def as_level(value: object, *, name: str = "level") -> Level:
    """Convert a ``Level``, its number or its name (any case) to a ``Level``.

    Raises:
        ValueError: ``value`` is a bool, or names or numbers no level. The message
            names the parameter ``name`` and lists the levels.
    """
    if isinstance(value, Level):
        return value
    if isinstance(value, str):
        try:
            return Level[value.strip().upper()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return Level(value)
        except ValueError:
            pass
    raise ValueError(f"{name}={value!r} is not an emergency level; expected one of {_LEVEL_CHOICES}")


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


class Threshold(NamedTuple):
    """One rung of a ladder: ``min_count`` occurrences in an episode reach ``level``."""

    min_count: int
    level: Level


class Actions(NamedTuple):
    """Actions the trainer takes at a level; ``actions(level)`` returns them.

    Attributes:
        record: count and emit the anomaly (NOTICE and above).
        warn: log a warning (ELEVATED and above).
        snapshot_more_often: take rollback snapshots more often (ELEVATED, CONSERVATIVE).
        stop_adaptation: stop applying adaptation commands (CONSERVATIVE and above).
        roll_back: restore the last good snapshot on entering the level (CONSERVATIVE).
        save_and_stop: save what can be saved and stop training (HALT).
        description: the same, in one sentence.
    """

    record: bool
    warn: bool
    snapshot_more_often: bool
    stop_adaptation: bool
    roll_back: bool
    save_and_stop: bool
    description: str


_ACTIONS: Mapping[Level, Actions] = {
    Level.NOMINAL: Actions(False, False, False, False, False, False, "Train normally."),
    Level.NOTICE: Actions(True, False, False, False, False, False, "Record the anomaly."),
    Level.ELEVATED: Actions(True, True, True, False, False, False, "Warn and snapshot more often."),
    Level.CONSERVATIVE: Actions(
        True, True, True, True, True, False, "Stop applying adaptation commands and roll back."
    ),
    Level.HALT: Actions(True, True, False, True, False, True, "Save what can be saved and stop training."),
}


def actions(level: Level | int | str) -> Actions:
    """Return the actions the trainer takes at ``level``.

    Raises:
        ValueError: ``level`` is not a ``Level``.
    """
    return _ACTIONS[as_level(level)]


Ladder = tuple[Threshold, ...]

_LADDER_FIELDS = ("on_nonfinite", "on_spike", "on_timeout", "on_rollback_failure")


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int (not a bool) of at least ``minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")
    return value


def _ladder_pairs(name: str, value: object) -> list[tuple[object, object]]:
    """Return the ``(count, level)`` pairs of a ladder given as a mapping or a sequence of pairs."""
    if isinstance(value, Mapping):
        return [(_parse_count(key), level) for key, level in value.items()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"{name}={value!r} is invalid; expected a sequence of (count, level) pairs or a mapping from count to level"
        )
    pairs: list[tuple[object, object]] = []
    for index, item in enumerate(value):
        if isinstance(item, (str, bytes)) or not isinstance(item, Iterable) or len(tuple(item)) != 2:
            raise ValueError(f"{name}[{index}]={item!r} is invalid; expected a (count, level) pair")
        count, level = tuple(item)
        pairs.append((count, level))
    return pairs


def _parse_count(key: object) -> object:
    """Convert a mapping key such as ``"3"`` (TOML keys are strings) to an int."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return key


def _parse_ladder(name: str, value: object) -> Ladder:
    """Validate a ladder and return it as a tuple of ``Threshold``.

    Raises:
        ValueError: a count is not a positive int, a level is NOMINAL or unknown, or
            counts or levels do not increase strictly along the ladder.
    """
    rungs: list[Threshold] = []
    for index, (count, level) in enumerate(_ladder_pairs(name, value)):
        rung = Threshold(
            _check_int(f"{name}[{index}].min_count", count, 1),
            as_level(level, name=f"{name}[{index}].level"),
        )
        if rung.level == Level.NOMINAL:
            raise ValueError(f"{name}[{index}].level=NOMINAL is invalid; to ignore a signal give an empty ladder")
        if rungs and rung.min_count <= rungs[-1].min_count:
            raise ValueError(
                f"{name}[{index}].min_count={rung.min_count} is invalid; counts must increase strictly "
                f"(previous count {rungs[-1].min_count})"
            )
        if rungs and rung.level <= rungs[-1].level:
            raise ValueError(
                f"{name}[{index}].level={rung.level.name} is invalid; levels must increase strictly "
                f"(previous level {rungs[-1].level.name})"
            )
        rungs.append(rung)
    return tuple(rungs)


def level_for_count(ladder: Ladder, count: int) -> Level:
    """Return the highest level of ``ladder`` whose count is at most ``count``, or NOMINAL."""
    reached = Level.NOMINAL
    for rung in ladder:
        if count >= rung.min_count:
            reached = rung.level
    return reached


@dataclasses.dataclass(frozen=True)
class EmergencyPolicy:
    """How step signals map to levels, and how fast levels come down.

    Counts are per episode of trouble: an episode ends after ``cooldown_steps``
    consecutive healthy steps. A ladder such as ``((1, NOTICE), (3, ELEVATED))``
    means that the first occurrence in an episode reaches NOTICE and the third
    reaches ELEVATED. An empty ladder ignores the signal.

    Ladders may be given as sequences of ``(count, level)`` pairs or as mappings
    from count to level; levels may be ``Level`` members, numbers or names. They
    are stored as tuples of ``Threshold``.

    Attributes:
        cooldown_steps: consecutive healthy steps before the level steps down by
            one and the counts return to zero (default 100, at least 1).
        on_nonfinite: ladder for steps with a non-finite loss or gradient
            (default: 1 → ELEVATED, 3 → CONSERVATIVE, 10 → HALT).
        on_spike: ladder for steps with a loss spike
            (default: 1 → NOTICE, 3 → ELEVATED, 6 → CONSERVATIVE).
        on_timeout: ladder for controller timeouts, counted one by one
            (default: 1 → NOTICE, 3 → ELEVATED).
        on_rollback_failure: ladder for failed rollbacks (default: 1 → HALT).

    Raises:
        ValueError: a field is invalid. The message names the field, echoes the value
            and states what is expected.
    """

    cooldown_steps: int = 100
    on_nonfinite: Ladder = (
        Threshold(1, Level.ELEVATED),
        Threshold(3, Level.CONSERVATIVE),
        Threshold(10, Level.HALT),
    )
    on_spike: Ladder = (
        Threshold(1, Level.NOTICE),
        Threshold(3, Level.ELEVATED),
        Threshold(6, Level.CONSERVATIVE),
    )
    on_timeout: Ladder = (Threshold(1, Level.NOTICE), Threshold(3, Level.ELEVATED))
    on_rollback_failure: Ladder = (Threshold(1, Level.HALT),)

    def __post_init__(self) -> None:
        _check_int("cooldown_steps", self.cooldown_steps, 1)
        for name in _LADDER_FIELDS:
            # Frozen: normalising a field in place needs object.__setattr__.
            object.__setattr__(self, name, _parse_ladder(name, getattr(self, name)))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> EmergencyPolicy:
        """Build a policy from a mapping such as a parsed TOML table.

        Missing keys keep their defaults. Ladders are lists of ``[count, "LEVEL"]``
        pairs or tables ``{ 3 = "ELEVATED" }``.

        Raises:
            ValueError: a key is unknown (the message lists the allowed keys) or a
                value is invalid.
        """
        if not isinstance(mapping, Mapping):
            raise ValueError(f"emergency policy={mapping!r} is invalid; expected a mapping of policy fields")
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in mapping if key not in allowed)
        if unknown:
            raise ValueError(f"unknown emergency policy keys {unknown}; allowed keys are {allowed}")
        return cls(**mapping)

    def to_mapping(self) -> dict[str, Any]:
        """Return the policy as plain data that ``from_mapping`` accepts (JSON and TOML friendly)."""
        data: dict[str, Any] = {"cooldown_steps": self.cooldown_steps}
        for name in _LADDER_FIELDS:
            ladder: Ladder = getattr(self, name)
            data[name] = [[rung.min_count, rung.level.name] for rung in ladder]
        return data


def _check_step(step: object, name: str = "step") -> int:
    return _check_int(name, step, 0)


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
    _check_int("signals.timeouts", signals.timeouts, 0)
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
