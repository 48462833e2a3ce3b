"""Sections of ``TrainerConfig`` for safety, checkpoints and the control loop.

Each section is a frozen dataclass validated when built, with a ``from_mapping``
constructor for the matching TOML table (``[safety]``, ``[checkpoint]``,
``[control]``). Errors read ``<Section>.<field>: got <value>; expected <rule>``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from tolaria.functional.breaker import BreakerPolicy

__all__ = ["CheckpointConfig", "ControlConfig", "SafetyConfig", "section_from_mapping"]

_Section = TypeVar("_Section")


def _fail(section: str, field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{section}.{field}: got {value!r}; expected {expected}")


def _check_int(section: str, field: str, value: Any, low: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(section, field, value, f"an integer >= {low}" + (" or None" if allow_none else ""))


def _check_seconds(section: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _fail(section, field, value, "a finite number of seconds > 0")


def section_from_mapping(cls: type[_Section], data: Mapping[str, Any]) -> _Section:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys.

    Raises:
        ValueError: a key is not a field of ``cls``, or a value is invalid.
    """
    names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; valid fields are {sorted(names)}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    """Snapshots, rollback and emergency broadcasting.

    Attributes:
        snapshot_every: take an in-memory snapshot every this many optimizer steps.
        snapshot_every_elevated: the tighter interval used at emergency level ELEVATED or above.
        snapshot_capacity_mb: memory budget of the snapshot cache in MiB; the least
            recently used snapshots are evicted past it.
        rollback_deadline_s: time limit of one rollback, in seconds.
        skip_batches: batches skipped after a rollback, so the run does not replay
            the data that caused the trouble.
        max_rollbacks: rollbacks allowed within ``rollback_window_steps`` before HALT.
        rollback_window_steps: window, in executed steps, in which rollbacks are counted.
        broadcast_timeout_s: time limit for delivering a level change to listeners.
    """

    snapshot_every: int = 50
    snapshot_every_elevated: int = 10
    snapshot_capacity_mb: float = 256.0
    rollback_deadline_s: float = 30.0
    skip_batches: int = 2
    max_rollbacks: int = 3
    rollback_window_steps: int = 1000
    broadcast_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        name = "SafetyConfig"
        _check_int(name, "snapshot_every", self.snapshot_every, 1)
        _check_int(name, "snapshot_every_elevated", self.snapshot_every_elevated, 1)
        if self.snapshot_every_elevated > self.snapshot_every:
            raise _fail(
                name, "snapshot_every_elevated", self.snapshot_every_elevated,
                f"an interval <= snapshot_every ({self.snapshot_every})",
            )
        _check_seconds(name, "snapshot_capacity_mb", self.snapshot_capacity_mb)
        _check_seconds(name, "rollback_deadline_s", self.rollback_deadline_s)
        _check_int(name, "skip_batches", self.skip_batches, 0)
        _check_int(name, "max_rollbacks", self.max_rollbacks, 0)
        _check_int(name, "rollback_window_steps", self.rollback_window_steps, 1)
        _check_seconds(name, "broadcast_timeout_s", self.broadcast_timeout_s)

    @property
    def snapshot_capacity_bytes(self) -> int:
        """``snapshot_capacity_mb`` in bytes."""
        return int(self.snapshot_capacity_mb * 2**20)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """On-disk checkpoints under ``out_dir/checkpoints``.

    Attributes:
        every_epochs: save at the end of every this many epochs; ``None`` disables.
        every_steps: also save every this many optimizer steps; ``None`` disables.
        keep_last: number of committed checkpoints kept; older ones are deleted after
            a new one is committed.
    """

    every_epochs: int | None = 1
    every_steps: int | None = None
    keep_last: int = 3

    def __post_init__(self) -> None:
        name = "CheckpointConfig"
        _check_int(name, "every_epochs", self.every_epochs, 1, allow_none=True)
        _check_int(name, "every_steps", self.every_steps, 1, allow_none=True)
        _check_int(name, "keep_last", self.keep_last, 1)


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """Calls to the controller (Tamiyo) and the executor (Kasmina) at each epoch end.

    Attributes:
        tamiyo_timeout_s: time limit of one controller call, in seconds.
        kasmina_timeout_s: time limit of one executor call, in seconds.
        breaker: thresholds of the circuit breaker around both calls; a TOML
            ``[control.breaker]`` table sets its fields.
    """

    tamiyo_timeout_s: float = 2.0
    kasmina_timeout_s: float = 2.0
    breaker: BreakerPolicy = dataclasses.field(default_factory=BreakerPolicy)

    def __post_init__(self) -> None:
        name = "ControlConfig"
        _check_seconds(name, "tamiyo_timeout_s", self.tamiyo_timeout_s)
        _check_seconds(name, "kasmina_timeout_s", self.kasmina_timeout_s)
        if isinstance(self.breaker, Mapping):
            object.__setattr__(self, "breaker", section_from_mapping(BreakerPolicy, self.breaker))
        if not isinstance(self.breaker, BreakerPolicy):
            raise _fail(name, "breaker", self.breaker, "a BreakerPolicy or a table of its fields")
