"""Trainer safety through ``fit``: non-finite steps, spikes, rollback, HALT and emergency listeners.

Faults come from ``tolaria.cli.injection.LossFaults``, which corrupts the losses of
chosen training calls (counted from 0, across rollbacks), and from a data set with
a poisoned batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_cases import BATCH_SIZE, StepLog, make_trainer, recording_telemetry, regression_data, regression_objectives

from tolaria import Trainer, TrainerConfig, checkpoint
from tolaria.cli.injection import LossFaults
from tolaria.control import Fault
from tolaria.data import EpochBatches
from tolaria.functional.anomaly import LossMonitorConfig
from tolaria.functional.emergency import EmergencyPolicy, Level, Transition
from tolaria.loop import StepRecord
from tolaria.settings import CheckpointConfig, SafetyConfig
from tolaria.telemetry import Level as Severity

SPIKE_POLICY = EmergencyPolicy.from_mapping({"on_spike": [[1, "CONSERVATIVE"]]})
SMALL_MONITOR = LossMonitorConfig(warmup=4, window=8)
SAFETY = SafetyConfig(snapshot_every=5, snapshot_every_elevated=5, skip_batches=2, max_rollbacks=2)


def safety_config(epochs: int = 3, **changes: Any) -> TrainerConfig:
    settings: dict[str, Any] = {"loss_monitor": SMALL_MONITOR, "emergency": SPIKE_POLICY, "safety": SAFETY}
    return TrainerConfig(epochs=epochs, device="cpu", aggregator="mean", **{**settings, **changes})


def faults(**steps: int | tuple[int, ...]) -> list[Fault]:
    """``faults(nan=5, spike=(10, 14))`` -> the matching ``Fault`` list."""
    found = []
    for kind, at in steps.items():
        for step in at if isinstance(at, tuple) else (at,):
            found.append(Fault(kind, step))
    return found


class StateTrace:
    """A step callback that copies the parameters and Adam state after every step."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.states: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.records: list[StepRecord] = []

    def __call__(self, record: StepRecord) -> None:
        assert self.trainer is not None
        parameters = [parameter.detach().clone() for parameter in self.trainer.model.parameters()]
        optimizer_state = [
            value.clone()
            for state in self.trainer.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        ]
        self.states.append((parameters, optimizer_state))
        self.records.append(record)


def run_with_faults(config: TrainerConfig, injected: list[Fault], **kwargs: Any) -> tuple[Trainer, Any, StepLog]:
    log = StepLog()
    trainer = make_trainer(
        config, objectives=LossFaults(regression_objectives, injected), step_callbacks=[log], **kwargs
    )
    with trainer:
        result = trainer.fit()
    return trainer, result, log


def test_nan_step_leaves_state_bit_identical() -> None:
    trace = StateTrace()
    trainer = make_trainer(
        TrainerConfig(epochs=2, device="cpu", aggregator="mean"),
        objectives=LossFaults(regression_objectives, faults(nan=5)),
        step_callbacks=[trace],
    )
    trace.trainer = trainer
    with trainer:
        result = trainer.fit()

    assert [record.applied for record in trace.records].count(False) == 1
    assert not trace.records[5].applied
    assert torch.isnan(trace.records[5].losses).all()
    before_parameters, before_optimizer = trace.states[4]
    after_parameters, after_optimizer = trace.states[5]
    assert len(before_optimizer) == len(after_optimizer) > 0
    for before, after in zip(before_parameters, after_parameters, strict=True):
        assert torch.equal(before, after)
    for before, after in zip(before_optimizer, after_optimizer, strict=True):
        assert torch.equal(before, after)
    # The next step changes the parameters again: training went on.
    assert not torch.equal(trace.states[6][0][0], after_parameters[0])
    assert trace.records[6].global_step == trace.records[5].global_step == 5
    assert result.global_step == 2 * 8 - 1
    assert [epoch.skipped_steps for epoch in result.epochs] == [1, 0]
    assert trainer.guard.emergency.max_level == Level.ELEVATED
    assert trainer.guard.rollbacks == 0


