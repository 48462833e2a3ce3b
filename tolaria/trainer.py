"""``Trainer``: the production entry point that wires the shell's components together.

The trainer builds and owns these components, each with one job:

* ``StepRunner`` (``tolaria.step``): forward, per-objective backward, aggregation,
  optimizer step;
* ``TrainingLoop`` (``tolaria.loop``): epochs and batches from any position;
* ``SafetyGuard`` (``tolaria.safety``): loss anomalies, emergency levels
  (``EmergencyController``), snapshots and rollback (``RollbackManager``);
* ``EpochControl`` (``tolaria.epoch_control``): the controller and executor calls at
  each epoch end, on the shared ``AsyncWorker``;
* ``CheckpointKeeper`` (``tolaria.checkpointing``): checkpoints and exact resume;
* ``Telemetry`` (``tolaria.telemetry``): metrics and events.

At each epoch end, in order: scheduler step, validation, control loop, telemetry
packet, epoch callbacks, checkpoint. Any exception is logged, reported as a
``tolaria.run.failed`` event and re-raised.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from tolaria.assembly import build_control, build_guard, build_runner
from tolaria.checkpointing import CheckpointKeeper, TrainingObjects, apply_extra, capture_state, restore_state
from tolaria.config import TrainerConfig
from tolaria.control import KasminaClient, TamiyoClient
from tolaria.devices import resolve_device, seed_everything
from tolaria.distributed import DistributedContext, rank_path
from tolaria.distributed.step_hooks import rank_sum, shared_run_id
from tolaria.epoch import Accuracy
from tolaria.epoch_telemetry import publish_epoch
from tolaria.loop import LoopResult, StepRecord, TrainingLoop, evaluate_with, monitor_extra
from tolaria.precision import MixedPrecision
from tolaria.profiler import TrainingProfiler
from tolaria.results import EpochMetrics, FitResult
from tolaria.safety import Position
from tolaria.step import Objectives
from tolaria.telemetry import JsonlSink, Level, Telemetry
from tolaria.worker import AsyncWorker

__all__ = ["EpochCallback", "Trainer"]

logger = logging.getLogger(__name__)

EpochCallback = Callable[[EpochMetrics], None]
"""Called with each epoch's metrics after its telemetry packet is written."""


