"""ControlLoop.run_epoch with a real worker, a real optimizer and controllers that hang or fail."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch
from polling import wait_until

from tolaria.control import (
    AdaptationCommand,
    ControlLoop,
    ControlStatus,
    EpochState,
    FaultPlan,
    OptimizerExecutor,
    PlateauPolicy,
)
from tolaria.functional.breaker import BreakerPhase, BreakerPolicy
from tolaria.telemetry import InMemorySink, Level, Telemetry
from tolaria.worker import AsyncWorker, WorkerClosed

TIMEOUT_S = 0.2
# Deadline plus the worker's lateness and the loop's own work, on a busy machine.
MARGIN_S = 0.1


class FakeClock:
    """A clock the test moves by hand; it drives breaker cooldowns."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingTamiyo:
    """A controller that counts its calls and returns ``command`` (or a fresh noop)."""

    def __init__(self, command: AdaptationCommand | None = None) -> None:
        self.calls = 0
        self.command = command

    def evaluate_epoch(self, state: EpochState) -> AdaptationCommand:
        self.calls += 1
        return self.command or AdaptationCommand.noop(epoch=state.epoch)


@pytest.fixture
def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)


@pytest.fixture
def telemetry():
    return Telemetry([InMemorySink()])


@pytest.fixture
def worker(telemetry):
    worker = AsyncWorker(name="control-worker", telemetry=telemetry)
    yield worker
    worker.shutdown(timeout=2.0)




def events(telemetry: Telemetry, name: str) -> list:
    telemetry.flush(0, 0)
    (sink,) = telemetry.sinks
    return sink.events(name)


def epoch_state(epoch: int, loss: float = 1.0, **fields) -> EpochState:
    return EpochState(epoch, epoch * 10, val_loss={"digit": loss}, learning_rates=(0.1,), **fields)


def make_loop(tamiyo, kasmina, worker, telemetry, **overrides) -> ControlLoop:
    arguments = {
        "tamiyo_timeout_s": TIMEOUT_S,
        "kasmina_timeout_s": TIMEOUT_S,
        "breaker_policy": BreakerPolicy(failure_threshold=2, cooldown_s=30.0),
        "telemetry": telemetry,
    }
    arguments.update(overrides)
    return ControlLoop(tamiyo, kasmina, worker, **arguments)


def test_plateau_command_is_applied(worker, telemetry, optimizer):
    loop = make_loop(PlateauPolicy(patience=1), OptimizerExecutor(optimizer), worker, telemetry)
    first = loop.run_epoch(epoch_state(0, 1.0))
    assert first.status is ControlStatus.APPLIED
    assert first.command.kind == "noop"
    assert optimizer.param_groups[0]["lr"] == 0.1

    second = loop.run_epoch(epoch_state(1, 1.0))
    assert second.status is ControlStatus.APPLIED
    assert second.command.kind == "adjust_lr"
    assert second.effective_command is second.command
    assert second.stage is None
    assert second.tamiyo_latency_s >= 0
    assert second.kasmina_latency_s >= 0
    assert not second.conservative
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)

    applied = events(telemetry, "tolaria.command.applied")
    assert [event.attributes["kind"] for event in applied] == ["noop", "adjust_lr"]
    assert applied[1].attributes["command_id"] == "plateau-e1"
    assert telemetry.counters["tolaria.control.tamiyo.successes"] == 2