def test_spike_rolls_back_once_and_skips_batches() -> None:
    telemetry, sink = recording_telemetry()
    # Step 10 is a snapshot step (every 5), so the rollback restores the state before the spiked step.
    trainer, result, log = run_with_faults(safety_config(), faults(spike=10), telemetry=telemetry)

    assert not result.halted
    assert len(result.epochs) == 3
    assert trainer.guard.rollbacks == 1
    assert trainer.guard.spikes == 1
    spike = sink.events("tolaria.anomaly.spike")
    assert [event.attributes["step"] for event in spike] == [10]
    completed = sink.events("tolaria.rollback.completed")
    assert len(completed) == 1
    assert completed[0].attributes["restored_step"] == 10
    assert completed[0].attributes["tier"] == "fast"
    assert len(sink.events("tolaria.rollback.started")) == 1
    assert sink.events("tolaria.rollback.failed") == []

    # Epoch 1 batch 2 is step 10: the spiked step ran, then batches 2 and 3 were skipped after the rollback.
    positions = log.positions
    spiked = positions.index((1, 2, 10))
    assert positions[spiked + 1] == (1, 4, 10)
    assert positions[spiked + 1 :] == [(1, batch, 6 + batch) for batch in range(4, 8)] + [
        (2, batch, 14 + batch) for batch in range(8)
    ]
    skipped = sink.events("tolaria.rollback.batch_skipped")
    assert [(event.attributes["epoch"], event.attributes["batch"]) for event in skipped] == [(1, 2), (1, 3)]
    assert trainer.guard.skipped_batches == 2
    assert result.global_step == 3 * 8 - 2


def test_rollback_run_is_deterministic() -> None:
    _, first, first_log = run_with_faults(safety_config(), faults(spike=10))
    _, second, second_log = run_with_faults(safety_config(), faults(spike=10))

    assert first.global_step == second.global_step
    assert first_log.positions == second_log.positions
    assert len(first_log.records) == len(second_log.records) > 0
    for one, other in zip(first_log.records, second_log.records, strict=True):
        assert torch.equal(one.losses, other.losses), (one.epoch, one.batch)


def test_rollback_into_earlier_epoch_results() -> None:
    # The NaN at call 6 opens the episode after the snapshot of step 5 (epoch 0). The spike at
    # call 10 (epoch 1 batch 2, step 9) rolls back into epoch 0, whose end runs a second time.
    trainer, result, log = run_with_faults(safety_config(), faults(nan=6, spike=10))

    assert trainer.guard.rollbacks == 1
    assert log.positions[10] == (1, 2, 9)
    assert log.positions[11][2] == 5
    assert not result.halted
    assert [metrics.epoch for metrics in result.epochs] == [0, 1, 2]


def test_repeated_spikes_halt_and_save(tmp_path: Path) -> None:
    telemetry, sink = recording_telemetry()
    out = tmp_path / "run"
    # Spikes at calls 10, 14 and 18: two rollbacks are allowed (max_rollbacks=2), the third spike halts.
    trainer, result, log = run_with_faults(safety_config(out_dir=out), faults(spike=(10, 14, 18)), telemetry=telemetry)

    assert result.halted
    assert result.halt_reason == "2 rollbacks within 1000 steps"
    assert trainer.guard.rollbacks == 2
    assert trainer.guard.emergency.level == Level.HALT
    assert log.records[-1].global_step + 1 == result.global_step
    halted = sink.events("tolaria.run.halted")
    assert len(halted) == 1
    assert halted[0].level == Severity.CRITICAL
    assert halted[0].attributes["reason"] == result.halt_reason
    info, state = checkpoint.load_latest(out / "halted")
    assert info.step == result.global_step
    assert "model" in state
    # The halted state is kept apart: the rotating checkpoints hold only those of the completed epochs.
    assert list(checkpoint.list_checkpoints(out / "checkpoints")) == [metrics.global_step for metrics in result.epochs]


