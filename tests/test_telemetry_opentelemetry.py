"""The OpenTelemetry sink, read back through the SDK's in-memory exporters."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    InMemoryLogRecordExporter,
    LogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tolaria.telemetry import Level, Telemetry
from tolaria.telemetry.opentelemetry import OpenTelemetrySink


@pytest.fixture
def providers() -> Iterator[tuple[InMemoryMetricReader, InMemoryLogRecordExporter, MeterProvider, LoggerProvider]]:
    reader = InMemoryMetricReader()
    exporter = InMemoryLogRecordExporter()
    meter_provider = MeterProvider(metric_readers=[reader])
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    yield reader, exporter, meter_provider, logger_provider
    meter_provider.shutdown()
    logger_provider.shutdown()


def collect_points(reader: InMemoryMetricReader) -> dict[str, tuple[str, str, list[tuple[dict[str, Any], Any]]]]:
    """Return ``{name: (data type, unit, [(attributes, value or sum)])}`` of the reader's metrics."""
    collected = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "tolaria"
            for metric in scope_metrics.metrics:
                points = [
                    (dict(point.attributes or {}), getattr(point, "value", None) or getattr(point, "sum", None))
                    for point in metric.data.data_points
                ]
                collected[metric.name] = (type(metric.data).__name__, metric.unit, points)
    return collected


def test_metrics_and_events_round_trip(providers: Any) -> None:
    reader, exporter, meter_provider, logger_provider = providers
    sink = OpenTelemetrySink(meter_provider=meter_provider, logger_provider=logger_provider)
    telemetry = Telemetry([sink], source="trainer", run_id="run-42", rank=1)
    telemetry.metric("tolaria.train.loss", 0.75, "1", objective="digit")
    telemetry.metric("tolaria.rollback.latency_ms", 4.0, "ms")
    telemetry.count("tolaria.timeout.tamiyo", 2)
    telemetry.event("tolaria.command.rejected", Level.WARNING, reason="lr must be > 0", command_id=7)
    telemetry.flush(0, 30)
    telemetry.count("tolaria.timeout.tamiyo", 3)
    telemetry.event("tolaria.emergency.broadcast_failed", Level.CRITICAL, listener="pager", error="TimeoutError")
    telemetry.flush(1, 60)
    assert telemetry.close()

    points = collect_points(reader)
    expected_attributes = {"tolaria.rank": 1, "tolaria.source": "trainer"}
    assert points["tolaria.train.loss"] == ("Gauge", "1", [({"objective": "digit", **expected_attributes}, 0.75)])
    assert points["tolaria.timeout.tamiyo"] == ("Sum", "1", [(expected_attributes, 5)])
    assert points["tolaria.rollback.latency_ms"][:2] == ("Histogram", "ms")
    assert points["tolaria.rollback.latency_ms"][2][0][1] == 4.0

    records = [readable.log_record for readable in exporter.get_finished_logs()]
    by_name = {record.event_name: record for record in records}
    rejected = by_name["tolaria.command.rejected"]
    failed = by_name["tolaria.emergency.broadcast_failed"]
    assert len(records) == 2
    assert rejected.severity_number == SeverityNumber.WARN
    assert rejected.severity_text == "WARNING"
    assert rejected.body == "tolaria.command.rejected"
    assert dict(rejected.attributes or {}) == {
        "reason": "lr must be > 0",
        "command_id": 7,
        "tolaria.sequence": 1,
        "tolaria.epoch": 0,
        "tolaria.step": 30,
        "tolaria.run_id": "run-42",
        "tolaria.rank": 1,
        "tolaria.source": "trainer",
    }
    assert failed.severity_number == SeverityNumber.FATAL
    assert rejected.timestamp is not None
    assert abs(rejected.timestamp / 1e9 - time.time()) < 60.0


class BlockingLogExporter(LogRecordExporter):
    """A log exporter that blocks until released, like a collector that does not answer."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        del batch
        self.release.wait(60.0)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        del timeout_millis
        return True


def test_close_with_unreachable_exporter_returns_within_budget() -> None:
    exporter = BlockingLogExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    telemetry = Telemetry([OpenTelemetrySink(meter_provider=meter_provider, logger_provider=logger_provider)])
    try:
        telemetry.event("tolaria.rollback.failed", Level.ERROR, reason="test")

        start = time.monotonic()
        finished = telemetry.close(timeout_s=0.3)
        elapsed = time.monotonic() - start

        assert finished is False
        assert elapsed < 2.0
    finally:
        exporter.release.set()
        meter_provider.shutdown()


def test_missing_dependency_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)
    monkeypatch.delattr(sys.modules["opentelemetry"], "metrics", raising=False)

    with pytest.raises(ImportError, match=r"pip install 'tolaria\[opentelemetry\]'"):
        OpenTelemetrySink()
