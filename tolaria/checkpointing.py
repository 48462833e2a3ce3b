"""``CheckpointKeeper``: when the trainer writes checkpoints, and how it resumes from one.

A checkpoint contains the model, optimizer, scheduler, gradient scaler, RNG states, the
data position (epoch, batch index, global step) and the loss monitor state, plus what
the trainer adds: the emergency state, the controller's state and the telemetry
sequence numbers. Resuming restores all of them, so a run resumed from step k takes
bit-identical steps to an uninterrupted run on the CPU, provided the training data's
order depends only on the epoch (``tolaria.data.EpochBatches`` or a loader with
``set_epoch``).

Under ``torch.distributed`` only rank 0 writes, and every rank waits until the
checkpoint is committed (``tolaria.distributed.save_on_main``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tolaria import checkpoint
from tolaria.distributed import DistributedContext, is_main_process, save_on_main
from tolaria.distributed.errors import collective_guard
from tolaria.functional import anomaly
from tolaria.safety import Position
from tolaria.settings import CheckpointConfig
from tolaria.telemetry import Level, Telemetry

__all__ = ["CheckpointKeeper", "TrainingObjects", "apply_extra", "capture_state", "restore_state"]

logger = logging.getLogger(__name__)


class TrainingObjects:
    """The live objects a checkpoint captures and restores."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        scaler: Any | None,
        monitor: Callable[[], anomaly.LossMonitorState | None],
        set_monitor: Callable[[anomaly.LossMonitorState], None],
        loss_monitor_config: anomaly.LossMonitorConfig,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.monitor = monitor
        self.set_monitor = set_monitor
        self.loss_monitor_config = loss_monitor_config


def _monitor_to_extra(state: anomaly.LossMonitorState | None) -> dict[str, Any]:
    if state is None:
        return {}
    return {"loss_monitor": {"history": state.history, "count": state.count, "scalar": state.scalar}}


def _monitor_from_extra(
    extra: Mapping[str, Any], config: anomaly.LossMonitorConfig
) -> anomaly.LossMonitorState | None:
    saved = extra.get("loss_monitor")
    if not saved:
        return None
    return anomaly.LossMonitorState(
        history=saved["history"], count=saved["count"], config=config, scalar=bool(saved["scalar"])
    )


