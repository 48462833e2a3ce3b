"""Rollback outcomes: ``RollbackResult``, ``DeadlineSignal`` and the ``CheckpointLoader`` protocol."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from tolaria.checkpoint import CheckpointInfo
from tolaria.functional.rollback import AttemptStatus, Tier
from tolaria.telemetry import Telemetry

__all__ = ["CheckpointLoader", "DeadlineSignal", "RollbackResult"]


class CheckpointLoader(Protocol):
    """Loads the newest good checkpoint at or before a step; ``tolaria.checkpoint.load_latest`` is one."""

    def __call__(
        self, directory: Path, *, at_or_before: int, cancel: Any, telemetry: Telemetry
    ) -> tuple[CheckpointInfo, dict[str, Any]]:
        """Return the checkpoint's info and its state, checking ``cancel`` between chunks of work."""
        ...


class DeadlineSignal(NamedTuple):
    """Set when a rollback missed its deadline.

    Attributes:
        target_step: step the rollback aimed at.
        tier: tier that was running at the deadline.
        deadline_s: the time budget, in seconds.
        monotonic_s: ``time.monotonic()`` when the miss was detected, in seconds.
        wall_time_s: ``time.time()`` at the same moment, in seconds since the Unix epoch.
        reason: the rollback's reason.
    """

    target_step: int
    tier: Tier
    deadline_s: float
    monotonic_s: float
    wall_time_s: float
    reason: str


class RollbackResult(NamedTuple):
    """The outcome of one rollback.

    Attributes:
        tier: ``FAST``, ``FULL`` or ``NONE`` when nothing could be restored.
        status: ``RESTORED``, ``FAILED`` or ``DEADLINE_EXCEEDED``.
        target_step: newest step the caller accepted.
        restored_step: step whose state is now live, or ``None`` when nothing was restored.
        latency_ms: wall time of the whole rollback, in milliseconds.
        hit: whether the fast tier found and restored a snapshot.
        error: what failed, or ``None``.
        reason: the caller's reason (``"loss_spike"``, ``"nonfinite"``).
        extra: the trainer's values saved with the restored state (data position,
            counters); empty unless ``status`` is ``RESTORED``.
    """

    tier: Tier
    status: AttemptStatus
    target_step: int
    restored_step: int | None
    latency_ms: float
    hit: bool
    error: str | None
    reason: str
    extra: Mapping[str, Any]

    @property
    def ok(self) -> bool:
        """Whether a state was restored."""
        return self.status is AttemptStatus.RESTORED
