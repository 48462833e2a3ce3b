"""The catalog of every metric and event name tolaria emits, and the generator of ``docs/telemetry.md``.

Each name is declared once, with its kind (counter, gauge, histogram or event), unit,
level and a one-line description. A name may be declared both as a metric and as an
event, because some things are counted and also reported one by one
(``tolaria.anomaly.nonfinite``). Metrics and events are therefore kept in separate tables.

Regenerate the documentation after changing the catalog::

    python -m tolaria.telemetry.catalog > docs/telemetry.md

The catalog is checked when the module is imported: a duplicate name, an unknown kind,
or a counter name ending in ``_total`` raises ``ValueError``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from tolaria.telemetry.records import Level
from tolaria.telemetry.reference import CatalogEntry, render_reference

__all__ = [
    "EVENTS",
    "KINDS",
    "METRICS",
    "CatalogEntry",
    "all_names",
    "lookup_event",
    "lookup_metric",
    "main",
    "render_markdown",
    "undeclared",
]

KINDS = ("counter", "gauge", "histogram", "event")
"""Kinds of catalog entries. Counters are running totals; gauges are values at one moment
(often a mean over the epoch); histograms are samples of a distribution, one per occurrence."""


def _metric(name: str, kind: str, unit: str, description: str, attributes: str = "") -> CatalogEntry:
    """Declare a metric; ``attributes`` lists its attribute names separated by spaces."""
    return CatalogEntry(name, kind, unit, Level.INFO, description, tuple(attributes.split()))


def _event(name: str, level: Level, description: str, attributes: str = "") -> CatalogEntry:
    """Declare an event; ``attributes`` lists its attribute names separated by spaces."""
    return CatalogEntry(name, "event", "", level, description, tuple(attributes.split()))


_METRICS: Sequence[CatalogEntry] = (
    # Training progress, one value per epoch.
    _metric("tolaria.train.loss", "gauge", "1", "Mean training loss of one objective over the epoch.", "objective"),
    _metric("tolaria.val.loss", "gauge", "1", "Mean validation loss of one objective after the epoch.", "objective"),
    _metric("tolaria.val.accuracy", "gauge", "1", "Validation accuracy of one objective, from 0 to 1.", "objective"),
    _metric("tolaria.train.throughput", "gauge", "samples/s", "Training samples processed per second in the epoch."),
    _metric(
        "tolaria.train.skipped_steps",
        "gauge",
        "1",
        "Updates skipped in the epoch because of non-finite values, fp16 GradScaler overflows included.",
    ),
    _metric("tolaria.train.epoch_ms", "gauge", "ms", "Wall-clock time of the epoch, validation included."),
    _metric(
        "tolaria.gradients.batched_fallbacks",
        "counter",
        "1",
        "Times the batched per-objective backward failed and the loop method took over.",
    ),
    _metric("tolaria.rollback.skipped_batches", "counter", "1", "Batches skipped after rollbacks."),
    _metric(
        "tolaria.command.remote_failures",
        "counter",
        "1",
        "Commands that rank 0 applied but another rank could not apply.",
    ),
    _metric("tolaria.optim.lr", "gauge", "1", "Learning rate of one parameter group after the epoch.", "group"),
    # Gradient aggregation, means over the steps of the epoch.
    _metric(
        "tolaria.grad_agg.conflict_ratio", "gauge", "1", "Mean fraction of objective pairs with conflicting gradients."
    ),
    _metric("tolaria.grad_agg.conflicts", "gauge", "1", "Mean number of conflicting objective pairs per step."),
    _metric("tolaria.grad_agg.cosine_min", "gauge", "1", "Mean of the smallest pairwise gradient cosine per step."),
    _metric("tolaria.grad_agg.latency_ms", "gauge", "ms", "Mean time spent aggregating gradients per step."),
    # Controller calls and the shared worker.
    _metric("tolaria.timeout.tamiyo", "counter", "1", "Controller (Tamiyo) calls that timed out."),
    _metric("tolaria.timeout.kasmina", "counter", "1", "Executor (Kasmina) calls that timed out."),
    _metric(
        "tolaria.worker.abandoned",
        "counter",
        "1",
        "Timed-out thread tasks left running because they ignore cancellation.",
    ),
    _metric("tolaria.worker.cancelled", "counter", "1", "Tasks the worker cancelled."),
    _metric("tolaria.worker.late_failures", "counter", "1", "Abandoned tasks that raised after their deadline."),
    _metric("tolaria.worker.process_restarts", "counter", "1", "Worker processes killed at a deadline and replaced."),
    _metric("tolaria.worker.spawn_failures", "counter", "1", "Worker processes that failed to start."),
    _metric("tolaria.worker.in_flight", "gauge", "1", "Tasks running on the shared worker after the epoch."),
    _metric("tolaria.worker.queue_depth", "gauge", "1", "Tasks waiting for the shared worker after the epoch."),
    _metric("tolaria.worker.still_cancelling", "gauge", "1", "Cancelled coroutines that have not finished yet."),
    _metric(
        "tolaria.worker.abandoned_running",
        "gauge",
        "1",
        "Abandoned threads still running after their deadline; each holds a concurrency slot.",
    ),
    _metric("tolaria.worker.lateness_p99_ms", "gauge", "ms", "99th percentile of caller lateness after a deadline."),
    _metric("tolaria.control.tamiyo.latency_ms", "histogram", "ms", "Time taken by one controller (Tamiyo) call."),
    _metric("tolaria.control.kasmina.latency_ms", "histogram", "ms", "Time taken by one executor (Kasmina) call."),
    _metric("tolaria.control.tamiyo.successes", "counter", "1", "Controller (Tamiyo) calls that returned a command."),
    _metric("tolaria.control.kasmina.successes", "counter", "1", "Executor (Kasmina) calls that applied a command."),
    _metric("tolaria.control.tamiyo.failures", "counter", "1", "Controller (Tamiyo) calls that raised or timed out."),
    _metric("tolaria.control.kasmina.failures", "counter", "1", "Executor (Kasmina) calls that raised or timed out."),
    _metric("tolaria.control.conservative_epochs", "counter", "1", "Epochs spent in conservative mode."),
    _metric("tolaria.breaker.tamiyo.opened", "counter", "1", "Times the controller (Tamiyo) circuit breaker opened."),
    _metric("tolaria.breaker.kasmina.opened", "counter", "1", "Times the executor (Kasmina) circuit breaker opened."),
    _metric("tolaria.command.applied", "counter", "1", "Adaptation commands applied."),
    _metric("tolaria.command.rejected", "counter", "1", "Adaptation commands rejected."),
    # Safety.
    _metric(
        "tolaria.emergency.level",
        "gauge",
        "1",
        "Emergency level: 0 NOMINAL, 1 NOTICE, 2 ELEVATED, 3 CONSERVATIVE, 4 HALT.",
    ),
    _metric("tolaria.emergency.max_level", "gauge", "1", "Highest emergency level reached in the epoch."),
    _metric("tolaria.emergency.escalation_count", "gauge", "1", "Escalations since the start of the run."),
    _metric("tolaria.emergency.escalations", "counter", "1", "Times the emergency level rose."),
    _metric("tolaria.emergency.deescalations", "counter", "1", "Times the emergency level fell."),
    _metric("tolaria.emergency.resets", "counter", "1", "Times the emergency level was reset."),
    _metric("tolaria.emergency.broadcasts", "counter", "1", "Level changes sent to the emergency listeners."),
    _metric(
        "tolaria.emergency.broadcast_failures", "counter", "1", "Emergency listener calls that raised or timed out."
    ),
    _metric(
        "tolaria.emergency.broadcast_latency_ms", "histogram", "ms", "Time taken to notify the listeners of one change."
    ),
    _metric("tolaria.anomaly.nonfinite", "counter", "1", "Steps skipped because a loss or gradient was not finite."),
    _metric("tolaria.anomaly.spike", "counter", "1", "Steps whose loss the monitor flagged as a spike."),
    _metric(
        "tolaria.amp.overflows", "counter", "1", "Steps whose update the fp16 GradScaler skipped after an overflow."
    ),
    # Rollback and checkpoints.
    _metric(
        "tolaria.rollback.latency_ms", "histogram", "ms", "Time taken by one rollback, from start to restored state."
    ),
    _metric("tolaria.rollback.snapshot_ms", "histogram", "ms", "Time taken to take one in-memory snapshot."),
    _metric("tolaria.rollback.cache_bytes", "gauge", "B", "Bytes held by the in-memory snapshot cache."),
    _metric("tolaria.rollback.snapshots", "counter", "1", "In-memory snapshots taken."),
    _metric("tolaria.rollback.evictions", "counter", "1", "Snapshots evicted from the cache to make room."),
    _metric("tolaria.rollback.fast_hits", "counter", "1", "Rollbacks served from an in-memory snapshot."),
    _metric("tolaria.rollback.full_restores", "counter", "1", "Rollbacks served from an on-disk checkpoint."),
    _metric("tolaria.rollback.failures", "counter", "1", "Rollbacks that failed."),
    _metric(
        "tolaria.rollback.deadline_exceeded", "counter", "1", "Rollbacks that did not finish before their deadline."
    ),
    _metric("tolaria.rollback.hook_failures", "counter", "1", "Rollback hooks that raised."),
    _metric("tolaria.checkpoint.saved", "counter", "1", "Checkpoints committed."),
    _metric("tolaria.checkpoint.save_ms", "histogram", "ms", "Time taken to write, fsync and commit one checkpoint."),
    _metric("tolaria.checkpoint.bytes", "histogram", "B", "Size of one committed checkpoint."),
    _metric("tolaria.checkpoint.save_failures", "counter", "1", "Checkpoint saves that failed."),
    _metric("tolaria.checkpoint.bad", "counter", "1", "Checkpoints that failed verification on load."),
    _metric(
        "tolaria.checkpoint.cleanup_failures",
        "counter",
        "1",
        "Old checkpoints or temporary files that could not be removed.",
    ),
    # Profiling.
    _metric("tolaria.profiler.traces_written", "counter", "1", "Profiler traces written."),
    _metric("tolaria.profiler.trace_bytes", "histogram", "B", "Size of one written profiler trace."),
    _metric("tolaria.profiler.export_failures", "counter", "1", "Profiler traces that could not be written."),
    # The telemetry pipeline itself.
    _metric(
        "tolaria.telemetry.dropped", "counter", "1", "Telemetry records (events and metrics) dropped under pressure."
    ),
    _metric("tolaria.telemetry.sink_failures", "counter", "1", "Failed attempts to write or close a telemetry sink."),
)

_EVENTS: Sequence[CatalogEntry] = (
    # Run lifecycle.
    _event("tolaria.run.started", Level.INFO, "Training started.", "epochs aggregator device seed"),
    _event("tolaria.run.finished", Level.INFO, "Training finished.", "epoch step"),
    _event("tolaria.run.failed", Level.ERROR, "Training stopped on an exception.", "reason error message epoch step"),
    _event("tolaria.run.halted", Level.CRITICAL, "The emergency level reached HALT; training stopped.", "reason step"),
    _event(
        "tolaria.checkpoint.world_size_changed",
        Level.WARNING,
        "A checkpoint was resumed by a different number of ranks than wrote it.",
        "reason saved_world_size world_size",
    ),
    _event("tolaria.run.resumed", Level.INFO, "Training resumed from a checkpoint.", "source epoch batch global_step"),
    _event(
        "tolaria.rollback.batch_skipped",
        Level.INFO,
        "A batch was skipped after a rollback.",
        "reason epoch batch step",
    ),
    _event(
        "tolaria.command.remote_failed",
        Level.CRITICAL,
        "A rank other than 0 could not apply the command rank 0 applied.",
        "reason error message rank",
    ),
    _event(
        "tolaria.gradients.batched_fallback",
        Level.WARNING,
        "The batched backward failed; gradients are computed with one backward per objective.",
        "reason error message",
    ),
    # Controller, executor and the shared worker.
    _event(
        "timeout_inference",
        Level.WARNING,
        "A controller (Tamiyo) call timed out or failed.",
        "task timeout_s elapsed_s error status reason epoch",
    ),
    _event(
        "tolaria.command.failed",
        Level.WARNING,
        "An executor (Kasmina) call timed out or failed.",
        "task timeout_s elapsed_s error status reason epoch",
    ),
    _event(
        "tolaria.breaker.changed",
        Level.WARNING,
        "A circuit breaker changed phase; WARNING when it opens, INFO otherwise.",
        "client previous phase reason epoch",
    ),
    _event("tolaria.timeout.cancelled", Level.INFO, "The worker cancelled a task.", "task kind cause state timeout_s"),
    _event(
        "tolaria.worker.late_failure",
        Level.WARNING,
        "An abandoned task raised after its deadline.",
        "task kind error reason",
    ),
    _event("tolaria.worker.spawn_failed", Level.ERROR, "A worker process failed to start.", "worker error reason"),
    _event("tolaria.command.applied", Level.INFO, "An adaptation command was applied.", "command_id kind"),
    _event(
        "tolaria.command.rejected",
        Level.WARNING,
        "An adaptation command was rejected; nothing was applied.",
        "command_id kind reason",
    ),
    _event(
        "tolaria.conservative_mode.entered", Level.WARNING, "Training stopped applying adaptation commands.", "reason"
    ),
    _event("tolaria.conservative_mode.exited", Level.INFO, "Training applies adaptation commands again.", "reason"),
    # Emergency levels and anomalies.
    _event(
        "tolaria.emergency.escalated",
        Level.WARNING,
        "The emergency level rose; the event level follows the new level (INFO to CRITICAL).",
        "previous level reason step",
    ),
    _event(
        "tolaria.emergency.deescalated",
        Level.INFO,
        "The emergency level fell after its cooldown.",
        "previous level reason step",
    ),
    _event("tolaria.emergency.reset", Level.WARNING, "The emergency level was reset.", "previous level reason step"),
    _event(
        "tolaria.emergency.broadcast_failed",
        Level.CRITICAL,
        "An emergency listener raised or timed out.",
        "listener error",
    ),
    _event(
        "tolaria.anomaly.nonfinite",
        Level.WARNING,
        "A loss or gradient was not finite; the update was skipped.",
        "reason epoch step",
    ),
    _event("tolaria.anomaly.spike", Level.WARNING, "A loss spike was detected.", "step"),
    _event(
        "tolaria.amp.overflow",
        Level.INFO,
        "The fp16 GradScaler found non-finite scaled gradients, skipped the update and lowered its scale.",
        "reason epoch step",
    ),
    # Rollback, checkpoints and profiling.
    _event(
        "tolaria.rollback.started",
        Level.INFO,
        "A rollback to an earlier step started.",
        "reason target_step tier source_step deadline_s",
    ),
    _event(
        "tolaria.rollback.completed",
        Level.INFO,
        "A rollback restored an earlier step.",
        "reason target_step restored_step tier latency_ms",
    ),
    _event(
        "tolaria.rollback.failed",
        Level.ERROR,
        "A rollback failed; the live model was not changed.",
        "reason target_step tier error elapsed_ms",
    ),
    _event(
        "tolaria.rollback.deadline_exceeded",
        Level.ERROR,
        "A rollback did not finish before its deadline; the live model was not changed.",
        "reason target_step tier deadline_s error",
    ),
    _event("tolaria.rollback.hook_failed", Level.ERROR, "A rollback hook raised.", "error reason"),
    _event(
        "tolaria.checkpoint.save_failed",
        Level.ERROR,
        "A checkpoint save failed; the previous one is kept.",
        "path step error reason",
    ),
    _event(
        "tolaria.checkpoint.fallback",
        Level.WARNING,
        "A checkpoint failed verification; an older one is used.",
        "path manifest error reason",
    ),
    _event(
        "tolaria.checkpoint.cleanup_failed",
        Level.WARNING,
        "An old checkpoint or temporary file could not be removed.",
        "path reason",
    ),
    _event(
        "tolaria.profiler.export_failed", Level.ERROR, "A profiler trace could not be written.", "path error reason"
    ),
    _event("tolaria.profiler.trace_written", Level.INFO, "A profiler trace was written.", "path bytes"),
    _event(
        "tolaria.profiler.trace_large",
        Level.WARNING,
        "A profiler trace is larger than the configured warning size.",
        "path bytes limit_bytes",
    ),
    # The telemetry pipeline itself.
    _event(
        "tolaria.telemetry.sink_failed",
        Level.ERROR,
        "A telemetry sink raised; writes are retried with back-off.",
        "sink operation error message",
    ),
    _event(
        "tolaria.telemetry.sink_recovered",
        Level.INFO,
        "A failing telemetry sink accepted a packet again.",
        "sink failures downtime_s",
    ),
    _event(
        "tolaria.telemetry.drop_summary",
        Level.WARNING,
        "Telemetry records were dropped since the last packet.",
        "dropped reasons",
    ),
)


def _index(entries: Iterable[CatalogEntry], *, metrics: bool) -> Mapping[str, CatalogEntry]:
    """Check ``entries`` and index them by name.

    Raises:
        ValueError: a duplicate name, a kind that does not belong in the table, or a
            counter whose name ends in ``_total``.
    """
    allowed = KINDS[:3] if metrics else ("event",)
    index: dict[str, CatalogEntry] = {}
    for entry in entries:
        if entry.name in index:
            raise ValueError(f"catalog declares {entry.name!r} twice")
        if entry.kind not in allowed:
            raise ValueError(f"catalog entry {entry.name!r} has kind {entry.kind!r}; expected one of {allowed}")
        if entry.kind == "counter" and entry.name.endswith("_total"):
            raise ValueError(f"counter {entry.name!r} must not end in '_total'; exporters add that suffix")
        index[entry.name] = entry
    return MappingProxyType(index)


METRICS: Mapping[str, CatalogEntry] = _index(_METRICS, metrics=True)
"""Declared metrics (counters, gauges and histograms) by name."""

EVENTS: Mapping[str, CatalogEntry] = _index(_EVENTS, metrics=False)
"""Declared events by name."""


def lookup_metric(name: str) -> CatalogEntry | None:
    """Return the metric declaration of ``name``, or ``None`` when it is not declared."""
    return METRICS.get(name)


def lookup_event(name: str) -> CatalogEntry | None:
    """Return the event declaration of ``name``, or ``None`` when it is not declared."""
    return EVENTS.get(name)


def all_names() -> frozenset[str]:
    """Return every declared metric and event name."""
    return frozenset(METRICS) | frozenset(EVENTS)


def undeclared(names: Iterable[str]) -> set[str]:
    """Return the names in ``names`` that the catalog declares neither as a metric nor as an event."""
    return {name for name in names if name not in METRICS and name not in EVENTS}


def render_markdown() -> str:
    """Return the text of ``docs/telemetry.md``, generated from the catalog."""
    return render_reference(METRICS.values(), EVENTS.values())


def main() -> int:
    """Write ``render_markdown()`` to standard output and return the exit code 0."""
    sys.stdout.write(render_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
