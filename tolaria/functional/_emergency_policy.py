"""The emergency policy: ladders that map signal counts to levels, and the cooldown.

Public through ``tolaria.functional.emergency``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from tolaria.functional._emergency_levels import Level, as_level

__all__ = ["EmergencyPolicy", "Ladder", "Threshold", "check_int", "level_for_count"]


class Threshold(NamedTuple):
    """One rung of a ladder: ``min_count`` occurrences in an episode reach ``level``."""

    min_count: int
    level: Level


Ladder = tuple[Threshold, ...]

_LADDER_FIELDS = ("on_nonfinite", "on_spike", "on_timeout", "on_rollback_failure")


def check_int(name: str, value: object, minimum: int) -> int:
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
            check_int(f"{name}[{index}].min_count", count, 1),
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
        check_int("cooldown_steps", self.cooldown_steps, 1)
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
