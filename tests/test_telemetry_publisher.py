"""Tests of the telemetry publisher and its delivery: packets, pressure, failing and hung sinks."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tolaria.telemetry import (
    DeliveryPolicy,
    InMemorySink,
    JsonlSink,
    Level,
    Telemetry,
    TelemetryPacket,
    TelemetrySinkError,
    read_jsonl,
)
from tolaria.telemetry.publisher import DROP_SUMMARY, DROPPED, SINK_FAILED, SINK_FAILURES, SINK_RECOVERED

ITEM = "tolaria.test.item"


class SlowSink:
    """Records packets after sleeping ``delay_s`` per write, like a slow disk or exporter."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.packets: list[TelemetryPacket] = []
        self.closed = False

    def write(self, packet: TelemetryPacket) -> None:
        time.sleep(self.delay_s)
        self.packets.append(packet)

    def close(self) -> None:
        self.closed = True


class FlakySink:
    """Raises ``OSError(ENOSPC)`` for the first ``failures`` writes, then records packets."""

    def __init__(self, failures: int) -> None:
        self.failures_left = failures
        self.attempts = 0
        self.packets: list[TelemetryPacket] = []

    def write(self, packet: TelemetryPacket) -> None:
        self.attempts += 1
        if self.failures_left > 0:
            self.failures_left -= 1
            raise OSError(28, "No space left on device")
        self.packets.append(packet)

    def close(self) -> None:
        return None


