"""``TrainingLoop``: epochs and steps from any position, with rollback and halting.

The loop runs from a ``Position`` (epoch, batch index, global step), so the same
code serves a fresh run, a resumed run and the continuation after a rollback. Per
batch, in order:

1. skip the batch if a rollback asked for batches to be skipped;
2. ``SafetyGuard.before_step`` (snapshot when due);
3. ``StepRunner.run`` (forward, per-objective backward, aggregation, update);
4. ``SafetyGuard.after_step``: continue, roll back (restart from the restored
   position), or halt;
5. step callbacks, then a checkpoint every ``checkpoint.every_steps`` steps.

At the end of an epoch: the learning-rate scheduler, validation, the control loop
(``EpochControl``), the telemetry packet, the epoch callbacks and the epoch checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from tolaria.epoch import Accuracy, EpochAccumulator, evaluate, progress
from tolaria.results import EpochMetrics
from tolaria.safety import CONTINUE, Position, SafetyDecision, SafetyGuard
from tolaria.step import StepOutcome, StepRunner
from tolaria.telemetry import Level, Telemetry

__all__ = ["EpochEnd", "LoopResult", "StepRecord", "TrainingLoop"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One executed step, passed to step callbacks.

    Attributes:
        epoch: epoch index.
        batch: batch index within the epoch.
        global_step: optimizer steps applied before this step.
        losses: ``[n]`` float32 losses on the device, detached.
        applied: whether the optimizer stepped.
    """

    epoch: int
    batch: int
    global_step: int
    losses: torch.Tensor
    applied: bool


@dataclasses.dataclass(frozen=True)
class LoopResult:
    """The result of ``TrainingLoop.run``.

    Attributes:
        epochs: metrics of each completed epoch.
        position: where the loop stopped.
        halted: whether the emergency controller stopped training.
        halt_reason: why it halted.
    """

    epochs: tuple[EpochMetrics, ...]
    position: Position
    halted: bool = False
    halt_reason: str | None = None


@dataclasses.dataclass
class _EpochRun:
    """Mutable bookkeeping of one pass over an epoch's batches."""

    position: Position
    skip: int
    started: float
    accumulator: EpochAccumulator | None = None
    decision: SafetyDecision = CONTINUE
    batches_seen: int = 0
    skip_through: tuple[int, int] = (-1, -1)


EpochEnd = Callable[[EpochMetrics], str | None]
"""Called with each completed epoch's metrics; returns a reason to halt, or ``None``."""


