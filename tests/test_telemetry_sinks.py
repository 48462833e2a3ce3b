"""Round trips of packets through the JSONL, in-memory and TensorBoard sinks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tolaria.telemetry import Event, InMemorySink, JsonlSink, Level, Metric, Telemetry, TelemetryPacket, read_jsonl


def sample_packet(sequence: int = 7) -> TelemetryPacket:
    return TelemetryPacket(
        source="trainer",
        epoch=2,
        step=340,
        metrics=(
            Metric("tolaria.train.loss", 0.125, "1", {"objective": "digit"}),
            Metric("tolaria.val.loss", float("nan"), "1", {"objective": "parity"}),
            Metric("tolaria.anomaly.nonfinite", 3.0, "1", {}, "counter"),
        ),
        events=(
            Event("tolaria.rollback.completed", Level.INFO, {"tier": "fast", "step": 300}, 12.5, 41),
            Event("tolaria.command.rejected", Level.WARNING, {"reason": "lr must be > 0", "lr": -1.0}, 12.75, 42),
        ),
        wall_time_s=1_700_000_000.5,
        monotonic_s=13.0,
        sequence=sequence,
        attributes={"job": "digits"},
        run_id="abc123",
        rank=1,
        priority=Level.WARNING,
        health={"telemetry": "ok", "emergency_level": "ELEVATED"},
    )


def assert_same_packet(actual: TelemetryPacket, expected: TelemetryPacket) -> None:
    """Compare packets field by field, treating NaN metric values as equal."""
    assert [metric.name for metric in actual.metrics] == [metric.name for metric in expected.metrics]
    for got, want in zip(actual.metrics, expected.metrics, strict=True):
        assert (got.unit, dict(got.attributes), got.kind) == (want.unit, dict(want.attributes), want.kind)
        assert got.value == want.value or (math.isnan(got.value) and math.isnan(want.value))
    assert actual.events == expected.events
    for field in ("source", "epoch", "step", "wall_time_s", "monotonic_s", "sequence", "run_id", "rank", "priority"):
        assert getattr(actual, field) == getattr(expected, field), field
    assert dict(actual.attributes) == dict(expected.attributes)
    assert dict(actual.health) == dict(expected.health)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    sink = JsonlSink(path)
    packet = sample_packet()

    sink.write(packet)
    sink.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["metrics"][1]["value"] == "nan"
    [read_back] = list(read_jsonl(path))
    assert_same_packet(read_back, packet)


def test_jsonl_readable_while_open_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    first = JsonlSink(path)
    first.write(sample_packet(1))
    assert [packet.sequence for packet in read_jsonl(path)] == [1]
    first.close()
    first.close()

    second = JsonlSink(path)
    second.write(sample_packet(2))
    second.close()

    assert [packet.sequence for packet in read_jsonl(path)] == [1, 2]
    with pytest.raises(ValueError, match="cannot write to closed telemetry file"):
        second.write(sample_packet(3))


def test_jsonl_through_publisher(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    telemetry = Telemetry([JsonlSink(path)], run_id="run-9", rank=0)
    telemetry.metric("tolaria.optim.lr", 0.05)
    telemetry.event("tolaria.command.applied", Level.INFO, command_id=4, kind="adjust_lr")
    sent = telemetry.flush(0, 12)
    assert telemetry.close()

    [read_back] = list(read_jsonl(path))
    assert_same_packet(read_back, sent)


def test_read_jsonl_reports_invalid_lines(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.jsonl"
    good = json.dumps(sample_packet(1).to_dict())
    path.write_text(f'{good}\n{{"source": "trainer"}}\n\n[1, 2]\n{good[: len(good) // 2]}', encoding="utf-8")
    problems: list[tuple[int, str]] = []

    packets = list(read_jsonl(path, on_invalid=lambda line, problem: problems.append((line, problem))))

    assert [packet.sequence for packet in packets] == [1]
    assert [line for line, _ in problems] == [2, 4, 5]
    assert problems[0][1].startswith("KeyError")
    assert problems[2][1].startswith("JSONDecodeError")
    with pytest.raises(ValueError, match="line 2 is not a telemetry packet: KeyError"):
        list(read_jsonl(path))


def test_metric_from_dict_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="metric kind 'rate' is invalid"):
        Metric.from_dict({"name": "x", "value": 1.0, "kind": "rate"})


def test_in_memory_sink_queries() -> None:
    sink = InMemorySink()
    packet = sample_packet()

    sink.write(packet)
    sink.close()

    assert sink.closed
    assert [event.sequence for event in sink.events()] == [41, 42]
    assert [event.sequence for event in sink.events("tolaria.command.rejected")] == [42]
    assert [metric.value for metric in sink.metrics("tolaria.train.loss")] == [0.125]
    assert len(sink.metrics()) == 3


def test_tensorboard_round_trip(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tolaria.telemetry.tensorboard import TensorBoardSink

    log_dir = tmp_path / "tb"
    telemetry = Telemetry([TensorBoardSink(log_dir)])
    telemetry.metric("tolaria.train.loss", 0.5, "1", objective="digit")
    telemetry.metric("tolaria.optim.lr", 0.1, "1")
    telemetry.count("tolaria.anomaly.nonfinite", 2)
    telemetry.event("tolaria.anomaly.spike", Level.WARNING, step=33, ratio=12.5)
    telemetry.flush(0, 40)
    telemetry.metric("tolaria.train.loss", 0.25, "1", objective="digit")
    telemetry.flush(1, 80)
    assert telemetry.close()

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    loss = accumulator.Scalars("tolaria.train.loss/objective=digit")
    texts = accumulator.Tensors("events/tolaria.anomaly.spike/text_summary")
    assert [(point.step, point.value) for point in loss] == [(40, 0.5), (80, 0.25)]
    assert [point.value for point in accumulator.Scalars("tolaria.optim.lr")] == [pytest.approx(0.1)]
    assert [point.value for point in accumulator.Scalars("tolaria.anomaly.nonfinite")] == [2.0, 2.0]
    assert len(texts) == 1
    assert texts[0].step == 40
    body = texts[0].tensor_proto.string_val[0].decode()
    assert body.startswith("**WARNING** (sequence 1)")
    assert "`ratio`=12.5" in body
    assert "`step`=33" in body


def test_tensorboard_missing_dependency_names_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tolaria.telemetry.tensorboard import TensorBoardSink

    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)

    with pytest.raises(ImportError, match=r"pip install 'tolaria\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")