class HungSink:
    """Blocks in ``write`` until ``release`` is set, like an unreachable exporter."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, packet: TelemetryPacket) -> None:
        del packet
        self.entered.set()
        self.release.wait(60.0)

    def close(self) -> None:
        return None


@pytest.fixture
def hung_sink() -> Iterator[HungSink]:
    sink = HungSink()
    yield sink
    # Let the abandoned writer thread finish so it does not outlive the test.
    sink.release.set()


def fast_retry_policy(**overrides: float) -> DeliveryPolicy:
    settings: dict[str, float] = {"retry_initial_s": 0.01, "retry_max_s": 0.02, **overrides}
    return DeliveryPolicy(**settings)  # type: ignore[arg-type]


def test_flush_packet_contents() -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink], source="trainer", attributes={"job": "digits"}, run_id="run-1", rank=3)
    telemetry.set_health(emergency_level="NOMINAL")
    telemetry.metric("tolaria.train.loss", 0.25, "1", objective="digit")
    telemetry.count("tolaria.anomaly.nonfinite")
    telemetry.count("tolaria.anomaly.nonfinite", 2)
    telemetry.event("tolaria.rollback.started", Level.WARNING, reason="spike", step=12)

    packet = telemetry.flush(4, 120)

    assert sink.packets == [packet]
    assert (packet.source, packet.epoch, packet.step, packet.run_id, packet.rank) == ("trainer", 4, 120, "run-1", 3)
    assert packet.attributes == {"job": "digits"}
    assert packet.priority == Level.WARNING
    assert packet.health == {"emergency_level": "NOMINAL", "telemetry": "ok"}
    loss = packet.metrics[0]
    assert (loss.name, loss.value, loss.unit, dict(loss.attributes), loss.kind) == (
        "tolaria.train.loss",
        0.25,
        "1",
        {"objective": "digit"},
        "gauge",
    )
    total = packet.metric("tolaria.anomaly.nonfinite")
    assert total is not None
    assert (total.value, total.kind) == (3.0, "counter")
    assert [event.name for event in packet.events] == ["tolaria.rollback.started"]
    assert packet.events[0].attributes == {"reason": "spike", "step": 12}


def test_flush_empties_buffers_but_keeps_counter_totals() -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    telemetry.metric("tolaria.optim.lr", 0.1)
    telemetry.count("tolaria.timeout.tamiyo")
    telemetry.flush(0, 10)

    second = telemetry.flush(1, 20)

    assert [metric.name for metric in second.metrics] == ["tolaria.timeout.tamiyo"]
    assert second.events == ()
    assert second.priority == Level.INFO


def test_error_events_leave_before_flush() -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    telemetry.set_position(2, 57)
    telemetry.event("tolaria.anomaly.spike", Level.WARNING)

    telemetry.event("tolaria.rollback.failed", Level.ERROR, reason="deadline", error="TaskTimeout")
    telemetry.event("tolaria.emergency.broadcast_failed", Level.CRITICAL, listener="pager")

    assert [packet.priority for packet in sink.packets] == [Level.ERROR, Level.CRITICAL]
    assert [packet.events[0].name for packet in sink.packets] == [
        "tolaria.rollback.failed",
        "tolaria.emergency.broadcast_failed",
    ]
    assert (sink.packets[0].epoch, sink.packets[0].step) == (2, 57)
    assert sink.events("tolaria.anomaly.spike") == []


def test_error_event_reaches_threaded_sink_without_flush(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    telemetry = Telemetry([JsonlSink(path)])

    telemetry.event("tolaria.profiler.export_failed", Level.ERROR, path="trace.json", error="OSError")

    assert telemetry.drain(5.0)
    packets = list(read_jsonl(path))
    assert [event.name for packet in packets for event in packet.events] == ["tolaria.profiler.export_failed"]
    telemetry.close()


def test_sequence_monotonic_across_rollback(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    telemetry = Telemetry([JsonlSink(path)])
    telemetry.event("tolaria.anomaly.spike", Level.WARNING, step=18)
    sent = [telemetry.flush(0, 10), telemetry.flush(1, 20)]
    # A rollback moves the step (and here the epoch) back; the sequence must not follow it.
    telemetry.event("tolaria.rollback.completed", Level.INFO, step=12)
    sent.append(telemetry.flush(1, 12))
    telemetry.event("tolaria.rollback.failed", Level.ERROR, reason="test")
    sent.append(telemetry.flush(2, 22))
    assert telemetry.close()

    # An ERROR packet may overtake queued ones in the file, so order the file by sequence.
    packets = sorted(read_jsonl(path), key=lambda packet: packet.sequence)
    sequences = [packet.sequence for packet in packets]
    event_sequences = [event.sequence for packet in packets for event in packet.events]
    assert [packet.sequence for packet in sent] == sorted(packet.sequence for packet in sent)
    assert [packet.step for packet in packets if packet.priority < Level.ERROR] == [10, 20, 12, 22]
    assert sequences == list(range(1, len(packets) + 1))
    assert event_sequences == sorted(event_sequences)
    assert len(set(event_sequences)) == len(event_sequences)


def test_state_dict_continues_sequence_and_counters() -> None:
    first = Telemetry()
    first.count("tolaria.timeout.kasmina", 2)
    first.event("tolaria.command.applied")
    last = first.flush(0, 5)
    saved = first.state_dict()

    sink = InMemorySink()
    resumed = Telemetry([sink])
    resumed.load_state_dict(saved)
    resumed.load_state_dict({"event_sequence": 0, "packet_sequence": 0, "counters": saved["counters"]})
    event = resumed.event("tolaria.command.applied")
    packet = resumed.flush(1, 10)

    assert packet.sequence == last.sequence + 1
    assert event.sequence == saved["event_sequence"] + 1
    assert resumed.counters == {"tolaria.timeout.kasmina": 2.0}


def test_buffer_pressure_drops_only_debug_and_info() -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink], policy=DeliveryPolicy(max_pending=10))
    levels = [Level.DEBUG, Level.INFO, Level.INFO, Level.INFO, Level.WARNING, Level.INFO] * 20

    for index, level in enumerate(levels):
        telemetry.event(ITEM, level, index=index)
    telemetry.flush(0, 1)

    arrived = sink.events(ITEM)
    sent_warnings = {index for index, level in enumerate(levels) if level >= Level.WARNING}
    arrived_warnings = {event.attributes["index"] for event in arrived if event.level >= Level.WARNING}
    low_sent = sum(1 for level in levels if level < Level.WARNING)
    low_arrived = sum(1 for event in arrived if event.level < Level.WARNING)
    dropped = telemetry.counters[DROPPED]
    summaries = sink.events(DROP_SUMMARY)
    assert arrived_warnings == sent_warnings
    assert dropped > 0
    assert dropped == low_sent - low_arrived
    assert sum(summary.attributes["dropped"] for summary in summaries) == dropped
    assert telemetry.event_counts[ITEM] == len(levels)


def test_metric_buffer_pressure_is_counted() -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink], policy=DeliveryPolicy(max_pending=5))

    for step in range(12):
        telemetry.metric("tolaria.grad_agg.latency_ms", float(step), "ms")
    packet = telemetry.flush(0, 12)

    assert len([metric for metric in packet.metrics if metric.name == "tolaria.grad_agg.latency_ms"]) == 5
    assert telemetry.counters[DROPPED] == 7
    summary = sink.events(DROP_SUMMARY)
    assert len(summary) == 1
    assert summary[0].attributes["dropped_metric"] == 7
    assert packet.health["telemetry"] == "degraded"


def test_slow_sink_pressure_keeps_every_warning() -> None:
    slow = SlowSink(delay_s=0.02)
    memory = InMemorySink()
    policy = DeliveryPolicy(max_queue=2, backpressure_timeout_s=0.05)
    telemetry = Telemetry([slow, memory], policy=policy)

    flushed = []
    for epoch in range(30):
        telemetry.event(ITEM, Level.INFO, epoch=epoch)
        if epoch % 5 == 0:
            telemetry.event(ITEM, Level.WARNING, epoch=epoch)
        flushed.append(telemetry.flush(epoch, epoch))
    assert telemetry.close(timeout_s=30.0)

    arrived = {packet.sequence for packet in slow.packets}
    missing = [packet for packet in flushed if packet.sequence not in arrived]
    lost_items = sum(len(packet.events) + len(packet.metrics) for packet in missing)
    warnings = [
        event.attributes["epoch"]
        for packet in slow.packets
        for event in packet.events
        if event.name == ITEM and event.level >= Level.WARNING
    ]
    assert sorted(warnings) == [0, 5, 10, 15, 20, 25]
    assert missing
    assert all(packet.priority < Level.WARNING for packet in missing)
    assert telemetry.counters[DROPPED] == lost_items
    assert sum(event.attributes["dropped"] for event in memory.events(DROP_SUMMARY)) == lost_items
    assert {packet.sequence for packet in flushed} <= {packet.sequence for packet in memory.packets}
    assert slow.closed


def test_failing_sink_is_reported_once_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    flaky = FlakySink(failures=3)
    memory = InMemorySink()
    telemetry = Telemetry([flaky, memory], policy=fast_retry_policy())

    with caplog.at_level(logging.WARNING, logger="tolaria.telemetry.publisher"):
        flushed = [telemetry.flush(epoch, epoch * 10) for epoch in range(3)]
        assert telemetry.drain(10.0)

    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert errors[0].exc_info[0] is OSError
    assert "FlakySink" in errors[0].getMessage()
    assert telemetry.counters[SINK_FAILURES] == 3
    assert {packet.sequence for packet in flushed} <= {packet.sequence for packet in flaky.packets}
    failed = memory.events(SINK_FAILED)
    assert len(failed) == 1
    assert failed[0].level == Level.ERROR
    assert failed[0].attributes["error"] == "OSError"
    assert failed[0].attributes["sink"] == "FlakySink"
    telemetry.flush(3, 40)
    recovered = memory.events(SINK_RECOVERED)
    assert len(recovered) == 1
    assert recovered[0].attributes["failures"] == 3
    assert telemetry.close()


def test_failing_sink_does_not_stop_caller() -> None:
    flaky = FlakySink(failures=10**9)
    telemetry = Telemetry([flaky], policy=fast_retry_policy(max_queue=4))

    for epoch in range(20):
        telemetry.event(ITEM, Level.INFO, epoch=epoch)
        telemetry.flush(epoch, epoch)
    start = time.monotonic()
    telemetry.close(timeout_s=0.2)
    elapsed = time.monotonic() - start

    assert elapsed < 2.0
    assert flaky.packets == []
    assert flaky.attempts >= 1
    assert telemetry.counters[SINK_FAILURES] == flaky.attempts
    assert telemetry.counters[DROPPED] > 0


def test_strict_mode_raises_sink_failure() -> None:
    flaky = FlakySink(failures=1)
    telemetry = Telemetry([flaky], strict=True, policy=fast_retry_policy())
    telemetry.flush(0, 1)
    assert telemetry.drain(10.0)

    with pytest.raises(TelemetrySinkError, match="FlakySink failed in strict mode") as raised:
        telemetry.event(ITEM)

    assert isinstance(raised.value.__cause__, OSError)
    assert telemetry.close()


def test_close_with_hung_sink_returns_within_budget(hung_sink: HungSink, caplog: pytest.LogCaptureFixture) -> None:
    memory = InMemorySink()
    telemetry = Telemetry([hung_sink, memory])
    telemetry.flush(0, 1)
    assert hung_sink.entered.wait(5.0)
    telemetry.event(ITEM, Level.WARNING)

    with caplog.at_level(logging.ERROR, logger="tolaria.telemetry.publisher"):
        start = time.monotonic()
        finished = telemetry.close(timeout_s=0.3)
        elapsed = time.monotonic() - start

    assert finished is False
    assert elapsed < 2.0
    assert any("HungSink did not finish" in record.getMessage() for record in caplog.records)
    assert memory.closed
    assert memory.events(ITEM)
    assert telemetry.counters[DROPPED] >= 1


def test_close_writes_buffered_records_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    telemetry = Telemetry([JsonlSink(path)])
    telemetry.metric("tolaria.val.accuracy", 0.9, "1", objective="digit")

    assert telemetry.close()
    assert telemetry.close()

    packets = list(read_jsonl(path))
    assert [metric.name for metric in packets[0].metrics] == ["tolaria.val.accuracy"]


def test_records_after_close_are_counted_as_dropped(caplog: pytest.LogCaptureFixture) -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    telemetry.close()

    with caplog.at_level(logging.WARNING, logger="tolaria.telemetry.publisher"):
        telemetry.event(ITEM)
        telemetry.metric("tolaria.optim.lr", 0.1)
        telemetry.event(ITEM)

    assert telemetry.counters[DROPPED] == 3
    assert len([record for record in caplog.records if "telemetry is closed" in record.getMessage()]) == 1
    assert sink.packets == []
    with pytest.raises(ValueError, match="telemetry is closed"):
        telemetry.add_sink(InMemorySink())


def test_emitted_names_and_event_counts() -> None:
    telemetry = Telemetry()
    telemetry.event("tolaria.command.applied")
    telemetry.event("tolaria.command.applied")
    telemetry.metric("tolaria.optim.lr", 0.1)
    telemetry.count("tolaria.timeout.tamiyo")

    assert telemetry.event_counts == {"tolaria.command.applied": 2}
    assert telemetry.emitted_names == {"tolaria.command.applied", "tolaria.optim.lr", "tolaria.timeout.tamiyo"}


def test_add_sink_receives_later_packets() -> None:
    telemetry = Telemetry()
    telemetry.flush(0, 1)
    sink = InMemorySink()

    telemetry.add_sink(sink)
    packet = telemetry.flush(1, 2)

    assert sink.packets == [packet]
    assert telemetry.sinks == (sink,)


@pytest.mark.parametrize("name", ["tolaria.steps_total", "x_total"])
def test_count_rejects_total_suffix(name: str) -> None:
    with pytest.raises(ValueError, match="must not end in '_total'"):
        Telemetry().count(name)


@pytest.mark.parametrize("increment", [-1.0, float("nan"), float("inf")])
def test_count_rejects_bad_increment(increment: float) -> None:
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        Telemetry().count("tolaria.timeout.tamiyo", increment)


def test_event_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="unknown telemetry level 'loud'"):
        Telemetry().event(ITEM, "loud")


def test_rank_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="rank must be >= 0, got -1"):
        Telemetry(rank=-1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_pending", 0, "max_pending must be an integer >= 1, got 0"),
        ("max_queue", 2.5, "max_queue must be an integer >= 1, got 2.5"),
        ("backpressure_timeout_s", 0.0, "backpressure_timeout_s must be a finite number of seconds > 0"),
        ("close_timeout_s", float("inf"), "close_timeout_s must be a finite number of seconds > 0"),
        ("retry_max_s", 0.01, r"retry_max_s \(0.01\) must be >= retry_initial_s"),
    ],
)
def test_delivery_policy_validation(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeliveryPolicy(**{field: value})  # type: ignore[arg-type]


class ThreadRecordingSink(SlowSink):
    """A slow sink that also records which thread wrote each packet."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.writers: dict[int, str] = {}

    def write(self, packet: TelemetryPacket) -> None:
        super().write(packet)
        self.writers[packet.sequence] = threading.current_thread().name