def test_raising_listener_reported_others_called() -> None:
    telemetry, sink = recording_telemetry()
    received: list[Transition] = []

    def broken(transition: Transition) -> None:
        raise RuntimeError("pager service is down")

    trainer = make_trainer(
        TrainerConfig(epochs=2, device="cpu", aggregator="mean"),
        objectives=LossFaults(regression_objectives, faults(nan=5)),
        telemetry=telemetry,
    )
    trainer.guard.emergency.add_listener(broken, name="pager")
    trainer.guard.emergency.add_listener(received.append, name="recorder")
    with trainer:
        result = trainer.fit()

    assert len(result.epochs) == 2
    assert [(transition.previous, transition.level) for transition in received] == [(Level.NOMINAL, Level.ELEVATED)]
    failed = sink.events("tolaria.emergency.broadcast_failed")
    assert len(failed) == 1
    assert failed[0].level == Severity.CRITICAL
    assert failed[0].attributes["listener"] == "pager"
    assert failed[0].attributes["error"] == "RuntimeError"
    assert failed[0].attributes["message"] == "pager service is down"
    assert telemetry.counters["tolaria.emergency.broadcast_failures"] == 1
    assert trainer.guard.emergency.broadcast_failures == 1


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def test_hanging_listener_does_not_block_step(release: threading.Event) -> None:
    telemetry, sink = recording_telemetry()
    broadcast_timeout_s = 0.3
    log = StepLog()
    received: list[Transition] = []

    def hangs(transition: Transition) -> None:
        release.wait(60.0)

    trainer = make_trainer(
        TrainerConfig(
            epochs=2, device="cpu", aggregator="mean", safety=SafetyConfig(broadcast_timeout_s=broadcast_timeout_s)
        ),
        objectives=LossFaults(regression_objectives, faults(nan=5)),
        telemetry=telemetry,
        step_callbacks=[log],
    )
    trainer.guard.emergency.add_listener(hangs, name="hangs")
    trainer.guard.emergency.add_listener(received.append, name="recorder")
    started = time.monotonic()
    with trainer:
        result = trainer.fit()
    elapsed = time.monotonic() - started

    assert len(result.epochs) == 2
    assert elapsed < 30.0
    # The NaN step (call 5) waited for the broadcast deadline, no longer.
    nan_step_s = log.arrived_s[5] - log.arrived_s[4]
    assert broadcast_timeout_s * 0.9 <= nan_step_s < broadcast_timeout_s + 1.0, nan_step_s
    assert len(received) == 1
    failed = sink.events("tolaria.emergency.broadcast_failed")
    assert [event.attributes["listener"] for event in failed] == ["hangs"]
    assert failed[0].attributes["timed_out"] is True


class PoisonedBatches:
    """``EpochBatches`` whose targets are multiplied by 1000 in one chosen batch of one epoch."""

    def __init__(self, epoch: int, batch: int) -> None:
        x, y_a, y_b = regression_data()
        self.inner = EpochBatches(x, y_a, y_b, batch_size=BATCH_SIZE, seed=0)
        self.poisoned = (epoch, batch)
        self.epoch = 0
        self.served: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for index, (x, y_a, y_b) in enumerate(self.inner):
            scale = 1000.0 if (self.epoch, index) == self.poisoned else 1.0
            yield x, y_a * scale, y_b * scale


def test_poisoned_batch_not_replayed_after_rollback() -> None:
    # Epoch 1 batch 4 is step 12; the newest snapshot before it is step 10 (epoch 1 batch 2).
    data = PoisonedBatches(epoch=1, batch=4)
    log = StepLog()
    trainer = make_trainer(safety_config(), train_data=data, step_callbacks=[log])
    with trainer:
        result = trainer.fit()

    assert not result.halted, result.halt_reason
    assert trainer.guard.rollbacks == 1
    assert [position[:2] for position in log.positions].count((1, 4)) == 1
    assert len(result.epochs) == 3


def test_rollback_to_first_snapshot_resets_monitor() -> None:
    # The NaN at call 3 opens the episode, so the spike at call 12 rolls back to the snapshot
    # of step 0, taken before any loss was seen. The monitor must forget the abandoned
    # trajectory, or the untrained model's losses are judged against the trained model's.
    seen: list[tuple[int, int]] = []
    trainer: Trainer | None = None

    def monitor_count(record: StepRecord) -> None:
        assert trainer is not None
        state = trainer.runner.monitor_state
        assert state is not None
        seen.append((record.global_step, int(state.count.max())))

    trainer = make_trainer(
        safety_config(),
        objectives=LossFaults(regression_objectives, faults(nan=3, spike=12)),
        step_callbacks=[monitor_count],
    )
    with trainer:
        result = trainer.fit()

    assert not result.halted, result.halt_reason
    assert trainer.guard.rollbacks == 1
    assert trainer.guard.spikes == 1
    assert len(result.epochs) == 3
    # Record 12 is the spiked step (step 11). Record 13 is the first step of the new trajectory,
    # so the monitor has seen one finite loss per objective since the restored step 0.
    assert seen[12][0] == 11
    assert seen[13] == (0, 1), seen[11:15]