def test_hanging_tamiyo_times_out_into_conservative_mode(worker, telemetry, optimizer):
    plan = FaultPlan.parse(["tamiyo-hang@0"])
    loop = make_loop(plan.wrap_tamiyo(PlateauPolicy()), OptimizerExecutor(optimizer), worker, telemetry)

    started = time.monotonic()
    outcome = loop.run_epoch(epoch_state(0))
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S

    assert outcome.status is ControlStatus.TIMED_OUT
    assert outcome.stage == "tamiyo"
    assert outcome.command is None
    assert outcome.error_type == "TaskTimeout"
    assert outcome.conservative
    assert outcome.entered_conservative
    assert outcome.effective_command.kind == "noop"
    assert loop.conservative
    assert "timed out" in loop.conservative_reason

    (warning,) = events(telemetry, "timeout_inference")
    assert warning.level.name == "WARNING"
    assert warning.attributes["task"] == "tamiyo.evaluate_epoch"
    assert warning.attributes["timeout_s"] == TIMEOUT_S
    assert warning.attributes["elapsed_s"] >= TIMEOUT_S
    assert warning.attributes["error"] == "TaskTimeout"
    assert telemetry.counters["tolaria.timeout.tamiyo"] == 1
    assert len(events(telemetry, "tolaria.conservative_mode.entered")) == 1
    # The worker shares the loop's telemetry, so the cancellation is reported once, by the
    # worker's loop just after the caller was released.
    assert wait_until(lambda: telemetry.event_counts.get("tolaria.timeout.cancelled") == 1)
    time.sleep(0.05)
    assert len(events(telemetry, "tolaria.timeout.cancelled")) == 1


def test_uncooperative_tamiyo_does_not_block(worker, telemetry, optimizer):
    release = threading.Event()

    class SleepyTamiyo:
        def evaluate_epoch(self, state):
            release.wait(30.0)
            return AdaptationCommand.noop(epoch=state.epoch)

    loop = make_loop(SleepyTamiyo(), OptimizerExecutor(optimizer), worker, telemetry)
    started = time.monotonic()
    outcome = loop.run_epoch(epoch_state(0))
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    assert outcome.status is ControlStatus.TIMED_OUT
    assert wait_until(lambda: worker.stats().abandoned == 1)
    release.set()


def test_cancelled_event_when_worker_reports_elsewhere(telemetry, optimizer):
    with AsyncWorker(name="separate-telemetry") as worker:
        plan = FaultPlan.parse(["tamiyo-hang@0"])
        loop = make_loop(plan.wrap_tamiyo(PlateauPolicy()), OptimizerExecutor(optimizer), worker, telemetry)
        loop.run_epoch(epoch_state(0))
    (cancelled,) = events(telemetry, "tolaria.timeout.cancelled")
    assert cancelled.attributes["task"] == "tamiyo.evaluate_epoch"


def test_failing_tamiyo_is_logged_emitted_and_counted(worker, telemetry, optimizer, caplog):
    plan = FaultPlan.parse(["tamiyo-error@0"])
    loop = make_loop(plan.wrap_tamiyo(PlateauPolicy()), OptimizerExecutor(optimizer), worker, telemetry)
    with caplog.at_level(logging.ERROR, logger="tolaria.control"):
        outcome = loop.run_epoch(epoch_state(0))

    assert outcome.status is ControlStatus.FAILED
    assert outcome.error_type == "InjectedFault"
    assert "injected tamiyo-error at epoch 0" in outcome.reason
    assert outcome.conservative
    (warning,) = events(telemetry, "timeout_inference")
    assert warning.attributes["error"] == "InjectedFault"
    assert telemetry.counters["tolaria.control.tamiyo.failures"] == 1
    assert any(record.exc_info and "tamiyo call failed" in record.message for record in caplog.records)


def test_tamiyo_returning_wrong_type_fails(worker, telemetry, optimizer):
    class WrongTamiyo:
        def evaluate_epoch(self, state):
            return {"kind": "noop"}

    outcome = make_loop(WrongTamiyo(), OptimizerExecutor(optimizer), worker, telemetry).run_epoch(epoch_state(0))
    assert outcome.status is ControlStatus.FAILED
    assert outcome.reason == "evaluate_epoch returned dict; expected an AdaptationCommand"