def test_full_queue_warning_is_written_synchronously() -> None:
    sink = ThreadRecordingSink(delay_s=0.3)
    telemetry = Telemetry([sink], policy=DeliveryPolicy(max_queue=1, backpressure_timeout_s=0.25))
    telemetry.event(ITEM, Level.WARNING, index=1)
    first = telemetry.flush(0, 1)
    telemetry.event(ITEM, Level.WARNING, index=2)

    start = time.monotonic()
    second = telemetry.flush(1, 2)
    waited = time.monotonic() - start

    assert telemetry.close(timeout_s=10.0)
    assert sink.writers[second.sequence] == threading.current_thread().name
    assert sink.writers[first.sequence].startswith("tolaria-telemetry-")
    assert waited >= 0.25
    assert telemetry.counters.get(DROPPED, 0) == 0


def test_hung_sink_queues_warnings_beyond_bound(hung_sink: HungSink) -> None:
    telemetry = Telemetry([hung_sink], policy=DeliveryPolicy(max_queue=1, backpressure_timeout_s=0.05))
    telemetry.flush(0, 1)
    assert hung_sink.entered.wait(5.0)
    telemetry.event(ITEM, Level.WARNING)
    warning_packet = telemetry.flush(1, 2)
    telemetry.event(ITEM, Level.INFO)
    info_packet = telemetry.flush(2, 3)

    assert telemetry.counters[DROPPED] == len(info_packet.events) + len(info_packet.metrics)
    assert telemetry.close(timeout_s=0.1) is False
    assert warning_packet.priority == Level.WARNING