class Trainer:
    """Trains a model on several objectives at once.

    Args:
        model: the module to train; it is moved to the configured device.
        optimizer: any ``torch.optim`` optimizer over ``model``'s parameters.
        objectives: ``objectives(model, batch) -> {name: scalar loss}``.
        train_data: an iterable of batches (a ``DataLoader``, ``tolaria.data.EpochBatches``, ...);
            iterated once per epoch, with ``set_epoch(epoch)`` called first when it exists.
        val_data: optional iterable of validation batches.
        config: run settings; see ``TrainerConfig``.
        accuracy: optional ``accuracy(model, batch) -> {name: [batch] bool tensor}`` used
            during validation.
        telemetry: where metrics and events go; by default a publisher writing
            ``config.out_dir/telemetry.jsonl`` when ``out_dir`` is set. A publisher
            passed in is not closed by the trainer.
        lr_scheduler: optional scheduler, stepped once per epoch.
        callbacks: called with each epoch's ``EpochMetrics``.
        step_callbacks: called with a ``StepRecord`` after every executed step.
        tamiyo: controller asked for an adaptation command at each epoch end.
        kasmina: executor of those commands; ``OptimizerExecutor`` by default.
        worker: the shared worker for controller, executor, listener and restore
            calls. One passed in is used and never shut down by the trainer; one the
            trainer creates is shut down by ``close``.
        distributed: the process group context; by default detected from the
            environment (``torchrun``), else single-process.

    Raises:
        ValueError: the configuration does not fit the model or the device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        objectives: Objectives,
        train_data: Iterable[Any],
        val_data: Iterable[Any] | None = None,
        config: TrainerConfig | None = None,
        *,
        accuracy: Accuracy | None = None,
        telemetry: Telemetry | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: Sequence[EpochCallback] = (),
        step_callbacks: Sequence[Callable[[StepRecord], None]] = (),
        tamiyo: TamiyoClient | None = None,
        kasmina: KasminaClient | None = None,
        worker: AsyncWorker | None = None,
        distributed: DistributedContext | None = None,
    ) -> None:
        self.config = config or TrainerConfig()
        self._owns_context = distributed is None
        self.context = distributed or DistributedContext.from_environment(device=resolve_device(self.config.device))
        self.device = self.context.device if self.context.is_distributed else resolve_device(self.config.device)

        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.train_data = train_data
        self.val_data = val_data
        self.lr_scheduler = lr_scheduler
        self.callbacks = tuple(callbacks)

        # Shared services: telemetry first, because the worker reports to it.
        self._owns_telemetry = telemetry is None
        self.telemetry = telemetry or Telemetry(
            source="trainer",
            rank=self.context.rank,
            run_id=shared_run_id(self.context),
            attributes={"world_size": self.context.world_size},
        )
        self._owns_worker = worker is None
        self.worker = worker or AsyncWorker(name="tolaria-trainer", telemetry=self.telemetry)

        # Components, each with one job.
        self.precision = MixedPrecision(self.config.amp, self.device)
        self.runner = build_runner(
            self.config,
            self.model,
            optimizer,
            objectives,
            precision=self.precision,
            context=self.context,
            on_gradient_fallback=self._report_gradient_fallback,
        )
        self.guard = build_guard(
            self.config,
            self.model,
            optimizer,
            scheduler=lr_scheduler,
            scaler=self.precision.scaler,
            worker=self.worker,
            telemetry=self.telemetry,
            capture_extra=lambda: monitor_extra(self.runner),
            context=self.context,
        )
        self._tamiyo = tamiyo
        self.control = build_control(
            self.config,
            tamiyo,
            kasmina,
            optimizer,
            worker=self.worker,
            context=self.context,
            guard=self.guard,
            telemetry=self.telemetry,
        )

        self.objects = self._build_objects()
        self.checkpoints = self._build_checkpoints()
        self._validate = evaluate_with(self.runner, val_data, accuracy)
        self._step_callbacks = tuple(step_callbacks)
        self.position = Position(0, 0, 0)
        self._closed = False

    # Construction: one builder per component.

    def _build_objects(self) -> TrainingObjects:
        return TrainingObjects(
            self.model,
            self.optimizer,
            self.lr_scheduler,
            self.precision.scaler,
            monitor=lambda: self.runner.monitor_state,
            set_monitor=self.runner.set_monitor,
            loss_monitor_config=self.config.loss_monitor,
        )

    def _build_checkpoints(self) -> CheckpointKeeper | None:
        if self.config.out_dir is None:
            return None
        return CheckpointKeeper(
            self.config.checkpoint,
            self.config.out_dir / "checkpoints",
            self.objects,
            self.context,
            self.telemetry,
            state_extra=self._shell_state,
        )

    def _shell_state(self) -> dict[str, Any]:
        """Return the shell's state saved with every checkpoint besides the training objects."""
        return {
            "telemetry": self.telemetry.state_dict(),
            "emergency": self.guard.emergency.state_dict(),
            **self._controller_state(),
        }

    def _load_shell_state(self, extra: Mapping[str, Any]) -> None:
        """Restore what ``_shell_state`` saved; entries a checkpoint lacks are left as they are."""
        load_controller = getattr(self._tamiyo, "load_state_dict", None)
        if "tamiyo" in extra and callable(load_controller):
            load_controller(extra["tamiyo"])
        if extra.get("emergency"):
            self.guard.emergency.load_state_dict(extra["emergency"])
        if extra.get("telemetry"):
            self.telemetry.load_state_dict(extra["telemetry"])

    def _controller_state(self) -> dict[str, Any]:
        state_dict = getattr(self._tamiyo, "state_dict", None)
        return {"tamiyo": state_dict()} if callable(state_dict) else {}

    def _report_gradient_fallback(self, error: RuntimeError) -> None:
        self.telemetry.count("tolaria.gradients.batched_fallbacks")
        self.telemetry.event(
            "tolaria.gradients.batched_fallback",
            Level.WARNING,
            reason="batched backward failed; using one backward per objective",
            error=type(error).__name__,
            message=str(error),
        )

    # Running.

    def fit(self, resume_from: str | os.PathLike[str] | None = None) -> FitResult:
        """Train until ``config.epochs`` epochs are complete or the emergency level reaches HALT.

        Args:
            resume_from: a run folder or checkpoint folder; training continues from its
                newest good checkpoint.

        Raises:
            CheckpointError: ``resume_from`` has no loadable checkpoint.
            Exception: whatever a step, the data or a callback raised, after it was
                logged and reported as a ``tolaria.run.failed`` event.
        """
        started = time.perf_counter()
        self._start()
        try:
            if resume_from is not None:
                self.position = self._resume(resume_from)
            with self._profiler() as profiler:
                result = self._build_loop(profiler).run(self.position)
            self.position = result.position
            if result.halted:
                self._halt(result)
        except BaseException as error:
            self._report_failure(error)
            raise
        finally:
            self._finish()
        wall_time = time.perf_counter() - started
        logger.info("training finished: %d epochs, %d steps, %.1f s", len(result.epochs), self.global_step, wall_time)
        return FitResult(result.epochs, self.global_step, wall_time, result.halted, result.halt_reason)

    def state_dict(self) -> dict[str, Any]:
        """Return the training state, as ``Module.state_dict`` does for a module.

        It contains the model, optimizer, scheduler and gradient scaler states, the RNG
        states, the position (epoch, batch, global step), the loss monitor, the
        emergency state, the controller's state when it has one, and the telemetry
        sequence numbers. Everything loads with ``torch.load(weights_only=True)``.
        Tensors are shared with the live objects: copy the result to keep it.
        """
        return capture_state(self.objects, self.position, self._shell_state())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict`` in place; the next ``fit`` continues from it.

        Raises:
            KeyError: a required entry is missing.
            RuntimeError: the model's parameters do not match (``strict`` loading).
        """
        extra = restore_state(self.objects, state)
        self.position = apply_extra(self.objects, extra)
        self._load_shell_state(extra)

    @property
    def global_step(self) -> int:
        """Optimizer steps applied so far."""
        return self.position.global_step

    def _profiler(self) -> TrainingProfiler:
        return TrainingProfiler(
            self.config.profiler, run_id=self.telemetry.run_id, rank=self.context.rank, telemetry=self.telemetry
        )

    def _build_loop(self, profiler: TrainingProfiler) -> TrainingLoop:
        checkpoints = self.checkpoints
        callbacks = list(self._step_callbacks)
        if self.config.profiler.enabled:
            callbacks.append(lambda record: profiler.step(record.epoch, record.global_step))
        return TrainingLoop(
            self.runner,
            self.train_data,
            epochs=self.config.epochs,
            guard=self.guard,
            telemetry=self.telemetry,
            validate=self._validate,
            learning_rates=lambda: tuple(float(group["lr"]) for group in self.optimizer.param_groups),
            at_epoch_end=self._at_epoch_end,
            step_callbacks=callbacks,
            checkpoint_steps=None if checkpoints is None else checkpoints.after_step,
            scheduler_step=None if self.lr_scheduler is None else self.lr_scheduler.step,
            progress_bar=self.config.progress,
            restore_monitor=self.runner.restore_monitor,
            after_rollback=None if checkpoints is None else checkpoints.discard_after,
            combine_ranks=rank_sum(self.context) if self.context.is_distributed else None,
            world_size=self.context.world_size,
        )

    def _resume(self, source: str | os.PathLike[str]) -> Position:
        if self.checkpoints is None:
            raise ValueError("resume_from needs TrainerConfig.out_dir, where the resumed run writes its checkpoints")
        position, extra = self.checkpoints.resume(source)
        self._load_shell_state(extra)
        self.telemetry.event("tolaria.run.resumed", Level.INFO, source=str(source), **position.to_extra())
        return position

    def _at_epoch_end(self, metrics: EpochMetrics) -> str | None:
        halt_reason = None
        if self.control is not None:
            decision = self.control.run(metrics)
            if decision is not None and decision.halt:
                halt_reason = decision.reason
        self.guard.emergency.emit_epoch_metrics()
        publish_epoch(self.telemetry, metrics)
        for callback in self.callbacks:
            callback(metrics)
        # A halted run's state goes to halted/ (see _halt), never to the rotating checkpoints.
        if self.checkpoints is not None and halt_reason is None:
            self.checkpoints.after_epoch(Position(metrics.epoch + 1, 0, metrics.global_step))
        return halt_reason

    def _halt(self, result: LoopResult) -> None:
        logger.critical("training halted at step %d: %s", result.position.global_step, result.halt_reason)
        self.telemetry.event(
            "tolaria.run.halted", Level.CRITICAL, reason=result.halt_reason, step=result.position.global_step
        )
        if self.checkpoints is not None and self.config.out_dir is not None:
            # Kept apart from the rotating checkpoints so that a resume never starts from a halted state.
            self.checkpoints.save(result.position, directory=self.config.out_dir / "halted")

    def _start(self) -> None:
        seed_everything(self.config.seed)
        if self.config.lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr
        out_dir = self.config.out_dir
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            if self._owns_telemetry:
                self.telemetry.add_sink(JsonlSink(rank_path(out_dir, "telemetry.jsonl", self.context)))
        logger.info(
            "training started: %d epochs, aggregator %s, device %s, amp %s, rank %d of %d",
            self.config.epochs,
            self.config.aggregator,
            self.device,
            self.config.amp,
            self.context.rank,
            self.context.world_size,
        )
        self.telemetry.event(
            "tolaria.run.started",
            Level.INFO,
            epochs=self.config.epochs,
            aggregator=self.config.aggregator,
            device=str(self.device),
            seed=self.config.seed,
        )

    def _report_failure(self, error: BaseException) -> None:
        logger.exception("training failed at epoch %d, step %d", self.position.epoch, self.global_step)
        self.telemetry.event(
            "tolaria.run.failed",
            Level.ERROR,
            reason="exception during training",
            error=type(error).__name__,
            message=str(error),
            epoch=self.position.epoch,
            step=self.global_step,
        )

    def _finish(self) -> None:
        self.telemetry.event("tolaria.run.finished", Level.INFO, epoch=self.position.epoch, step=self.global_step)
        self.telemetry.flush(self.position.epoch, self.global_step)

    def close(self) -> None:
        """Release what the trainer created: worker, snapshot buffers, telemetry, process group.

        A worker, publisher or distributed context passed in by the caller stays open.
        """
        if self._closed:
            return
        self._closed = True
        self.guard.emergency.close()
        self.guard.rollback.close()
        if self._owns_worker:
            self.worker.shutdown(timeout=2.0)
        if self._owns_telemetry:
            self.telemetry.close()
        if self._owns_context:
            self.context.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