def test_coroutine_tamiyo_is_awaited(worker, telemetry, optimizer):
    class AsyncTamiyo:
        async def evaluate_epoch(self, state):
            await asyncio.sleep(0.001)
            return AdaptationCommand.adjust_lr(factor=0.5, epoch=state.epoch)

    outcome = make_loop(AsyncTamiyo(), OptimizerExecutor(optimizer), worker, telemetry).run_epoch(epoch_state(0))
    assert outcome.status is ControlStatus.APPLIED
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_rejected_command_changes_nothing(worker, telemetry, optimizer):
    tamiyo = CountingTamiyo(AdaptationCommand("bad-1", "adjust_lr", {"factor": -2.0}, "try", 0))
    loop = make_loop(tamiyo, OptimizerExecutor(optimizer), worker, telemetry)
    outcome = loop.run_epoch(epoch_state(0))

    assert outcome.status is ControlStatus.REJECTED
    assert outcome.stage == "kasmina"
    assert outcome.error_type == "CommandRejected"
    assert outcome.reason == "adjust_lr parameter factor=-2.0 must be a finite number > 0"
    assert not outcome.conservative
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert loop.breakers["kasmina"].phase is BreakerPhase.CLOSED
    (rejected,) = events(telemetry, "tolaria.command.rejected")
    assert rejected.attributes["command_id"] == "bad-1"
    assert rejected.attributes["reason"] == outcome.reason
    assert telemetry.counters["tolaria.command.rejected"] == 1


def test_hanging_kasmina_times_out_without_applying(worker, telemetry, optimizer):
    plan = FaultPlan.parse(["kasmina-hang@0"])
    tamiyo = CountingTamiyo(AdaptationCommand.adjust_lr(factor=0.5, epoch=0))
    loop = make_loop(tamiyo, plan.wrap_kasmina(OptimizerExecutor(optimizer)), worker, telemetry)

    started = time.monotonic()
    outcome = loop.run_epoch(epoch_state(0))
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
    assert outcome.status is ControlStatus.TIMED_OUT
    assert outcome.stage == "kasmina"
    assert outcome.command.kind == "adjust_lr"
    assert outcome.conservative
    assert telemetry.counters["tolaria.timeout.kasmina"] == 1
    (failed,) = events(telemetry, "tolaria.command.failed")
    assert failed.attributes["status"] == "timed_out"
    # The hang stops at its token, before the executor changes anything.
    time.sleep(0.05)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_open_breaker_skips_tamiyo_until_cooldown(worker, telemetry, optimizer):
    clock = FakeClock()
    broken_epochs = {0, 1}

    class FlakyTamiyo(CountingTamiyo):
        def evaluate_epoch(self, state):
            self.calls += 1
            if state.epoch in broken_epochs:
                raise RuntimeError("controller down")
            return AdaptationCommand.noop(epoch=state.epoch)

    tamiyo = FlakyTamiyo()
    loop = make_loop(tamiyo, OptimizerExecutor(optimizer), worker, telemetry, clock=clock)

    assert loop.run_epoch(epoch_state(0)).entered_conservative
    assert loop.run_epoch(epoch_state(1)).status is ControlStatus.FAILED
    assert loop.breakers["tamiyo"].phase is BreakerPhase.OPEN

    clock.now += 10.0
    skipped = loop.run_epoch(epoch_state(2))
    assert skipped.status is ControlStatus.SKIPPED_CONSERVATIVE
    assert skipped.tamiyo_latency_s is None
    assert skipped.reason.startswith("the tamiyo circuit breaker is open")
    assert tamiyo.calls == 2

    clock.now += 30.0
    recovered = loop.run_epoch(epoch_state(3))
    assert recovered.status is ControlStatus.APPLIED
    assert recovered.exited_conservative
    assert not loop.conservative
    assert tamiyo.calls == 3
    assert loop.breakers["tamiyo"].phase is BreakerPhase.CLOSED

    (exited,) = events(telemetry, "tolaria.conservative_mode.exited")
    assert exited.attributes["reason"]
    phases = [
        (event.attributes["previous"], event.attributes["phase"])
        for event in events(telemetry, "tolaria.breaker.changed")
    ]
    assert phases == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert telemetry.counters["tolaria.control.conservative_epochs"] == 3


