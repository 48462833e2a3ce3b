"""Rollback as data: an LRU snapshot cache and the two-tier restore decision.

The cache maps training steps to snapshots of any type and evicts the least
recently used entries once their total size would exceed a byte budget. The
decision picks the fast tier (an in-memory snapshot at or before the target
step), the full tier (an on-disk checkpoint) or neither. A restore attempt then moves from
``STARTED`` to ``RESTORED``, ``FAILED`` or ``DEADLINE_EXCEEDED`` on the events the
shell reports. Every function is pure: it returns new values, never
mutates its arguments, and takes the time as an argument in seconds.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Generic, NamedTuple, TypeVar

import optree
import torch

__all__ = [
    "AttemptStatus",
    "CacheEntry",
    "RestoreAttempt",
    "RollbackDecision",
    "SnapshotCache",
    "Tier",
    "decide",
    "discard_newer",
    "empty",
    "latency_s",
    "make_room",
    "nbytes",
    "nearest",
    "on_failed",
    "on_restored",
    "on_tick",
    "peek",
    "put",
    "remaining_s",
    "remove",
    "start",
    "steps",
]

SnapshotT = TypeVar("SnapshotT")


class CacheEntry(NamedTuple, Generic[SnapshotT]):
    """One cached snapshot: its training step, the snapshot and its size in bytes."""

    step: int
    snapshot: SnapshotT
    size_bytes: int


class SnapshotCache(NamedTuple, Generic[SnapshotT]):
    """An immutable LRU cache of snapshots keyed by training step.

    Attributes:
        capacity_bytes: maximum total size of the entries, in bytes.
        entries: the entries, least recently used first; each step occurs at most once.
        size_bytes: sum of ``entry.size_bytes`` over ``entries``; never above ``capacity_bytes``.
    """

    capacity_bytes: int
    entries: tuple[CacheEntry[SnapshotT], ...]
    size_bytes: int


class Tier(enum.IntEnum):
    """Source of a rollback: none, an in-memory snapshot or an on-disk checkpoint."""

    NONE = 0
    FAST = 1
    FULL = 2


class AttemptStatus(enum.IntEnum):
    """State of one restore attempt. Every status except ``STARTED`` is terminal."""

    STARTED = 0
    RESTORED = 1
    FAILED = 2
    DEADLINE_EXCEEDED = 3


class RollbackDecision(NamedTuple):
    """The tier chosen for a rollback and the step it would restore.

    Attributes:
        tier: ``FAST``, ``FULL`` or ``NONE`` when nothing at or before the target is available.
        target_step: newest step the caller accepts to go back to.
        source_step: step of the chosen snapshot or checkpoint, ``None`` for ``NONE``.
        deadline_s: monotonic time in seconds by which the restore must finish.
        reason: why this tier was chosen, a short snake_case phrase.
    """

    tier: Tier
    target_step: int
    source_step: int | None
    deadline_s: float
    reason: str


class RestoreAttempt(NamedTuple):
    """One restore in progress or finished.

    Attributes:
        decision: the decision the attempt carries out; its tier is ``FAST`` or ``FULL``.
        status: current status.
        started_s: monotonic time the attempt started, in seconds.
        finished_s: monotonic time it reached a terminal status, ``None`` while ``STARTED``.
        restored_step: step actually restored, set only for ``RESTORED``.
        error: what went wrong, set for ``FAILED`` and ``DEADLINE_EXCEEDED``.
    """

    decision: RollbackDecision
    status: AttemptStatus
    started_s: float
    finished_s: float | None
    restored_step: int | None
    error: str | None


def _check_step(name: str, step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{name} must be a non-negative int, got {step!r}")


def _check_time(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a time in seconds, got {value!r}")


def empty(capacity_bytes: int) -> SnapshotCache[Any]:
    """Create an empty cache for at most ``capacity_bytes`` bytes of snapshots.

    Raises:
        ValueError: ``capacity_bytes`` is not a positive int.
    """
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
        raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
    return SnapshotCache(capacity_bytes=capacity_bytes, entries=(), size_bytes=0)


def _leaf_nbytes(leaf: object) -> int:
    if isinstance(leaf, torch.Tensor):
        return leaf.numel() * leaf.element_size()
    if isinstance(leaf, (bytes, bytearray, memoryview)):
        return len(leaf)
    size = getattr(leaf, "nbytes", None)
    if isinstance(size, int) and not isinstance(size, bool):
        # Arrays of other libraries (numpy) report their data size this way.
        return size
    return 0


def nbytes(tree: object) -> int:
    """Return the data size in bytes of the tensors in a pytree.

    A tensor counts ``numel() * element_size()`` bytes whatever its device or strides.
    A ``bytes``-like leaf counts its length and a leaf with an integer ``nbytes``
    attribute (a numpy array) counts that. Every other leaf (numbers, strings,
    ``None``) counts 0. Reads metadata only, so no device synchronisation happens.
    """
    leaves: list[object] = optree.tree_leaves(tree, none_is_leaf=True, namespace="tolaria")  # type: ignore[arg-type]
    return sum((_leaf_nbytes(leaf) for leaf in leaves), start=0)


def _without(entries: tuple[CacheEntry[SnapshotT], ...], step: int) -> tuple[CacheEntry[SnapshotT], ...]:
    return tuple(entry for entry in entries if entry.step != step)


def _rebuilt(cache: SnapshotCache[SnapshotT], entries: tuple[CacheEntry[SnapshotT], ...]) -> SnapshotCache[SnapshotT]:
    total = sum(entry.size_bytes for entry in entries)
    return SnapshotCache(capacity_bytes=cache.capacity_bytes, entries=entries, size_bytes=total)


def steps(cache: SnapshotCache[SnapshotT]) -> tuple[int, ...]:
    """Return the cached steps in increasing order."""
    return tuple(sorted(entry.step for entry in cache.entries))


def peek(cache: SnapshotCache[SnapshotT], step: int) -> SnapshotT | None:
    """Return the snapshot stored for exactly ``step``, or ``None``; the LRU order is unchanged."""
    for entry in cache.entries:
        if entry.step == step:
            return entry.snapshot
    return None


def remove(cache: SnapshotCache[SnapshotT], step: int) -> SnapshotCache[SnapshotT]:
    """Return the cache without the entry for ``step``; a missing step leaves it as it is."""
    return _rebuilt(cache, _without(cache.entries, step))


def make_room(cache: SnapshotCache[SnapshotT], size_bytes: int) -> tuple[SnapshotCache[SnapshotT], tuple[int, ...]]:
    """Evict least recently used entries until ``size_bytes`` more bytes fit.

    Returns the new cache and the evicted steps, oldest use first.

    Raises:
        ValueError: ``size_bytes`` is negative or larger than the whole capacity.
    """
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
        raise ValueError(f"size_bytes must be a non-negative int, got {size_bytes!r}")
    if size_bytes > cache.capacity_bytes:
        raise ValueError(
            f"a snapshot of {size_bytes} bytes can never fit a cache of capacity_bytes={cache.capacity_bytes}; "
            "raise the rollback cache capacity or snapshot less state"
        )
    entries = cache.entries
    total = cache.size_bytes
    evicted: list[int] = []
    while entries and total + size_bytes > cache.capacity_bytes:
        oldest, entries = entries[0], entries[1:]
        total -= oldest.size_bytes
        evicted.append(oldest.step)
    return SnapshotCache(cache.capacity_bytes, entries, total), tuple(evicted)


def put(
    cache: SnapshotCache[SnapshotT],
    step: int,
    snapshot: SnapshotT,
    *,
    size_bytes: int | None = None,
) -> tuple[SnapshotCache[SnapshotT], tuple[int, ...]]:
    """Store ``snapshot`` for ``step`` as the most recently used entry.

    An entry already stored for ``step`` is replaced and its size released first; it
    is not reported as evicted. Other entries are evicted least recently used first
    until the new one fits.

    Args:
        cache: the cache to extend.
        step: training step of the snapshot, a non-negative int.
        snapshot: the value to store.
        size_bytes: size of ``snapshot`` in bytes; ``nbytes(snapshot)`` when ``None``.

    Returns:
        The new cache and the steps evicted to make room, oldest use first.

    Raises:
        ValueError: ``step`` is invalid, or the snapshot is larger than the whole capacity.
    """
    _check_step("step", step)
    size = nbytes(snapshot) if size_bytes is None else size_bytes
    kept = remove(cache, step)
    room, evicted = make_room(kept, size)
    entry = CacheEntry(step=step, snapshot=snapshot, size_bytes=size)
    new_cache = SnapshotCache(room.capacity_bytes, (*room.entries, entry), room.size_bytes + size)
    return new_cache, evicted


def _floor_entry(cache: SnapshotCache[SnapshotT], step: int) -> CacheEntry[SnapshotT] | None:
    candidates = [entry for entry in cache.entries if entry.step <= step]
    return max(candidates, key=lambda entry: entry.step, default=None)


def nearest(
    cache: SnapshotCache[SnapshotT], step: int
) -> tuple[SnapshotCache[SnapshotT], int | None, SnapshotT | None]:
    """Find the newest snapshot at or before ``step`` and mark it most recently used.

    Returns:
        ``(cache, found_step, snapshot)``, or ``(cache, None, None)`` unchanged when no
        cached step is ``<= step``.

    Raises:
        ValueError: ``step`` is not a non-negative int.
    """
    _check_step("step", step)
    found = _floor_entry(cache, step)
    if found is None:
        return cache, None, None
    entries = (*_without(cache.entries, found.step), found)
    return SnapshotCache(cache.capacity_bytes, entries, cache.size_bytes), found.step, found.snapshot


def discard_newer(cache: SnapshotCache[SnapshotT], step: int) -> tuple[SnapshotCache[SnapshotT], tuple[int, ...]]:
    """Drop every entry newer than ``step`` and return the new cache and the dropped steps.

    After a rollback to ``step`` those entries belong to the abandoned trajectory.
    """
    dropped = tuple(entry.step for entry in cache.entries if entry.step > step)
    kept = tuple(entry for entry in cache.entries if entry.step <= step)
    return _rebuilt(cache, kept), dropped


def decide(
    cache: SnapshotCache[SnapshotT],
    target_step: int,
    *,
    now_s: float,
    deadline_s: float,
    checkpoint_step: int | None,
) -> RollbackDecision:
    """Choose how to roll back to ``target_step`` or earlier.

    The fast tier wins whenever a snapshot at or before the target is cached, even if
    a checkpoint is newer, because it is the one that fits any deadline. Otherwise the
    full tier is chosen when the shell found a checkpoint at or before the target
    (``checkpoint_step``), and ``NONE`` when there is neither or the deadline has passed.

    Raises:
        ValueError: ``target_step`` is invalid, or ``checkpoint_step`` is after the target.
    """
    _check_step("target_step", target_step)
    _check_time("now_s", now_s)
    _check_time("deadline_s", deadline_s)
    if checkpoint_step is not None:
        _check_step("checkpoint_step", checkpoint_step)
        if checkpoint_step > target_step:
            raise ValueError(f"checkpoint_step={checkpoint_step} is after target_step={target_step}")

    if now_s >= deadline_s:
        return RollbackDecision(Tier.NONE, target_step, None, deadline_s, "deadline_already_passed")
    found = _floor_entry(cache, target_step)
    if found is not None:
        return RollbackDecision(Tier.FAST, target_step, found.step, deadline_s, "snapshot_available")
    if checkpoint_step is not None:
        return RollbackDecision(Tier.FULL, target_step, checkpoint_step, deadline_s, "no_snapshot_checkpoint_available")
    return RollbackDecision(Tier.NONE, target_step, None, deadline_s, "no_snapshot_or_checkpoint")


def start(decision: RollbackDecision, *, now_s: float) -> RestoreAttempt:
    """Begin carrying out ``decision`` at ``now_s``.

    Raises:
        ValueError: the decision's tier is ``NONE``.
    """
    _check_time("now_s", now_s)
    if decision.tier is Tier.NONE:
        raise ValueError(f"cannot start a restore for a decision with tier NONE ({decision.reason})")
    return RestoreAttempt(decision, AttemptStatus.STARTED, float(now_s), None, None, None)


def _check_event_time(attempt: RestoreAttempt, now_s: float) -> None:
    _check_time("now_s", now_s)
    if now_s < attempt.started_s:
        raise ValueError(f"now_s={now_s} is before the attempt started at {attempt.started_s}")


def _finished(
    attempt: RestoreAttempt, status: AttemptStatus, now_s: float, *, step: int | None, error: str | None
) -> RestoreAttempt:
    return attempt._replace(status=status, finished_s=float(now_s), restored_step=step, error=error)


def on_restored(attempt: RestoreAttempt, *, step: int, now_s: float) -> RestoreAttempt:
    """Record that the state of ``step`` was loaded at ``now_s``.

    A full-tier load that arrives at or after the deadline turns into
    ``DEADLINE_EXCEEDED``: its staged state must be discarded. A fast-tier restore
    is always accepted, because it copies in place on the training thread and
    cannot be abandoned half-way. Events on a finished attempt change nothing.

    Raises:
        ValueError: ``step`` is after the target step, or ``now_s`` is before the start.
    """
    if attempt.status is not AttemptStatus.STARTED:
        return attempt
    _check_event_time(attempt, now_s)
    _check_step("step", step)
    if step > attempt.decision.target_step:
        raise ValueError(f"restored step {step} is after target_step={attempt.decision.target_step}")
    late = now_s >= attempt.decision.deadline_s
    if late and attempt.decision.tier is Tier.FULL:
        error = f"checkpoint of step {step} loaded {now_s - attempt.decision.deadline_s:.3f} s after the deadline"
        return _finished(attempt, AttemptStatus.DEADLINE_EXCEEDED, now_s, step=None, error=error)
    return _finished(attempt, AttemptStatus.RESTORED, now_s, step=step, error=None)


def on_failed(attempt: RestoreAttempt, *, error: str, now_s: float) -> RestoreAttempt:
    """Record that the restore failed with ``error``; a finished attempt is returned unchanged."""
    if attempt.status is not AttemptStatus.STARTED:
        return attempt
    _check_event_time(attempt, now_s)
    return _finished(attempt, AttemptStatus.FAILED, now_s, step=None, error=error)


def on_tick(attempt: RestoreAttempt, *, now_s: float) -> RestoreAttempt:
    """Move a started attempt to ``DEADLINE_EXCEEDED`` once ``now_s`` reaches its deadline."""
    if attempt.status is not AttemptStatus.STARTED:
        return attempt
    _check_event_time(attempt, now_s)
    if now_s < attempt.decision.deadline_s:
        return attempt
    error = f"no result {attempt.decision.deadline_s - attempt.started_s:.3f} s after the restore started"
    return _finished(attempt, AttemptStatus.DEADLINE_EXCEEDED, now_s, step=None, error=error)


def remaining_s(attempt: RestoreAttempt, *, now_s: float) -> float:
    """Return the seconds left until the attempt's deadline, 0.0 once it has passed."""
    return max(0.0, attempt.decision.deadline_s - now_s)


def latency_s(attempt: RestoreAttempt) -> float | None:
    """Return the seconds from start to a terminal status, ``None`` while ``STARTED``."""
    if attempt.finished_s is None:
        return None
    return attempt.finished_s - attempt.started_s
