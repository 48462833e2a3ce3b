"""The Trainer's end-of-epoch control loop with controllers that hang, recover or misbehave.

Real models, a real ``AsyncWorker`` with real threads, and real timeouts: every
epoch must end within the controller timeout plus a margin, whatever the
controller does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from trainer_cases import StepLog, make_trainer, recording_telemetry

from tolaria import TrainerConfig
from tolaria.control import AdaptationCommand, EpochState, PlateauPolicy
from tolaria.results import EpochMetrics
from tolaria.settings import ControlConfig
from tolaria.telemetry import Level
from tolaria.worker import AsyncWorker, CancelToken, WorkerClosed

TIMEOUT_S = 0.2
# The controller's deadline plus worker lateness, the executor call and telemetry on a busy 2-core machine.
MARGIN_S = 0.6
# An uncooperative hang outlasts the test, yet its daemon thread ends soon after.
SLEEP_S = 5.0


def control_config(epochs: int) -> TrainerConfig:
    return TrainerConfig(
        epochs=epochs,
        device="cpu",
        aggregator="mean",
        control=ControlConfig(tamiyo_timeout_s=TIMEOUT_S, kasmina_timeout_s=TIMEOUT_S),
    )


class EpochClock:
    """An epoch callback that notes when the control loop of each epoch was done."""

    def __init__(self) -> None:
        self.done_s: list[float] = []
        self.metrics: list[EpochMetrics] = []

    def __call__(self, metrics: EpochMetrics) -> None:
        self.done_s.append(time.monotonic())
        self.metrics.append(metrics)


class CooperativeHang:
    """A controller that waits on its ``CancelToken`` in the chosen epochs (all when ``None``)."""

    def __init__(self, hang_epochs: set[int] | None = None) -> None:
        self.hang_epochs = hang_epochs
        self.entered_s: dict[int, float] = {}
        self.cancelled: list[int] = []

    def evaluate_epoch(self, state: EpochState, cancel: CancelToken) -> AdaptationCommand:
        self.entered_s[state.epoch] = time.monotonic()
        if self.hang_epochs is None or state.epoch in self.hang_epochs:
            cancel.wait(3600.0)
            self.cancelled.append(state.epoch)
            cancel.raise_if_cancelled()
        return AdaptationCommand.noop(epoch=state.epoch, reason="recovered")


class SleepingHang:
    """A controller that ignores cancellation: ``time.sleep`` in the chosen epochs (all when ``None``)."""

    def __init__(self, hang_epochs: set[int] | None = None) -> None:
        self.hang_epochs = hang_epochs
        self.entered_s: dict[int, float] = {}

    def evaluate_epoch(self, state: EpochState) -> AdaptationCommand:
        self.entered_s[state.epoch] = time.monotonic()
        if self.hang_epochs is None or state.epoch in self.hang_epochs:
            time.sleep(SLEEP_S)
        return AdaptationCommand.adjust_lr(factor=0.5, epoch=state.epoch, reason="recovered")


class UnknownKind:
    """A controller that requests a command kind that no executor supports."""

    def evaluate_epoch(self, state: EpochState) -> AdaptationCommand:
        return AdaptationCommand(f"grow-e{state.epoch}", "grow_seed", {"blocks": 2}, "try a bigger model", state.epoch)


@pytest.fixture
def worker() -> Iterator[AsyncWorker]:
    with AsyncWorker(name="test-control") as shared:
        yield shared


def assert_control_bounded(tamiyo: CooperativeHang | SleepingHang, clock: EpochClock) -> None:
    """Each epoch's control loop ended within the timeout plus the margin after the controller was called."""
    assert sorted(tamiyo.entered_s) == list(range(len(clock.done_s)))
    for epoch, done in enumerate(clock.done_s):
        assert done - tamiyo.entered_s[epoch] < TIMEOUT_S + MARGIN_S, (epoch, done - tamiyo.entered_s[epoch])


@pytest.mark.parametrize("hang", [CooperativeHang, SleepingHang], ids=["cooperative", "sleep"])
def test_hanging_tamiyo_bounded_and_conservative(hang: type[CooperativeHang] | type[SleepingHang]) -> None:
    telemetry, sink = recording_telemetry()
    tamiyo = hang()
    clock = EpochClock()
    trainer = make_trainer(control_config(3), telemetry=telemetry, tamiyo=tamiyo, callbacks=[clock])
    with trainer:
        started = time.monotonic()
        result = trainer.fit()
        elapsed = time.monotonic() - started

    assert len(result.epochs) == 3
    assert not result.halted
    assert_control_bounded(tamiyo, clock)
    # Three hangs cost three timeouts, not three sleeps.
    assert elapsed < SLEEP_S

    timeouts = sink.events("timeout_inference")
    assert len(timeouts) == 3
    for event in timeouts:
        assert event.level == Level.WARNING
        assert event.attributes["status"] == "timed_out"
        assert event.attributes["timeout_s"] == TIMEOUT_S
        assert TIMEOUT_S * 0.9 <= event.attributes["elapsed_s"] < TIMEOUT_S + MARGIN_S
    assert telemetry.counters["tolaria.timeout.tamiyo"] == 3
    entered = sink.events("tolaria.conservative_mode.entered")
    assert [event.attributes["epoch"] for event in entered] == [0]
    assert sink.events("tolaria.conservative_mode.exited") == []
    assert trainer.control is not None
    assert trainer.control.conservative_epochs == 3
    assert sink.events("tolaria.command.applied") == []
    if isinstance(tamiyo, CooperativeHang):
        assert tamiyo.cancelled == [0, 1, 2]
    else:
        assert trainer.worker.stats().abandoned == 3