def test_half_open_probe_command_is_not_applied(worker, telemetry, optimizer):
    clock = FakeClock()
    tamiyo = CountingTamiyo(AdaptationCommand.adjust_lr(factor=0.5))
    plan = FaultPlan.parse(["tamiyo-error@0"])
    policy = BreakerPolicy(failure_threshold=1, cooldown_s=1.0, half_open_probes=2, success_threshold=2)
    loop = make_loop(
        plan.wrap_tamiyo(tamiyo), OptimizerExecutor(optimizer), worker, telemetry, clock=clock, breaker_policy=policy
    )

    assert loop.run_epoch(epoch_state(0)).status is ControlStatus.FAILED
    clock.now += 1.0
    probe = loop.run_epoch(epoch_state(1))
    assert probe.status is ControlStatus.SKIPPED_CONSERVATIVE
    assert "half-open" in probe.reason
    assert optimizer.param_groups[0]["lr"] == 0.1

    closing = loop.run_epoch(epoch_state(2))
    assert closing.status is ControlStatus.APPLIED
    assert closing.exited_conservative
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_emergency_level_suppresses_commands(worker, telemetry, optimizer):
    tamiyo = CountingTamiyo(AdaptationCommand.adjust_lr(factor=0.5))
    loop = make_loop(tamiyo, OptimizerExecutor(optimizer), worker, telemetry)

    held = loop.run_epoch(epoch_state(0, emergency_level=3))
    assert held.status is ControlStatus.SKIPPED_CONSERVATIVE
    assert held.command.kind == "adjust_lr"
    assert held.reason == "emergency level 3 >= 3: commands are not applied"
    assert held.entered_conservative
    assert optimizer.param_groups[0]["lr"] == 0.1

    resumed = loop.run_epoch(epoch_state(1, emergency_level=0))
    assert resumed.status is ControlStatus.APPLIED
    assert resumed.exited_conservative


def test_worker_gauges_reported(worker, telemetry, optimizer):
    loop = make_loop(PlateauPolicy(), OptimizerExecutor(optimizer), worker, telemetry)
    loop.run_epoch(epoch_state(0))
    packet = telemetry.flush(0, 0)
    names = {metric.name for metric in packet.metrics}
    assert {
        "tolaria.worker.in_flight",
        "tolaria.worker.abandoned_running",
        "tolaria.worker.queue_depth",
        "tolaria.worker.still_cancelling",
        "tolaria.control.tamiyo.latency_ms",
        "tolaria.control.kasmina.latency_ms",
    } <= names


def test_closed_worker_raises(telemetry, optimizer):
    worker = AsyncWorker(name="closed-control")
    worker.shutdown()
    loop = make_loop(PlateauPolicy(), OptimizerExecutor(optimizer), worker, telemetry)
    with pytest.raises(WorkerClosed):
        loop.run_epoch(epoch_state(0))


def test_run_epoch_rejects_other_state(worker, telemetry, optimizer):
    loop = make_loop(PlateauPolicy(), OptimizerExecutor(optimizer), worker, telemetry)
    with pytest.raises(TypeError, match="state must be an EpochState, got dict"):
        loop.run_epoch({"epoch": 0})