def capture_state(objects: TrainingObjects, position: Position, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Return the training state of ``objects`` at ``position``, as ``torch.save`` can store it.

    Tensors are shared with the live objects, as in ``Module.state_dict``: copy the
    result to keep it while training goes on.
    """
    return checkpoint.capture_training_state(
        step=position.global_step,
        model=objects.model,
        optimizer=objects.optimizer,
        scheduler=objects.scheduler,
        scaler=objects.scaler,
        extra={**position.to_extra(), **_monitor_to_extra(objects.monitor()), **extra},
    )


def restore_state(objects: TrainingObjects, state: Mapping[str, Any]) -> dict[str, Any]:
    """Copy ``state`` (from ``capture_state``) into ``objects`` and return its extra values."""
    restored = checkpoint.restore_training_state(
        state, model=objects.model, optimizer=objects.optimizer, scheduler=objects.scheduler, scaler=objects.scaler
    )
    return dict(restored.extra)


def apply_extra(objects: TrainingObjects, extra: Mapping[str, Any]) -> Position:
    """Restore the loss monitor from ``extra`` and return the position it records."""
    monitor = _monitor_from_extra(extra, objects.loss_monitor_config)
    if monitor is not None:
        objects.set_monitor(monitor)
    return Position.from_extra(extra)


class CheckpointKeeper:
    """Saves checkpoints on the configured schedule and resumes from them.

    Args:
        config: schedule and rotation.
        directory: checkpoint folder, usually ``out_dir/checkpoints``.
        objects: the live training objects.
        context: distributed context; only its rank 0 writes.
        telemetry: where checkpoint events go.
        state_extra: returns further values to save (telemetry sequence numbers).
    """

    def __init__(
        self,
        config: CheckpointConfig,
        directory: Path,
        objects: TrainingObjects,
        context: DistributedContext,
        telemetry: Telemetry,
        state_extra: Callable[[], Mapping[str, Any]] = dict,
    ) -> None:
        self.config = config
        self.directory = directory
        self.objects = objects
        self.context = context
        self.telemetry = telemetry
        self._state_extra = state_extra
        self.saved = 0

    def after_step(self, position: Position) -> None:
        """Save when ``every_steps`` divides the global step."""
        every = self.config.every_steps
        if every is not None and position.global_step > 0 and position.global_step % every == 0:
            self.save(position)

    def after_epoch(self, position: Position) -> None:
        """Save when ``every_epochs`` divides the number of completed epochs."""
        every = self.config.every_epochs
        if every is not None and position.epoch % every == 0:
            self.save(position)

    def save(self, position: Position, *, directory: Path | None = None) -> None:
        """Write a checkpoint of the live objects at ``position`` (rank 0 only; others wait).

        Raises:
            CheckpointError: the write failed; the previous checkpoints are intact.
        """
        target = directory or self.directory
        objects = self.objects
        extra = dict(self._state_extra())
        if is_main_process(self.context):
            extra = _count_own_save(extra)
        if self.context.is_distributed:
            # The model and optimizer are the same on every rank; the loss monitor and
            # telemetry counters are not, so each rank's copy is stored.
            extra["per_rank"] = self._gather({**_monitor_to_extra(objects.monitor()), **extra})

        def write() -> None:
            state = capture_state(objects, position, extra)
            checkpoint.save(
                target, state, step=position.global_step, keep_last=self.config.keep_last, telemetry=self.telemetry
            )

        save_on_main(write, self.context, step=position.global_step)
        self.saved += 1

    def _gather(self, local: Mapping[str, Any]) -> list[Any]:
        gathered: list[Any] = [None] * self.context.world_size
        with collective_guard("all_gather_object(checkpoint extra)", self.context):
            torch.distributed.all_gather_object(gathered, dict(local))
        return gathered

    def _local_extra(self, extra: Mapping[str, Any]) -> Mapping[str, Any]:
        """Return this rank's own values from a checkpoint's extra values."""
        per_rank = extra.get("per_rank")
        if not per_rank:
            return extra
        if len(per_rank) != self.context.world_size:
            logger.warning(
                "checkpoint was written by %d ranks and is resumed by %d; every rank takes rank 0's loss monitor",
                len(per_rank),
                self.context.world_size,
            )
            self.telemetry.event(
                "tolaria.checkpoint.world_size_changed",
                Level.WARNING,
                reason="resumed with a different number of ranks; per-rank state taken from rank 0",
                saved_world_size=len(per_rank),
                world_size=self.context.world_size,
            )
            return {**extra, **per_rank[0]}
        return {**extra, **per_rank[self.context.rank]}

    def discard_after(self, position: Position) -> None:
        """Delete the committed checkpoints newer than ``position``: a rollback abandoned their trajectory."""
        from tolaria.checkpoint.reader import manifest_paths
        from tolaria.checkpoint.store import _delete_checkpoint

        if not is_main_process(self.context) or not self.directory.is_dir():
            return
        for step, manifest in manifest_paths(self.directory):
            if step > position.global_step:
                _delete_checkpoint(self.directory, step, manifest)

    def resume(self, source: str | os.PathLike[str]) -> tuple[Position, Mapping[str, Any]]:
        """Restore the newest good checkpoint from ``source`` and return its position and extra values.

        ``source`` is a checkpoint folder or a run folder containing ``checkpoints/``.

        Raises:
            CheckpointNotFound: no loadable checkpoint exists there.
        """
        folder = Path(source)
        if (folder / "checkpoints").is_dir():
            folder = folder / "checkpoints"
        info, state = checkpoint.load_latest(folder, telemetry=self.telemetry)
        extra = self._local_extra(restore_state(self.objects, state))
        position = apply_extra(self.objects, extra)
        logger.info(
            "resumed from %s at epoch %d, batch %d, step %d",
            info.manifest_path,
            position.epoch,
            position.batch,
            position.global_step,
        )
        return position, extra


_SAVED_COUNTER = "tolaria.checkpoint.saved"


def _count_own_save(extra: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``extra`` with the saving rank's telemetry counters as they are once this checkpoint commits.

    The counters are captured before ``checkpoint.save`` counts the save itself, so a
    run resumed from the checkpoint would report one save fewer than were made. A save
    that fails leaves no checkpoint, so no file claims a save that did not happen.
    """
    telemetry = extra.get("telemetry")
    if not telemetry:
        return dict(extra)
    counters = dict(telemetry["counters"])
    counters[_SAVED_COUNTER] = counters.get(_SAVED_COUNTER, 0.0) + 1.0
    return {**extra, "telemetry": {**telemetry, "counters": counters}}

