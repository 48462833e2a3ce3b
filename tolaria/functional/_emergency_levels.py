"""Emergency levels and the actions the trainer takes at each.

``Level`` numbers the levels from normal training (0) to stopped training (4);
``as_level`` accepts a level, its number or its name; ``actions`` says what the
trainer does at a level. Public through ``tolaria.functional.emergency``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Actions", "Level", "actions", "as_level"]


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
