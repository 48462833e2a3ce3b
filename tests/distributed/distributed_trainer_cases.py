"""Model, data and settings shared by the distributed Trainer worker and the tests that check it.

The test process builds the same model and data to run the one-process reference, so
every builder here is a pure function of its arguments and the fixed seeds below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tolaria.config import TrainerConfig
from tolaria.control import AdaptationCommand, EpochState, FaultPlan, TamiyoClient
from tolaria.data import EpochBatches
from tolaria.demo import DigitsNet, digits_objectives
from tolaria.distributed import DistributedContext
from tolaria.functional.anomaly import LossMonitorConfig
from tolaria.functional.emergency import EmergencyPolicy
from tolaria.loop import StepRecord
from tolaria.settings import CheckpointConfig, ControlConfig, SafetyConfig
from tolaria.step import Objectives, StepRunner
from tolaria.trainer import Trainer

# 64 samples in global batches of 16 give 4 steps per epoch. Each of the two ranks gets
# 8 samples per step, so the mean of the ranks' mean losses is the global batch's loss.
SAMPLES = 64
BATCH_SIZE = 16
HIDDEN = 16
DATA_SEED = 3
MODEL_SEED = 11
RUN_SEED = 5
LEARNING_RATE = 0.05
MATCH_EPOCHS = 3
MATCH_AGGREGATORS = ("pcgrad", "mean")

# Training call (counted from 0) at which rank 1's objectives return NaN or a spike.
NAN_CALL = 6
SPIKE_CALL = 7
SPIKE_FACTOR = 1000.0
SPIKE_SNAPSHOT_EVERY = 5
SPIKE_SKIP_BATCHES = 2

RESUME_FIRST_EPOCHS = 2
RESUME_TOTAL_EPOCHS = 4

# Rank 0's controller hangs past its timeout at CONTROL_HANG_EPOCH and halves the learning rate at every other
# epoch end.
CONTROL_EPOCHS = 3
CONTROL_HANG_EPOCH = 1
CONTROL_FACTOR = 0.5
TAMIYO_TIMEOUT_S = 0.5

# Training call at which the failing rank exits or hangs in the lost-rank jobs.
LOST_RANK_CALL = 3
LOST_RANK_TIMEOUT_S = 10.0


def digits_like_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``[SAMPLES, 64]`` float32 features and ``[SAMPLES]`` int64 digit labels, drawn from ``DATA_SEED``."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    features = torch.randn(SAMPLES, 64, generator=generator)
    labels = torch.randint(0, 10, (SAMPLES,), generator=generator)
    return features, labels


def build_batches(rank: int, world_size: int) -> EpochBatches:
    """Return this rank's shard of every global batch of ``BATCH_SIZE`` samples."""
    features, labels = digits_like_data()
    return EpochBatches(features, labels, batch_size=BATCH_SIZE, seed=RUN_SEED, rank=rank, world_size=world_size)


def build_model() -> DigitsNet:
    """Return the demo network with a narrow trunk, initialised from ``MODEL_SEED`` on every rank."""
    # nn.Linear draws its initial weights from the global RNG, so seed it here.
    torch.manual_seed(MODEL_SEED)
    return DigitsNet(hidden=HIDDEN)


def match_config(aggregator: str) -> TrainerConfig:
    """Return plain settings for the comparison of two ranks with one process."""
    return TrainerConfig(epochs=MATCH_EPOCHS, aggregator=aggregator, seed=RUN_SEED, device="cpu")


def spike_config(**changes: Any) -> TrainerConfig:
    """Return settings under which the first spike reaches CONSERVATIVE and rolls back."""
    config = TrainerConfig(
        epochs=MATCH_EPOCHS,
        seed=RUN_SEED,
        device="cpu",
        emergency=EmergencyPolicy.from_mapping({"on_spike": [[1, "CONSERVATIVE"]]}),
        loss_monitor=LossMonitorConfig(warmup=4, window=8),
        safety=SafetyConfig(
            snapshot_every=SPIKE_SNAPSHOT_EVERY,
            snapshot_every_elevated=SPIKE_SNAPSHOT_EVERY,
            skip_batches=SPIKE_SKIP_BATCHES,
        ),
    )
    return config.replace(**changes)


def resume_config(out_dir: Path, epochs: int) -> TrainerConfig:
    """Return settings that write a checkpoint at every epoch end into ``out_dir``."""
    return TrainerConfig(
        epochs=epochs, seed=RUN_SEED, device="cpu", out_dir=out_dir, checkpoint=CheckpointConfig(every_epochs=1)
    )


def halt_config(out_dir: Path) -> TrainerConfig:
    """Return settings under which the first non-finite step halts training, with checkpoints in ``out_dir``."""
    return TrainerConfig(
        epochs=MATCH_EPOCHS,
        seed=RUN_SEED,
        device="cpu",
        out_dir=out_dir,
        emergency=EmergencyPolicy.from_mapping({"on_nonfinite": [[1, "HALT"]]}),
    )