@pytest.mark.parametrize("name", ["tamiyo_timeout_s", "kasmina_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), True])
def test_constructor_rejects_bad_timeouts(worker, telemetry, optimizer, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number of seconds > 0"):
        make_loop(PlateauPolicy(), OptimizerExecutor(optimizer), worker, telemetry, **{name: value})


class HalvingTamiyo(CountingTamiyo):
    """A controller that returns a command to halve the learning rate at every epoch."""

    def evaluate_epoch(self, state: EpochState) -> AdaptationCommand:
        self.calls += 1
        return AdaptationCommand.adjust_lr(factor=0.5, epoch=state.epoch)


class CountingKasmina:
    """An executor that counts its calls and passes each command to ``inner``."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls = 0

    def apply_command(self, command: AdaptationCommand, cancel=None) -> None:
        self.calls += 1
        self.inner.apply_command(command, cancel)


def failing_kasmina_loop(worker, telemetry, optimizer, clock):
    """Return a loop, its controller and its executor; the executor fails at epochs 0 and 1.

    ``make_loop`` sets ``failure_threshold=2``, so the second failure opens the executor's breaker.
    """
    plan = FaultPlan.parse(["kasmina-error@0", "kasmina-error@1"])
    tamiyo = HalvingTamiyo()
    kasmina = CountingKasmina(plan.wrap_kasmina(OptimizerExecutor(optimizer)))
    return make_loop(tamiyo, kasmina, worker, telemetry, clock=clock), tamiyo, kasmina


def test_kasmina_failures_open_its_breaker(worker, telemetry, optimizer):
    loop, _, _ = failing_kasmina_loop(worker, telemetry, optimizer, FakeClock())

    first = loop.run_epoch(epoch_state(0))
    assert first.status is ControlStatus.FAILED
    assert first.stage == "kasmina"
    assert loop.breakers["kasmina"].phase is BreakerPhase.CLOSED
    assert "tolaria.breaker.kasmina.opened" not in telemetry.counters

    second = loop.run_epoch(epoch_state(1))
    assert second.error_type == "InjectedFault"
    assert loop.breakers["kasmina"].phase is BreakerPhase.OPEN
    assert loop.breakers["tamiyo"].phase is BreakerPhase.CLOSED
    assert telemetry.counters["tolaria.breaker.kasmina.opened"] == 1
    assert "tolaria.breaker.tamiyo.opened" not in telemetry.counters


def test_kasmina_breaker_opening_is_reported(worker, telemetry, optimizer, caplog):
    loop, _, _ = failing_kasmina_loop(worker, telemetry, optimizer, FakeClock())
    with caplog.at_level(logging.WARNING, logger="tolaria.control"):
        loop.run_epoch(epoch_state(0))
        loop.run_epoch(epoch_state(1))

    (opened,) = events(telemetry, "tolaria.breaker.changed")
    assert opened.level == Level.WARNING
    assert opened.attributes["client"] == "kasmina"
    assert opened.attributes["previous"] == "closed"
    assert opened.attributes["phase"] == "open"
    assert opened.attributes["epoch"] == 1
    assert opened.attributes["reason"].startswith("2 consecutive failures or timeouts")
    assert telemetry.counters["tolaria.control.kasmina.failures"] == 2
    assert any("kasmina circuit breaker CLOSED -> OPEN" in record.message for record in caplog.records)


def test_open_kasmina_breaker_skips_executor(worker, telemetry, optimizer):
    clock = FakeClock()
    loop, tamiyo, kasmina = failing_kasmina_loop(worker, telemetry, optimizer, clock)
    loop.run_epoch(epoch_state(0))
    loop.run_epoch(epoch_state(1))

    # The controller still runs while the executor's breaker is open.
    clock.now += 10.0
    skipped = loop.run_epoch(epoch_state(2))
    assert skipped.status is ControlStatus.SKIPPED_CONSERVATIVE
    assert skipped.stage == "kasmina"
    assert skipped.reason.startswith("the kasmina circuit breaker is open")
    assert skipped.kasmina_latency_s is None
    assert skipped.conservative
    assert tamiyo.calls == 3
    assert kasmina.calls == 2
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_kasmina_breaker_closes_after_cooldown(worker, telemetry, optimizer):
    clock = FakeClock()
    loop, _, kasmina = failing_kasmina_loop(worker, telemetry, optimizer, clock)
    loop.run_epoch(epoch_state(0))
    loop.run_epoch(epoch_state(1))

    # After the cooldown one probe call is admitted, and its success closes the breaker.
    clock.now += 30.0
    recovered = loop.run_epoch(epoch_state(2))
    assert recovered.status is ControlStatus.APPLIED
    assert recovered.exited_conservative
    assert loop.breakers["kasmina"].phase is BreakerPhase.CLOSED
    assert kasmina.calls == 3
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert telemetry.counters["tolaria.breaker.kasmina.opened"] == 1
    phases = [
        (event.attributes["client"], event.attributes["previous"], event.attributes["phase"])
        for event in events(telemetry, "tolaria.breaker.changed")
    ]
    assert phases == [
        ("kasmina", "closed", "open"),
        ("kasmina", "open", "half_open"),
        ("kasmina", "half_open", "closed"),
    ]
