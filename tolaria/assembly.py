"""Builders of the trainer's safety and control components from a ``TrainerConfig``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from tolaria.config import TrainerConfig
from tolaria.control import ControlLoop, KasminaClient, OptimizerExecutor, TamiyoClient
from tolaria.distributed import DistributedContext, average_gradients
from tolaria.distributed.step_hooks import agreed_flags
from tolaria.emergency import EmergencyController
from tolaria.epoch_control import EpochControl
from tolaria.precision import MixedPrecision
from tolaria.rollback import RollbackManager
from tolaria.safety import SafetyGuard
from tolaria.step import Objectives, StepRunner
from tolaria.telemetry import Telemetry
from tolaria.worker import AsyncWorker

__all__ = ["build_control", "build_guard", "build_runner"]


def build_runner(
    config: TrainerConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    objectives: Objectives,
    *,
    precision: MixedPrecision,
    context: DistributedContext,
    on_gradient_fallback: Callable[[RuntimeError], None],
) -> StepRunner:
    """Build the step runner; under ``torch.distributed`` it averages gradients and agrees on flags."""
    agree = None
    average = None
    if context.is_distributed:
        agree = agreed_flags(context)

        def average(tree: dict[str, Any], step: int) -> dict[str, Any]:
            return average_gradients(tree, context, step=step)

    return StepRunner(
        model,
        optimizer,
        objectives,
        aggregator=config.aggregator,
        weights=config.weights,
        precision=precision,
        gradient_mode=config.gradient_mode,
        grad_clip_norm=config.grad_clip_norm,
        seed=config.seed,
        check_objectives=config.check_objectives,
        on_gradient_fallback=on_gradient_fallback,
        loss_monitor=config.loss_monitor,
        agree_flags=agree,
        average_gradients=average,
        stats_every=config.stats_every,
    )


def build_guard(
    config: TrainerConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any | None,
    scaler: Any | None,
    worker: AsyncWorker,
    telemetry: Telemetry,
    capture_extra: Callable[[], Mapping[str, Any]],
    context: DistributedContext,
) -> SafetyGuard:
    """Build the emergency controller, the rollback manager and the guard that joins them.

    A rollback that misses its deadline raises the emergency level through the guard.
    """
    safety = config.safety
    emergency = EmergencyController(
        config.emergency, telemetry=telemetry, worker=worker, broadcast_timeout_s=safety.broadcast_timeout_s
    )
    checkpoint_dir = None if config.out_dir is None else config.out_dir / "checkpoints"
    rollback = RollbackManager(
        model,
        optimizer,
        scheduler=scheduler,
        scaler=scaler,
        capacity_bytes=safety.snapshot_capacity_bytes,
        checkpoint_dir=checkpoint_dir,
        worker=worker,
        deadline_s=safety.rollback_deadline_s,
        telemetry=telemetry,
    )
    guard = SafetyGuard(safety, emergency, rollback, telemetry, capture_extra, context=context)
    rollback.on_deadline_exceeded = guard.on_deadline_exceeded
    return guard


def build_control(
    config: TrainerConfig,
    tamiyo: TamiyoClient | None,
    kasmina: KasminaClient | None,
    optimizer: torch.optim.Optimizer,
    *,
    worker: AsyncWorker,
    context: DistributedContext,
    guard: SafetyGuard,
    telemetry: Telemetry,
) -> EpochControl | None:
    """Build the end-of-epoch control loop, or return ``None`` without a controller.

    Raises:
        ValueError: ``kasmina`` was given without ``tamiyo``.
    """
    if tamiyo is None and kasmina is None:
        return None
    if tamiyo is None:
        raise ValueError("kasmina was given without tamiyo; pass a controller (TamiyoClient) as well")
    executor = kasmina or OptimizerExecutor(optimizer)
    control = config.control
    loop = ControlLoop(
        tamiyo,
        executor,
        worker,
        tamiyo_timeout_s=control.tamiyo_timeout_s,
        kasmina_timeout_s=control.kasmina_timeout_s,
        breaker_policy=control.breaker,
        telemetry=telemetry,
    )
    return EpochControl(loop, executor, context, guard, telemetry)