EXIT_SCRIPT = """
import sys, time
from pathlib import Path
from tolaria.telemetry import Level, Telemetry

class SlowFileSink:
    def __init__(self, path):
        self.path = Path(path)
    def write(self, packet):
        time.sleep(0.3)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(f"{packet.sequence}\\n")
    def close(self):
        with self.path.open("a", encoding="utf-8") as file:
            file.write("closed\\n")

telemetry = Telemetry([SlowFileSink(sys.argv[1])])
telemetry.event("tolaria.test.item", Level.WARNING)
telemetry.flush(0, 1)
telemetry.flush(1, 2)
"""


def test_open_publisher_is_closed_at_exit(tmp_path: Path) -> None:
    output = tmp_path / "written.txt"

    completed = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(output)], capture_output=True, text=True, timeout=120, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert output.read_text(encoding="utf-8").splitlines() == ["1", "2", "closed"]


def test_error_packet_overtakes_queued_packets() -> None:
    sink = SlowSink(delay_s=0.1)
    telemetry = Telemetry([sink])
    flushed = [telemetry.flush(epoch, epoch) for epoch in range(5)]

    urgent = telemetry.event("tolaria.rollback.failed", Level.ERROR, reason="test")
    assert telemetry.close(timeout_s=10.0)

    urgent_position = next(index for index, packet in enumerate(sink.packets) if urgent in packet.events)
    epoch_packets = [packet.sequence for packet in sink.packets if urgent not in packet.events]
    assert urgent_position <= 1
    assert epoch_packets == [packet.sequence for packet in flushed]