def control_config() -> TrainerConfig:
    """Return settings with a short controller timeout."""
    return TrainerConfig(
        epochs=CONTROL_EPOCHS,
        seed=RUN_SEED,
        device="cpu",
        control=ControlConfig(tamiyo_timeout_s=TAMIYO_TIMEOUT_S, kasmina_timeout_s=2.0),
    )


class HalvingTamiyo:
    """Controller that multiplies the learning rate by ``CONTROL_FACTOR`` at every epoch end."""

    def evaluate_epoch(self, state: EpochState) -> AdaptationCommand:
        return AdaptationCommand.adjust_lr(factor=CONTROL_FACTOR, epoch=state.epoch, reason="test schedule")


def hanging_tamiyo() -> TamiyoClient:
    """Return the halving controller, hanging at ``CONTROL_HANG_EPOCH`` until its call is cancelled."""
    return FaultPlan.parse([f"tamiyo-hang@{CONTROL_HANG_EPOCH}"]).wrap_tamiyo(HalvingTamiyo())


class RankFaults:
    """Wraps objectives so that one rank's chosen training call returns NaN or spiked losses.

    Training calls are counted from 0 on every rank (validation calls, with the model
    in eval mode, are not counted), and the count keeps growing across rollbacks, so
    each fault fires once.
    """

    def __init__(
        self, objectives: Objectives, *, rank: int, faulty_rank: int, nan_call: int = -1, spike_call: int = -1
    ) -> None:
        self.objectives = objectives
        self.active = rank == faulty_rank
        self.nan_call = nan_call
        self.spike_call = spike_call
        self.calls = 0

    def __call__(self, model: torch.nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        losses = self.objectives(model, batch)
        if not model.training:
            return losses
        call = self.calls
        self.calls += 1
        if self.active and call == self.nan_call:
            return {name: loss * math.nan for name, loss in losses.items()}
        if self.active and call == self.spike_call:
            return {name: loss * SPIKE_FACTOR for name, loss in losses.items()}
        return losses


class StepLog:
    """Step callback that keeps each step's position, losses, outcome and loss monitor state.

    Set ``runner`` to the trainer's ``StepRunner`` before training, so the log can read
    the monitor state after each step.
    """

    def __init__(self) -> None:
        self.runner: StepRunner | None = None
        self.steps: list[dict[str, Any]] = []

    def __call__(self, record: StepRecord) -> None:
        monitor = None if self.runner is None else self.runner.monitor_state
        self.steps.append(
            {
                "epoch": record.epoch,
                "batch": record.batch,
                "global_step": record.global_step,
                "losses": record.losses.detach().cpu().clone(),
                "applied": record.applied,
                "monitor_history": None if monitor is None else monitor.history.detach().cpu().clone(),
                "monitor_count": None if monitor is None else monitor.count.detach().cpu().clone(),
            }
        )


def train(
    context: DistributedContext,
    config: TrainerConfig,
    *,
    objectives: Objectives = digits_objectives,
    resume_from: Path | None = None,
    tamiyo: TamiyoClient | None = None,
) -> dict[str, Any]:
    """Train the shared model on this rank's shards and return what the tests compare.

    Returns a dict with ``steps`` (see ``StepLog``), ``parameters`` (final state dict),
    ``rollbacks``, ``spikes``, ``global_step``, ``halted``, ``halt_reason``,
    ``epoch_train_loss`` (each epoch's ``EpochMetrics.train_loss``), ``epoch_samples_per_s``,
    ``counters`` (telemetry counter totals), ``learning_rates``, ``emergency_level``
    (an int) and ``conservative_epochs`` (0 without a controller).
    """
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    batches = build_batches(context.rank, context.world_size)
    log = StepLog()
    trainer = Trainer(
        model, optimizer, objectives, batches, config=config, step_callbacks=[log], tamiyo=tamiyo, distributed=context
    )
    with trainer:
        log.runner = trainer.runner
        result = trainer.fit(resume_from=resume_from)
        return {
            "steps": log.steps,
            "parameters": {name: value.detach().clone() for name, value in model.state_dict().items()},
            "rollbacks": trainer.guard.rollbacks,
            "spikes": trainer.guard.spikes,
            "global_step": result.global_step,
            "halted": result.halted,
            "halt_reason": result.halt_reason,
            "epoch_train_loss": [dict(metrics.train_loss) for metrics in result.epochs],
            "epoch_samples_per_s": [metrics.samples_per_s for metrics in result.epochs],
            "counters": dict(trainer.telemetry.counters),
            "learning_rates": [float(group["lr"]) for group in optimizer.param_groups],
            "emergency_level": int(trainer.guard.emergency.level),
            "conservative_epochs": 0 if trainer.control is None else trainer.control.conservative_epochs,
        }
