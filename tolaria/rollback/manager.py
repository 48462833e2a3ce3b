"""``RollbackManager``: two-tier rollback of a live training state within a deadline.

The fast tier restores an in-memory snapshot (``tolaria.rollback.snapshot``). The
full tier loads the newest good checkpoint at or before the target step
(``tolaria.checkpoint``) into staging memory on the shared worker. Only the calling
thread writes the staged state into the live objects, and only when the load
finished before the deadline. When the deadline passes first, ``rollback`` returns ``DEADLINE_EXCEEDED``
at once: the staged load is cancelled and discarded, ``deadline_signal`` is set with
its timestamps and ``on_deadline_exceeded`` is called. Nothing waits for the worker.

The decisions come from ``tolaria.functional.rollback``; this module does the copies,
the clocks, the worker calls, the logs and the telemetry. Use one manager from one
thread, the training thread.

Telemetry: metric ``tolaria.rollback.latency_ms`` per rollback; counters
``tolaria.rollback.fast_hits``, ``.full_restores``, ``.failures``,
``.deadline_exceeded``, ``.snapshots``, ``.evictions``; events
``tolaria.rollback.started`` (INFO), ``.completed`` (INFO), ``.failed`` (ERROR) and
``.deadline_exceeded`` (ERROR), each with a ``reason``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tolaria.checkpoint import CheckpointInfo, list_checkpoints, load_latest, restore_training_state
from tolaria.functional import rollback as core
from tolaria.functional.rollback import AttemptStatus, RestoreAttempt, Tier
from tolaria.rollback.buffers import BufferPool
from tolaria.rollback.reporting import report_deadline, report_failure, report_snapshot, report_success
from tolaria.rollback.results import CheckpointLoader, DeadlineSignal, RollbackResult
from tolaria.rollback.snapshot import StateSnapshot, capture, plan_capture, restore
from tolaria.telemetry import Level, Telemetry
from tolaria.worker import AsyncWorker, CancelToken, TaskHandle, TaskTimeout, WorkerClosed, WorkerSaturated

__all__ = ["RollbackManager"]

logger = logging.getLogger(__name__)

_NO_SNAPSHOTS: core.SnapshotCache[Any] = core.empty(1)
_Outcome = tuple[RestoreAttempt, Mapping[str, Any]]


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


class RollbackManager:
    """Snapshots a training state and rolls it back through the fast or the full tier.

    Args:
        model: the live model; restores write into its tensors in place.
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        scheduler: an LR scheduler, restored with the state.
        scaler: a ``torch.amp.GradScaler``, restored with the state.
        capacity_bytes: memory budget of the snapshot cache in bytes (spare buffers
            kept for reuse come on top, at most one snapshot's worth).
        checkpoint_dir: folder of ``tolaria.checkpoint`` checkpoints for the full tier;
            ``None`` disables it.
        worker: the shared ``tolaria.worker.AsyncWorker``; when ``None`` the manager
            starts its own at the first full-tier rollback and shuts it down in ``close``.
        deadline_s: default time budget of a rollback, in seconds.
        on_deadline_exceeded: called with the ``DeadlineSignal`` on the training thread
            when a rollback misses its deadline (the trainer raises the emergency level).
        telemetry: where metrics and events go; a sink-less ``Telemetry`` when ``None``.
        checkpoint_loader: replaces ``tolaria.checkpoint.load_latest`` for the full tier.
        clock: monotonic clock in seconds.

    Raises:
        ValueError: ``capacity_bytes`` or ``deadline_s`` is invalid.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scheduler: Any | None = None,
        scaler: Any | None = None,
        capacity_bytes: int,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        worker: AsyncWorker | None = None,
        deadline_s: float = 30.0,
        on_deadline_exceeded: Callable[[DeadlineSignal], None] | None = None,
        telemetry: Telemetry | None = None,
        checkpoint_loader: CheckpointLoader | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_positive("deadline_s", deadline_s)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.deadline_s = float(deadline_s)
        self.on_deadline_exceeded = on_deadline_exceeded
        self.telemetry = Telemetry() if telemetry is None else telemetry
        self._loader: CheckpointLoader = load_latest if checkpoint_loader is None else checkpoint_loader
        self._clock = clock
        self._cache: core.SnapshotCache[StateSnapshot] = core.empty(capacity_bytes)
        self._pool = BufferPool(max_spare=1)
        self._worker = worker
        self._owns_worker = False
        self._deadline_signal: DeadlineSignal | None = None

    # -- state ------------------------------------------------------------------------

    @property
    def cached_steps(self) -> tuple[int, ...]:
        """Steps with a snapshot in memory, oldest first."""
        return core.steps(self._cache)

    @property
    def size_bytes(self) -> int:
        """Bytes held by cached snapshots."""
        return self._cache.size_bytes

    @property
    def capacity_bytes(self) -> int:
        """Memory budget of the snapshot cache in bytes."""
        return self._cache.capacity_bytes

    @property
    def pool(self) -> BufferPool:
        """Spare buffers of evicted snapshots, with allocation and reuse counts."""
        return self._pool

    @property
    def deadline_signal(self) -> DeadlineSignal | None:
        """The last missed deadline, until ``clear_deadline_signal``; ``None`` if none."""
        return self._deadline_signal

    def clear_deadline_signal(self) -> None:
        """Forget the last missed deadline."""
        self._deadline_signal = None

    # -- snapshots --------------------------------------------------------------------

    def _release(self, old_cache: core.SnapshotCache[StateSnapshot], steps: tuple[int, ...]) -> None:
        """Hand the buffers of ``steps`` to the pool, looking them up in the cache they were in."""
        for step in steps:
            snapshot = core.peek(old_cache, step)
            if snapshot is not None:
                self._pool.release(snapshot.buffer)

    def snapshot(self, step: int, *, extra: Mapping[str, Any] | None = None) -> int:
        """Capture the live state as the snapshot of ``step`` and return its size in bytes.

        An existing snapshot of ``step`` is replaced. Least recently used snapshots are
        evicted first so that their buffers can be reused. ``extra`` contains the
        trainer's values (data position, counters), which come back in
        ``RollbackResult.extra``.

        Raises:
            ValueError: ``step`` is invalid, or one snapshot is larger than ``capacity_bytes``.
            TypeError: a tensor is not dense and strided.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        started = self._clock()
        plan = plan_capture(self.model, self.optimizer)

        before = self._cache
        cache = core.remove(before, step)
        cache, evicted = core.make_room(cache, plan.layout.total_bytes)
        self._release(before, (step, *evicted))
        self._cache = cache

        snapshot = capture(plan, step, scheduler=self.scheduler, scaler=self.scaler, extra=extra, pool=self._pool)
        self._cache, more = core.put(self._cache, step, snapshot, size_bytes=snapshot.size_bytes)
        self._release(cache, more)

        elapsed_ms = (self._clock() - started) * 1000.0
        report_snapshot(
            self.telemetry, step, snapshot.size_bytes, len(evicted) + len(more), elapsed_ms, self._cache.size_bytes
        )
        return snapshot.size_bytes

    def discard_snapshots(self) -> None:
        """Drop every snapshot and spare buffer."""
        self._cache = core.empty(self._cache.capacity_bytes)
        self._pool.clear()

    # -- rollback ---------------------------------------------------------------------

    def _checkpoint_step(self, target_step: int) -> int | None:
        if self.checkpoint_dir is None:
            return None
        steps = [step for step in list_checkpoints(self.checkpoint_dir) if step <= target_step]
        return max(steps, default=None)

    def rollback(self, target_step: int, *, reason: str, deadline_s: float | None = None) -> RollbackResult:
        """Restore the newest state at or before ``target_step``, within ``deadline_s`` seconds.

        Tries the fast tier, then the full tier if the fast tier has no snapshot or
        its snapshot no longer fits the live objects. On success, snapshots newer than
        the restored step are dropped (they belong to the abandoned trajectory) and
        the model's gradients are cleared. Failures are returned, not raised, and are
        logged, counted and emitted as events.

        Raises:
            ValueError: ``target_step`` or ``deadline_s`` is invalid.
        """
        if isinstance(target_step, bool) or not isinstance(target_step, int) or target_step < 0:
            raise ValueError(f"target_step must be a non-negative int, got {target_step!r}")
        budget = self.deadline_s if deadline_s is None else deadline_s
        _check_positive("deadline_s", budget)
        started = self._clock()
        deadline = started + budget
        decision = core.decide(
            self._cache,
            target_step,
            now_s=started,
            deadline_s=deadline,
            checkpoint_step=self._checkpoint_step(target_step),
        )
        self.telemetry.event(
            "tolaria.rollback.started",
            Level.INFO,
            reason=reason,
            target_step=target_step,
            tier=decision.tier.name.lower(),
            source_step=decision.source_step,
            deadline_s=budget,
        )
        if decision.tier is Tier.NONE:
            return self._finish(*self._nothing_to_restore(decision), reason, started)
        if decision.tier is Tier.FAST:
            outcome = self._run_fast(decision)
            decision = self._fallback(outcome[0], reason, started)
        if decision.tier is Tier.FULL:
            outcome = self._run_full(decision, reason, budget)
        return self._finish(*outcome, reason, started)

    def _fallback(self, fast: RestoreAttempt, reason: str, started: float) -> core.RollbackDecision:
        """Return the full-tier decision after a failed fast tier, or the fast decision to keep its result."""
        if fast.status is not AttemptStatus.FAILED:
            return fast.decision
        full = core.decide(
            _NO_SNAPSHOTS,
            fast.decision.target_step,
            now_s=self._clock(),
            deadline_s=fast.decision.deadline_s,
            checkpoint_step=self._checkpoint_step(fast.decision.target_step),
        )
        if full.tier is not Tier.FULL:
            return fast.decision
        report_failure(self.telemetry, fast, reason, (self._clock() - started) * 1000.0)
        return full

    def _nothing_to_restore(self, decision: core.RollbackDecision) -> _Outcome:
        now = self._clock()
        pending = core.RestoreAttempt(decision, AttemptStatus.STARTED, now, None, None, None)
        error = f"no snapshot or checkpoint at or before step {decision.target_step} ({decision.reason})"
        return core.on_failed(pending, error=error, now_s=now), {}

    def _run_fast(self, decision: core.RollbackDecision) -> _Outcome:
        attempt = core.start(decision, now_s=self._clock())
        self._cache, step, snapshot = core.nearest(self._cache, decision.target_step)
        assert step is not None, "decide() chose FAST without a cached snapshot"
        assert snapshot is not None
        try:
            extra = restore(
                snapshot, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler
            )
        except (ValueError, RuntimeError, TypeError) as error:
            logger.exception("restoring the snapshot of step %d failed", step)
            return core.on_failed(attempt, error=f"{type(error).__name__}: {error}", now_s=self._clock()), {}
        return core.on_restored(attempt, step=step, now_s=self._clock()), extra

    def _ensure_worker(self) -> AsyncWorker:
        if self._worker is None:
            self._worker = AsyncWorker(max_concurrency=1, name="tolaria-rollback")
            self._owns_worker = True
        return self._worker

    def _stage(
        self, directory: Path, target_step: int, *, cancel: CancelToken
    ) -> tuple[CheckpointInfo, dict[str, Any]]:
        """Load a checkpoint into new CPU tensors on the worker; the live objects are not touched."""
        return self._loader(directory, at_or_before=target_step, cancel=cancel, telemetry=self.telemetry)

    def _submit_load(self, target_step: int, timeout_s: float) -> TaskHandle[tuple[CheckpointInfo, dict[str, Any]]]:
        assert self.checkpoint_dir is not None, "decide() chose FULL without a checkpoint folder"
        return self._ensure_worker().submit(
            self._stage, self.checkpoint_dir, target_step, timeout=timeout_s, name=f"rollback-load-{target_step}"
        )

    def _run_full(self, decision: core.RollbackDecision, reason: str, budget: float) -> _Outcome:
        now = self._clock()
        attempt = core.start(decision, now_s=now)
        remaining = core.remaining_s(attempt, now_s=now)
        if remaining <= 0.0:
            return self._missed_deadline(core.on_tick(attempt, now_s=now), reason, budget), {}
        try:
            handle = self._submit_load(decision.target_step, remaining)
        except (WorkerSaturated, WorkerClosed) as error:
            logger.error("cannot start the checkpoint load for step %d: %s", decision.target_step, error)
            return core.on_failed(attempt, error=f"{type(error).__name__}: {error}", now_s=self._clock()), {}
        try:
            info, state = handle.result()
        except TaskTimeout:
            handle.cancel()
            # The worker releases us at the deadline; max() keeps a caller-supplied clock consistent with it.
            expired = core.on_tick(attempt, now_s=max(self._clock(), decision.deadline_s))
            return self._missed_deadline(expired, reason, budget), {}
        except Exception as error:
            # Any loader failure becomes a FAILED result that is logged, counted and emitted.
            logger.exception("loading a checkpoint at or before step %d failed", decision.target_step)
            return core.on_failed(attempt, error=f"{type(error).__name__}: {error}", now_s=self._clock()), {}

        loaded_at = self._clock()
        attempt = core.on_tick(attempt, now_s=loaded_at)
        if attempt.status is AttemptStatus.DEADLINE_EXCEEDED:
            return self._missed_deadline(attempt, reason, budget), {}
        return self._apply_checkpoint(attempt, info, state, loaded_at)

    def _apply_checkpoint(
        self, attempt: RestoreAttempt, info: CheckpointInfo, state: dict[str, Any], loaded_at: float
    ) -> _Outcome:
        """Write a staged checkpoint into the live objects, on the calling thread."""
        try:
            restored = restore_training_state(
                state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler
            )
        except (ValueError, RuntimeError, KeyError, TypeError) as error:
            logger.exception("applying checkpoint %s failed", info.manifest_path)
            return core.on_failed(attempt, error=f"{type(error).__name__}: {error}", now_s=self._clock()), {}
        for parameter in self.model.parameters():
            parameter.grad = None
        return core.on_restored(attempt, step=info.step, now_s=loaded_at), restored.extra

    def _missed_deadline(self, attempt: RestoreAttempt, reason: str, budget: float) -> RestoreAttempt:
        decision = attempt.decision
        signal = DeadlineSignal(
            target_step=decision.target_step,
            tier=decision.tier,
            deadline_s=budget,
            monotonic_s=time.monotonic(),
            wall_time_s=time.time(),
            reason=reason,
        )
        self._deadline_signal = signal
        report_deadline(self.telemetry, attempt, signal)
        self._call_deadline_hook(signal)
        return attempt

    def _call_deadline_hook(self, signal: DeadlineSignal) -> None:
        if self.on_deadline_exceeded is None:
            return
        try:
            self.on_deadline_exceeded(signal)
        except Exception as error:
            # A failing callback must not hide the missed deadline from the caller.
            logger.exception("on_deadline_exceeded callback failed")
            self.telemetry.count("tolaria.rollback.hook_failures")
            self.telemetry.event(
                "tolaria.rollback.hook_failed", Level.ERROR, error=type(error).__name__, reason=str(error)
            )

    def _finish(self, attempt: RestoreAttempt, extra: Mapping[str, Any], reason: str, started: float) -> RollbackResult:
        latency_ms = (self._clock() - started) * 1000.0
        self.telemetry.metric("tolaria.rollback.latency_ms", latency_ms, "ms")
        if attempt.status is AttemptStatus.RESTORED and attempt.restored_step is not None:
            report_success(self.telemetry, attempt, reason, latency_ms)
            before = self._cache
            self._cache, dropped = core.discard_newer(before, attempt.restored_step)
            self._release(before, dropped)
        elif attempt.status is AttemptStatus.FAILED:
            report_failure(self.telemetry, attempt, reason, latency_ms)
        decision = attempt.decision
        return RollbackResult(
            tier=decision.tier,
            status=attempt.status,
            target_step=decision.target_step,
            restored_step=attempt.restored_step,
            latency_ms=latency_ms,
            hit=decision.tier is Tier.FAST and attempt.status is AttemptStatus.RESTORED,
            error=attempt.error,
            reason=reason,
            extra=extra,
        )

    # -- lifecycle --------------------------------------------------------------------

    def close(self) -> None:
        """Drop the snapshots and shut down the worker if this manager started it."""
        self.discard_snapshots()
        if self._owns_worker and self._worker is not None:
            self._worker.shutdown(timeout=1.0)
            self._worker = None
            self._owns_worker = False

    def __enter__(self) -> RollbackManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
