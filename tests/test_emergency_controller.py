"""Tests of ``EmergencyController`` with a real worker, real threads and real telemetry."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from tolaria.emergency import BroadcastReport, EmergencyController, LocalSignal, SharedMemorySignal
from tolaria.emergency_signals import SharedMemorySignalWatcher
from tolaria.functional.emergency import EmergencyPolicy, Level, StepSignals, Transition, TransitionKind
from tolaria.telemetry import InMemorySink, Telemetry
from tolaria.telemetry import Level as Severity
from tolaria.worker import AsyncWorker, TaskTimeout

POLICY = EmergencyPolicy(
    cooldown_steps=2,
    on_spike=((1, Level.NOTICE), (2, Level.ELEVATED)),
    on_nonfinite=((1, Level.CONSERVATIVE), (2, Level.HALT)),
)


class Recorder:
    """A listener that records every transition it receives."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.lock = threading.Lock()

    def __call__(self, transition: Transition) -> None:
        with self.lock:
            self.transitions.append(transition)


class BrokenListener(Exception):
    """Raised by the failing test listener."""


def failing_listener(transition: Transition) -> None:
    raise BrokenListener(f"cannot handle {transition.level.name}")


@pytest.fixture
def sink():
    return InMemorySink()


@pytest.fixture
def telemetry(sink):
    return Telemetry(sinks=[sink], source="test")


@pytest.fixture
def worker(telemetry):
    shared = AsyncWorker(max_concurrency=8, max_queue=16, name="test-emergency", telemetry=telemetry)
    yield shared
    shared.shutdown(timeout=2.0)