class TrainingLoop:
    """Runs epochs of ``StepRunner`` steps under a ``SafetyGuard``.

    Args:
        runner: runs one step.
        train_data: iterable of batches; ``set_epoch`` is called when it exists.
        epochs: total number of epochs of the run.
        guard: snapshots, emergency evaluation and rollback; ``None`` disables them.
        telemetry: where events go.
        validate: returns ``(val_loss, val_accuracy)`` at each epoch end.
        at_epoch_end: called with each epoch's metrics to run the control loop, the
            telemetry packet, the callbacks and the checkpoint (see ``Trainer``). It
            returns a reason to halt, for example when controller timeouts raised the
            level to HALT, or ``None``.
        step_callbacks: called after every executed step.
        checkpoint_steps: called with the position after a step when
            ``checkpoint.every_steps`` says so; ``None`` disables.
        progress_bar: draw a tqdm bar per epoch.
        combine_ranks: under ``torch.distributed``, sums a tensor over all ranks, so
            epoch metrics cover every rank's data; ``None`` in a single process.
        world_size: number of ranks ``combine_ranks`` sums over.
    """

    def __init__(
        self,
        runner: StepRunner,
        train_data: Iterable[Any],
        *,
        epochs: int,
        guard: SafetyGuard | None,
        telemetry: Telemetry,
        validate: Callable[[], tuple[dict[str, float], dict[str, float]]],
        learning_rates: Callable[[], tuple[float, ...]],
        at_epoch_end: EpochEnd,
        step_callbacks: Sequence[Callable[[StepRecord], None]] = (),
        checkpoint_steps: Callable[[Position], None] | None = None,
        scheduler_step: Callable[[], None] | None = None,
        progress_bar: bool = False,
        restore_monitor: Callable[[Mapping[str, Any]], None] | None = None,
        after_rollback: Callable[[Position], None] | None = None,
        combine_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
        world_size: int = 1,
    ) -> None:
        self.runner = runner
        self.train_data = train_data
        self.epochs = epochs
        self.guard = guard
        self.telemetry = telemetry
        self._validate = validate
        self._learning_rates = learning_rates
        self._at_epoch_end = at_epoch_end
        self._step_callbacks = tuple(step_callbacks)
        self._checkpoint_steps = checkpoint_steps
        self._scheduler_step = scheduler_step
        self._progress_bar = progress_bar
        self._restore_monitor = restore_monitor
        self._after_rollback = after_rollback
        self._combine_ranks = combine_ranks
        self._world_size = world_size

    def run(self, start: Position) -> LoopResult:
        """Train from ``start`` until the last epoch ends or the guard halts."""
        position, skip, through = start, 0, (-1, -1)
        completed: list[EpochMetrics] = []
        while position.epoch < self.epochs:
            run = self._run_batches(position, skip, through)
            if run.decision.halt:
                return LoopResult(tuple(completed), run.position, halted=True, halt_reason=run.decision.reason)
            if run.decision.resume_at is not None:
                position, skip = self._resume_after_rollback(run.decision)
                # Never replay the batch that triggered the rollback (nor those before it).
                through = (run.position.epoch, run.position.batch - 1)
                continue
            metrics = self._finish_epoch(run)
            # A rollback into an earlier epoch runs it again; its new metrics replace the old.
            completed = [earlier for earlier in completed if earlier.epoch < metrics.epoch]
            completed.append(metrics)
            halt_reason = self._at_epoch_end(metrics)
            position = Position(position.epoch + 1, 0, run.position.global_step)
            skip, through = run.skip, run.skip_through
            if halt_reason is not None:
                return LoopResult(tuple(completed), position, halted=True, halt_reason=halt_reason)
        return LoopResult(tuple(completed), position)

    def _resume_after_rollback(self, decision: SafetyDecision) -> tuple[Position, int]:
        if self._restore_monitor is not None:
            self._restore_monitor(decision.restored_extra)
        position = decision.resume_at or Position(0, 0, 0)
        if self._after_rollback is not None:
            self._after_rollback(position)
        skip = self.guard.config.skip_batches if self.guard is not None else 0
        return position, skip

    def _batches(self, epoch: int) -> Iterable[Any]:
        set_epoch = getattr(self.train_data, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        total = len(self.train_data) if hasattr(self.train_data, "__len__") else None  # type: ignore[arg-type]
        return progress(self.train_data, enabled=self._progress_bar, epoch=epoch, total=total)

    def _run_batches(self, start: Position, skip: int, through: tuple[int, int]) -> _EpochRun:
        run = _EpochRun(position=start, skip=skip, started=time.perf_counter(), skip_through=through)
        for index, batch in enumerate(self._batches(start.epoch)):
            run.batches_seen += 1
            if index < start.batch:
                continue
            run.position = Position(start.epoch, index, run.position.global_step)
            if run.skip > 0 or (start.epoch, index) <= run.skip_through:
                run.skip = max(run.skip - 1, 0)
                self._report_skipped_batch(run.position)
                continue
            self._run_one(batch, run)
            if run.decision.halt or run.decision.resume_at is not None:
                return run
        run.position = Position(start.epoch, run.position.batch + 1, run.position.global_step)
        return run

    def _run_one(self, batch: Any, run: _EpochRun) -> None:
        here = run.position
        if self.guard is not None:
            self.guard.before_step(here)
        outcome = self.runner.run(batch, here.global_step)
        if run.accumulator is None:
            run.accumulator = EpochAccumulator(outcome.losses.shape[0], outcome.losses.device)
        run.accumulator.add(outcome)
        after = Position(here.epoch, here.batch + 1, here.global_step + int(outcome.applied))
        if not outcome.applied:
            self._report_skipped_step(outcome, here)
        if self.guard is not None:
            run.decision = self.guard.after_step(outcome, here)
        run.position = after
        record = StepRecord(here.epoch, here.batch, here.global_step, outcome.losses, outcome.applied)
        for callback in self._step_callbacks:
            callback(record)
        if self._checkpoint_steps is not None and not run.decision.halt and run.decision.resume_at is None:
            self._checkpoint_steps(after)

    def _finish_epoch(self, run: _EpochRun) -> EpochMetrics:
        epoch = run.position.epoch
        train_seconds = time.perf_counter() - run.started
        if run.batches_seen == 0:
            raise ValueError(f"train_data yielded no batches in epoch {epoch}; expected at least one")
        if self._scheduler_step is not None:
            with warnings.catch_warnings():
                if run.accumulator is None:
                    # A process resumed after the epoch's last batch has not stepped the optimizer,
                    # so torch warns; the restored scheduler state is correct.
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                self._scheduler_step()
        val_loss, val_accuracy = self._validate()
        # No step may have run in this pass: the skipped batches used up the epoch, or the run
        # resumed after the epoch's last batch (validation has then named the objectives).
        names = self.runner.objective_names or ()
        accumulator = run.accumulator or EpochAccumulator(len(names), self.runner.device)
        if self._combine_ranks is not None:
            accumulator.combine_ranks(self._combine_ranks, self._world_size)
        return EpochMetrics(
            epoch=epoch,
            global_step=run.position.global_step,
            train_loss=accumulator.train_loss(names),
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            aggregation=accumulator.aggregation(),
            learning_rates=self._learning_rates(),
            samples_per_s=accumulator.samples / train_seconds if train_seconds > 0 else 0.0,
            skipped_steps=accumulator.skipped_steps,
            wall_time_s=time.perf_counter() - run.started,
        )

    def _report_skipped_step(self, outcome: StepOutcome, position: Position) -> None:
        if outcome.scaler_skipped:
            self._report_scaler_skip(position)
            return
        what = "loss" if outcome.nonfinite_loss else "gradient"
        logger.warning(
            "skipped the update at epoch %d, step %d: non-finite %s", position.epoch, position.global_step, what
        )
        self.telemetry.count("tolaria.anomaly.nonfinite")
        self.telemetry.event(
            "tolaria.anomaly.nonfinite",
            Level.WARNING,
            reason=f"non-finite {what}; update skipped",
            epoch=position.epoch,
            step=position.global_step,
        )

    def _report_scaler_skip(self, position: Position) -> None:
        # Routine while the GradScaler looks for its scale, so INFO rather than an anomaly.
        logger.info(
            "the gradient scaler skipped the update at epoch %d, step %d: the scaled fp16 gradients overflowed, "
            "so it lowered its scale",
            position.epoch,
            position.global_step,
        )
        self.telemetry.count("tolaria.amp.overflows")
        self.telemetry.event(
            "tolaria.amp.overflow",
            Level.INFO,
            reason="scaled gradients not finite; GradScaler skipped the update and lowered its scale",
            epoch=position.epoch,
            step=position.global_step,
        )

    def _report_skipped_batch(self, position: Position) -> None:
        if self.guard is not None:
            self.guard.skipped_batches += 1
        self.telemetry.count("tolaria.rollback.skipped_batches")
        self.telemetry.event(
            "tolaria.rollback.batch_skipped",
            Level.INFO,
            reason="skipped after a rollback",
            epoch=position.epoch,
            batch=position.batch,
            step=position.global_step,
        )


def evaluate_with(runner: StepRunner, data: Iterable[Any] | None, accuracy: Accuracy | None) -> Callable[
    [], tuple[dict[str, float], dict[str, float]]
]:
    """Return a validation callable for ``TrainingLoop`` (empty results without data)."""

    def validate() -> tuple[dict[str, float], dict[str, float]]:
        if data is None:
            return {}, {}
        return evaluate(runner, data, accuracy)

    return validate


def monitor_extra(runner: StepRunner) -> Mapping[str, Any]:
    """Return the loss monitor state to save with a snapshot (nothing before the first step)."""
    return {} if runner.monitor_state is None else {"loss_monitor": runner.monitor_state}