@pytest.mark.parametrize("hang", [CooperativeHang, SleepingHang], ids=["cooperative", "sleep"])
def test_conservative_mode_exits_when_tamiyo_recovers(hang: type[CooperativeHang] | type[SleepingHang]) -> None:
    telemetry, sink = recording_telemetry()
    tamiyo = hang({1, 2})
    clock = EpochClock()
    trainer = make_trainer(control_config(5), telemetry=telemetry, tamiyo=tamiyo, callbacks=[clock])
    with trainer:
        result = trainer.fit()

    assert len(result.epochs) == 5
    assert_control_bounded(tamiyo, clock)
    assert [event.attributes["epoch"] for event in sink.events("timeout_inference")] == [1, 2]
    entered = sink.events("tolaria.conservative_mode.entered")
    exited = sink.events("tolaria.conservative_mode.exited")
    assert [event.attributes["epoch"] for event in entered] == [1]
    assert [event.attributes["epoch"] for event in exited] == [3]
    assert entered[0].sequence < exited[0].sequence
    assert "timed out" in entered[0].attributes["reason"]
    assert trainer.control is not None
    assert trainer.control.conservative_epochs == 2
    applied = sink.events("tolaria.command.applied")
    assert [event.attributes["epoch"] for event in applied] == [0, 3, 4]


def test_plateau_adjust_lr_applied_through_executor() -> None:
    telemetry, sink = recording_telemetry()
    log = StepLog()
    # With min_delta far above any loss, only the first epoch improves: every later epoch is a plateau.
    tamiyo = PlateauPolicy(patience=1, factor=0.5, min_delta=1e9)
    trainer = make_trainer(control_config(3), telemetry=telemetry, tamiyo=tamiyo, step_callbacks=[log])
    with trainer:
        result = trainer.fit()

    lr = 1e-2
    assert [metrics.learning_rates for metrics in result.epochs] == [(lr,), (lr,), (lr * 0.5,)]
    assert trainer.optimizer.param_groups[0]["lr"] == lr * 0.25
    applied = sink.events("tolaria.command.applied")
    assert [(event.attributes["epoch"], event.attributes["kind"]) for event in applied] == [
        (0, "noop"),
        (1, "adjust_lr"),
        (2, "adjust_lr"),
    ]
    assert telemetry.counters["tolaria.command.applied"] == 3
    assert sink.events("tolaria.command.rejected") == []


def test_unknown_command_rejected_and_nothing_applied() -> None:
    telemetry, sink = recording_telemetry()
    trainer = make_trainer(control_config(2), telemetry=telemetry, tamiyo=UnknownKind())
    with trainer:
        result = trainer.fit()

    assert len(result.epochs) == 2
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-2
    rejected = sink.events("tolaria.command.rejected")
    assert [event.attributes["epoch"] for event in rejected] == [0, 1]
    for event in rejected:
        assert event.level == Level.WARNING
        assert event.attributes["kind"] == "grow_seed"
        assert "unknown command kind 'grow_seed'" in event.attributes["reason"]
    assert sink.events("tolaria.command.applied") == []
    # A rejected command is the controller's mistake, not a fault of the loop: no conservative mode.
    assert sink.events("tolaria.conservative_mode.entered") == []


def test_user_worker_survives_trainer_close(worker: AsyncWorker) -> None:
    trainer = make_trainer(control_config(1), tamiyo=CooperativeHang({0}), worker=worker)
    with trainer:
        trainer.fit()

    assert trainer.worker is worker
    assert not worker.closed
    assert worker.submit(lambda: 41 + 1, timeout=5.0).result() == 42


def test_owned_worker_shut_down_by_close() -> None:
    trainer = make_trainer(control_config(1), tamiyo=CooperativeHang({0}))
    with trainer:
        trainer.fit()
        assert not trainer.worker.closed

    assert trainer.worker.closed
    with pytest.raises(WorkerClosed):
        trainer.worker.submit(lambda: None)
    names = {thread.name for thread in threading.enumerate() if not thread.daemon}
    assert not any(name.startswith("tolaria-trainer") for name in names), names