def test_full_tier_rollback_continues_training(tmp_path: Path) -> None:
    telemetry, sink = recording_telemetry()
    out = tmp_path / "run"
    config = safety_config(out_dir=out, checkpoint=CheckpointConfig(every_epochs=1, every_steps=4, keep_last=10))
    trainer: Trainer | None = None

    def drop_snapshots(record: StepRecord) -> None:
        # Just before the spike, the in-memory snapshots are gone (as after an eviction).
        assert trainer is not None
        if record.global_step == 11:
            trainer.guard.rollback.discard_snapshots()

    log = StepLog()
    trainer = make_trainer(
        config,
        objectives=LossFaults(regression_objectives, faults(spike=12)),
        telemetry=telemetry,
        step_callbacks=[drop_snapshots, log],
    )
    with trainer:
        result = trainer.fit()

    completed = sink.events("tolaria.rollback.completed")
    assert [(event.attributes["tier"], event.attributes["restored_step"]) for event in completed] == [("full", 12)]
    assert not result.halted, result.halt_reason
    assert len(result.epochs) == 3
    # The checkpoint of step 12 was written before epoch 1 batch 4 ran; batches 4 and 5 are skipped.
    spiked = log.positions.index((1, 4, 12))
    assert log.positions[spiked + 1] == (1, 6, 12)


def test_snapshots_resume_after_rollback() -> None:
    # The NaN at call 7 opens the episode (ELEVATED) after the snapshot of step 5, and the
    # snapshot of step 10 follows. The spike at call 14 (step 13) rolls back to step 5 and drops step 10.
    cached: list[tuple[int, tuple[int, ...]]] = []
    trainer: Trainer | None = None

    def watch(record: StepRecord) -> None:
        assert trainer is not None
        cached.append((record.global_step, trainer.guard.rollback.cached_steps))

    trainer = make_trainer(
        safety_config(), objectives=LossFaults(regression_objectives, faults(nan=7, spike=14)), step_callbacks=[watch]
    )
    with trainer:
        trainer.fit()

    assert trainer.guard.rollbacks == 1
    rollback = next(index for index in range(1, len(cached)) if cached[index][0] < cached[index - 1][0])
    # The spiked step's callback runs after the rollback dropped the snapshot of step 10.
    assert cached[rollback - 2] == (12, (0, 5, 10))
    assert cached[rollback - 1] == (13, (0, 5))
    # Back at step 5, snapshots are due every 5 steps again: step 10 is taken anew.
    steps_at_10 = next(steps for step, steps in cached[rollback:] if step == 10)
    assert 10 in steps_at_10, cached[rollback:]


def test_checkpoints_after_rollback_survive_rotation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = safety_config(out_dir=out, checkpoint=CheckpointConfig(every_epochs=1, every_steps=1, keep_last=2))
    # The NaN at call 7 opens the episode and the spike at call 14 (step 13) rolls back to
    # step 5. Checkpoints of steps 12 and 13 from the abandoned trajectory are on disk by then.
    on_disk: list[tuple[int, list[int]]] = []

    def list_steps(record: StepRecord) -> None:
        # A step callback runs before that step's checkpoint: the newest one is of `global_step`.
        folder = out / "checkpoints"
        on_disk.append((record.global_step, list(checkpoint.list_checkpoints(folder)) if folder.exists() else []))

    trainer = make_trainer(
        config, objectives=LossFaults(regression_objectives, faults(nan=7, spike=14)), step_callbacks=[list_steps]
    )
    with trainer:
        result = trainer.fit()

    assert trainer.guard.rollbacks == 1
    assert not result.halted
    rollback = next(index for index in range(1, len(on_disk)) if on_disk[index][0] < on_disk[index - 1][0])
    assert on_disk[rollback - 1] == (13, [12, 13])
    for step, steps in on_disk[rollback + 1 :]:
        # The checkpoint committed just before this step was not rotated away, and resuming
        # from this folder would continue the trajectory after the rollback.
        assert steps, step
        assert max(steps) == step, (step, steps)
