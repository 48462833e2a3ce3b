"""Telemetry: metrics, events, the publisher that packs them and the sinks that record them.

``TensorBoardSink`` (``tolaria.telemetry.tensorboard``) and ``OpenTelemetrySink``
(``tolaria.telemetry.opentelemetry``) need optional dependencies and are imported from
their modules; the metric and event names are listed in ``tolaria.telemetry.catalog``.
"""

from tolaria.telemetry.policy import DeliveryPolicy
from tolaria.telemetry.publisher import Telemetry, TelemetrySinkError
from tolaria.telemetry.records import Event, Level, Metric, TelemetryPacket
from tolaria.telemetry.sinks import InMemorySink, JsonlSink, Sink, read_jsonl

__all__ = [
    "DeliveryPolicy",
    "Event",
    "InMemorySink",
    "JsonlSink",
    "Level",
    "Metric",
    "Sink",
    "Telemetry",
    "TelemetryPacket",
    "TelemetrySinkError",
    "read_jsonl",
]