@pytest.fixture
def release():
    """An event that hanging listeners wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def urgent_events(sink: InMemorySink, name: str) -> list:
    return sink.events(name)


def test_observe_escalates_and_notifies(telemetry, worker, sink):
    recorder = Recorder()
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker, clock=lambda: 5.0)
    controller.add_listener(recorder, name="recorder")

    healthy = controller.observe(StepSignals(1))
    transition = controller.observe(StepSignals(2, spike=True))

    assert healthy is None
    assert transition == Transition(TransitionKind.ESCALATED, Level.NOMINAL, Level.NOTICE, "loss spikes: 1", 2, 5.0)
    assert recorder.transitions == [transition]
    assert controller.level is Level.NOTICE
    assert controller.max_level is Level.NOTICE
    assert controller.actions.record
    assert telemetry.counters["tolaria.emergency.escalations"] == 1
    assert telemetry.counters["tolaria.emergency.broadcasts"] == 1
    report = controller.last_broadcast
    assert report.delivered == ("recorder",)
    assert report.failed == ()
    assert report.transition == transition


def test_escalation_events_have_level_severity(telemetry, worker, sink):
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker)

    controller.observe(StepSignals(1, spike=True))
    controller.observe(StepSignals(2, nonfinite_loss=True))
    controller.observe(StepSignals(3, nonfinite_grad=True))

    # CRITICAL and ERROR events reach the sink at once; the rest wait for the flush.
    urgent = [(event.attributes["level"], event.level) for event in sink.events("tolaria.emergency.escalated")]
    assert urgent == [("CONSERVATIVE", Severity.ERROR), ("HALT", Severity.CRITICAL)]
    telemetry.flush(epoch=0, step=3)
    escalated = [(event.attributes["level"], event.level) for event in sink.events("tolaria.emergency.escalated")]
    assert ("NOTICE", Severity.INFO) in escalated
    assert controller.level is Level.HALT
    assert controller.actions.save_and_stop


def test_deescalates_after_cooldown(telemetry, worker, sink):
    recorder = Recorder()
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker)
    controller.add_listener(recorder)
    controller.observe(StepSignals(1, spike=True))

    controller.observe(StepSignals(2))
    lowered = controller.observe(StepSignals(3))

    assert lowered.kind is TransitionKind.DEESCALATED
    assert lowered.level is Level.NOMINAL
    assert [t.kind for t in recorder.transitions] == [TransitionKind.ESCALATED, TransitionKind.DEESCALATED]
    telemetry.flush(epoch=0, step=3)
    (event,) = sink.events("tolaria.emergency.deescalated")
    assert event.level is Severity.INFO
    assert event.attributes == {"previous": "NOTICE", "level": "NOMINAL", "reason": lowered.reason, "step": 3}
    assert telemetry.counters["tolaria.emergency.deescalations"] == 1


def test_manual_escalate_and_reset(telemetry, worker, sink):
    recorder = Recorder()
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker, step=10)
    controller.add_listener(recorder)
    controller.observe(StepSignals(12))

    raised = controller.escalate(Level.HALT, reason="operator stop")
    ignored = controller.escalate(Level.NOTICE, reason="lower")
    not_lowered = controller.deescalate(Level.NOMINAL, reason="try")
    reset = controller.reset(reason="operator resume", step=20)

    assert raised.step == 12
    assert raised.level is Level.HALT
    assert ignored is None
    assert not_lowered is None
    assert reset.kind is TransitionKind.RESET
    assert reset.previous is Level.HALT
    assert reset.step == 20
    assert controller.level is Level.NOMINAL
    assert controller.max_level is Level.HALT
    assert [t.kind for t in recorder.transitions] == [TransitionKind.ESCALATED, TransitionKind.RESET]
    telemetry.flush(epoch=0, step=20)
    (event,) = sink.events("tolaria.emergency.reset")
    assert event.level is Severity.WARNING
    assert event.attributes["reason"] == "operator resume"


def test_failing_listener_does_not_stop_others(telemetry, worker, sink, caplog):
    first, last = Recorder(), Recorder()
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker)
    controller.add_listener(first, name="first")
    controller.add_listener(failing_listener, name="broken")
    controller.add_listener(last, name="last")

    with caplog.at_level(logging.ERROR, logger="tolaria.emergency"):
        transition = controller.observe(StepSignals(1, spike=True))

    assert first.transitions == [transition]
    assert last.transitions == [transition]
    assert controller.broadcast_failures == 1
    assert telemetry.counters["tolaria.emergency.broadcast_failures"] == 1
    report = controller.last_broadcast
    assert set(report.delivered) == {"first", "last"}
    ((name, error),) = report.failed
    assert name == "broken"
    assert isinstance(error, BrokenListener)

    # The CRITICAL event is in the sink before any flush.
    (event,) = sink.events("tolaria.emergency.broadcast_failed")
    assert event.level is Severity.CRITICAL
    assert event.attributes["listener"] == "broken"
    assert event.attributes["error"] == "BrokenListener"
    assert event.attributes["message"] == "cannot handle NOTICE"
    assert event.attributes["timed_out"] is False

    (record,) = [r for r in caplog.records if r.name == "tolaria.emergency" and r.levelno == logging.ERROR]
    assert "'broken'" in record.getMessage()
    assert isinstance(record.exc_info[1], BrokenListener)


def test_hung_listener_times_out_without_blocking(telemetry, worker, sink, release):
    recorder = Recorder()
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker, broadcast_timeout_s=0.3)
    controller.add_listener(lambda transition: release.wait(30), name="hangs")
    controller.add_listener(recorder, name="recorder")

    started = time.monotonic()
    transition = controller.observe(StepSignals(1, spike=True))
    elapsed = time.monotonic() - started

    assert 0.25 <= elapsed < 2.5
    assert recorder.transitions == [transition]
    ((name, error),) = controller.last_broadcast.failed
    assert name == "hangs"
    assert isinstance(error, TaskTimeout)
    (event,) = sink.events("tolaria.emergency.broadcast_failed")
    assert event.attributes["listener"] == "hangs"
    assert event.attributes["timed_out"] is True

    # Training goes on: the next step returns at once.
    started = time.monotonic()
    assert controller.observe(StepSignals(2)) is None
    assert time.monotonic() - started < 1.0


def test_many_hung_listeners_share_one_deadline(telemetry, worker, release):
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker, broadcast_timeout_s=0.4)
    for index in range(5):
        controller.add_listener(lambda transition: release.wait(30), name=f"hangs-{index}")

    started = time.monotonic()
    controller.observe(StepSignals(1, spike=True))
    elapsed = time.monotonic() - started

    # One after another the five would take 2.0 s.
    assert elapsed < 1.5
    assert controller.broadcast_failures == 5
    assert telemetry.counters["tolaria.emergency.broadcast_failures"] == 5


def test_cooperative_listener_gets_cancelled_at_deadline(telemetry, worker):
    stopped = threading.Event()

    def patient(transition: Transition, cancel) -> None:
        cancel.wait(30)
        stopped.set()

    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker, broadcast_timeout_s=0.2)
    controller.add_listener(patient, name="patient")

    controller.observe(StepSignals(1, spike=True))

    assert stopped.wait(10)
    assert controller.broadcast_failures == 1


def test_coroutine_listener_is_awaited(telemetry, worker):
    received: list[Transition] = []

    async def listener(transition: Transition) -> None:
        await asyncio.sleep(0.01)
        received.append(transition)

    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker)
    controller.add_listener(listener)

    transition = controller.observe(StepSignals(1, spike=True))

    assert received == [transition]


def test_strict_raises_after_calling_every_listener(telemetry, worker):
    recorder = Recorder()
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker, strict=True)
    controller.add_listener(failing_listener, name="broken")
    controller.add_listener(recorder, name="recorder")

    with pytest.raises(ExceptionGroup, match=r"1 of 2 emergency listeners failed on escalated to NOTICE") as caught:
        controller.observe(StepSignals(1, spike=True))

    assert caught.group_contains(BrokenListener)
    assert len(recorder.transitions) == 1
    assert controller.level is Level.NOTICE
    assert telemetry.counters["tolaria.emergency.broadcast_failures"] == 1


def test_saturated_worker_is_reported(telemetry, sink, release):
    tiny = AsyncWorker(max_concurrency=1, max_queue=0, name="tiny", telemetry=telemetry)
    try:
        controller = EmergencyController(POLICY, telemetry=telemetry, worker=tiny, broadcast_timeout_s=0.3)
        controller.add_listener(lambda transition: release.wait(30), name="hangs")
        controller.add_listener(Recorder(), name="rejected")

        controller.observe(StepSignals(1, spike=True))

        failures = {name: type(error).__name__ for name, error in controller.last_broadcast.failed}
        assert failures == {"hangs": "TaskTimeout", "rejected": "WorkerSaturated"}
        listeners = {event.attributes["listener"] for event in sink.events("tolaria.emergency.broadcast_failed")}
        assert listeners == {"hangs", "rejected"}
    finally:
        release.set()
        tiny.shutdown(timeout=2.0)


def test_local_signal_follows_level(telemetry, worker):
    signal = LocalSignal()
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker, clock=lambda: 3.0)

    name = controller.add_signal(signal)
    initial = signal.read()
    controller.observe(StepSignals(1, spike=True))

    assert name == "signal:LocalSignal"
    assert initial.level is Level.NOMINAL
    assert initial.reason == "initial"
    assert initial.timestamp_s == 3.0
    reading = signal.read()
    assert reading.level is Level.NOTICE
    assert reading.reason == "loss spikes: 1"
    assert reading.timestamp_s == 3.0


def test_shared_signal_follows_level(telemetry, worker):
    with SharedMemorySignal() as signal, SharedMemorySignalWatcher(signal.name) as watcher:
        controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker)
        name = controller.add_signal(signal)

        controller.observe(StepSignals(1, nonfinite_loss=True))

        assert name == f"signal:{signal.name}"
        assert watcher.read().level is Level.CONSERVATIVE
        assert watcher.read().reason == "non-finite steps: 1"


def test_epoch_metrics(telemetry, worker):
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker)
    controller.observe(StepSignals(1, spike=True))
    controller.observe(StepSignals(2, spike=True))
    controller.observe(StepSignals(3))
    controller.observe(StepSignals(4))

    controller.emit_epoch_metrics()
    first = telemetry.flush(epoch=0, step=4)
    controller.emit_epoch_metrics()
    second = telemetry.flush(epoch=1, step=4)

    assert first.metric("tolaria.emergency.level").value == float(Level.NOTICE)
    assert first.metric("tolaria.emergency.max_level").value == float(Level.ELEVATED)
    assert first.metric("tolaria.emergency.escalation_count").value == 2.0
    assert first.metric("tolaria.emergency.broadcast_latency_ms").unit == "ms"
    assert second.metric("tolaria.emergency.max_level").value == float(Level.NOTICE)


def test_listener_registration_errors(telemetry, worker):
    controller = EmergencyController(POLICY, telemetry=telemetry, worker=worker)
    controller.add_listener(Recorder(), name="one")

    with pytest.raises(ValueError, match=r"a listener named 'one' is already registered; pass another name="):
        controller.add_listener(Recorder(), name="one")
    with pytest.raises(TypeError, match=r"listener must be callable, got int"):
        controller.add_listener(3)
    with pytest.raises(ValueError, match=r"no listener named 'two'; registered listeners are \['one'\]"):
        controller.remove_listener("two")

    controller.remove_listener("one")
    assert controller.listeners == ()


def test_invalid_arguments(telemetry, worker):
    with pytest.raises(ValueError, match=r"broadcast_timeout_s=0 is invalid; expected seconds > 0"):
        EmergencyController(telemetry=telemetry, worker=worker, broadcast_timeout_s=0)
    controller = EmergencyController(telemetry=telemetry, worker=worker)
    with pytest.raises(ValueError, match=r"level=8 is not an emergency level"):
        controller.escalate(8, reason="x")
    with pytest.raises(ValueError, match=r"signals.step=-1 is invalid"):
        controller.observe(StepSignals(-1))
    with pytest.raises(ValueError, match=r"signals=\(1, True\) is invalid; expected StepSignals"):
        controller.observe((1, True))


def test_closed_signal_is_not_registered(telemetry, worker):
    controller = EmergencyController(telemetry=telemetry, worker=worker)
    signal = SharedMemorySignal()
    signal.close()

    with pytest.raises(ValueError, match=r"shared signal .* is closed"):
        controller.add_signal(signal)

    assert controller.listeners == ()


def test_closed_controller_rejects_transitions(telemetry):
    controller = EmergencyController(telemetry=telemetry)
    worker = controller._worker

    controller.close()
    controller.close()

    assert worker.closed
    with pytest.raises(RuntimeError, match=r"the emergency controller is closed"):
        controller.observe(StepSignals(1))


def test_shared_worker_is_not_shut_down(telemetry, worker):
    with EmergencyController(telemetry=telemetry, worker=worker) as controller:
        controller.observe(StepSignals(1, spike=True))

    assert not worker.closed


def test_concurrent_escalations_reach_listeners_in_order(telemetry, worker):
    recorder = Recorder()
    controller = EmergencyController(EmergencyPolicy(), telemetry=telemetry, worker=worker)
    controller.add_listener(recorder)
    barrier = threading.Barrier(4)

    def raise_to(level: Level) -> None:
        barrier.wait()
        controller.escalate(level, reason=level.name)

    threads = [threading.Thread(target=raise_to, args=(level,)) for level in list(Level)[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    levels = [transition.level for transition in recorder.transitions]
    assert levels == sorted(levels)
    assert levels[-1] is Level.HALT
    assert isinstance(controller.last_broadcast, BroadcastReport)
