"""A telemetry sink that forwards metrics to the OpenTelemetry metrics API and events to its logs API.

Mapping of a packet:

=====================================  ==============================================================
tolaria record                         OpenTelemetry
=====================================  ==============================================================
``Metric`` with ``kind="counter"``     ``Counter`` named after the metric. The record is the running
(from ``Telemetry.count``)             total, so the sink adds the increase since the last packet.
``Metric`` whose name the catalog      ``Histogram``; the value is recorded as one sample.
declares as a histogram
any other ``Metric``                   synchronous ``Gauge``; the value is set.
``Metric.unit``                        instrument unit; the description comes from the catalog.
``Metric.attributes``                  data point attributes, plus ``tolaria.rank`` and
                                       ``tolaria.source``.
``Event``                              one log record: ``event_name`` and ``body`` are the event name,
                                       ``severity_number`` follows the level (DEBUG, INFO, WARN, ERROR,
                                       FATAL for CRITICAL), ``severity_text`` is the level name,
                                       ``timestamp`` is the event's wall-clock time.
``Event.attributes``                   log record attributes, plus ``tolaria.sequence``,
                                       ``tolaria.epoch``, ``tolaria.step``, ``tolaria.run_id``,
                                       ``tolaria.rank`` and ``tolaria.source``.
=====================================  ==============================================================

Attribute values that OpenTelemetry does not accept (anything but ``str``, ``bool``,
``int``, ``float`` and lists of them) are converted with ``str``. The run id is not a metric
attribute, because it would start new time series in every run; put it in the
``Resource`` of the meter provider (for example as ``service.instance.id``) when needed.
The logs API still lives in the private-looking ``opentelemetry._logs`` module, which is
where the OpenTelemetry Python project publishes it.

Needs ``opentelemetry-api`` (and an SDK or distribution to export anything):
``pip install 'tolaria[opentelemetry]'``. Tested with opentelemetry-api and -sdk 1.45.2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tolaria.telemetry.catalog import lookup_metric
from tolaria.telemetry.records import Event, Level, Metric, TelemetryPacket

__all__ = ["OpenTelemetrySink"]

_INSTALL_HINT = "pip install 'tolaria[opentelemetry]'"
_SCOPE = "tolaria"


def _import_apis() -> tuple[Any, Any]:
    """Import the metrics and logs APIs only when a sink is created.

    Raises:
        ImportError: opentelemetry-api is not installed; the message names the extra to install.
    """
    try:
        from opentelemetry import _logs, metrics
    except ImportError as error:
        raise ImportError(f"OpenTelemetrySink needs the opentelemetry-api package: {_INSTALL_HINT}") from error
    return metrics, _logs


def _attribute_value(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(item, (str, bool, int, float)) for item in value):
        return list(value)
    return str(value)


def _attributes(attributes: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    return {str(key): _attribute_value(value) for key, value in {**attributes, **extra}.items()}


def _instrument_kind(metric: Metric) -> str:
    """Return ``"counter"``, ``"histogram"`` or ``"gauge"`` following the table in the module docstring."""
    if metric.kind == "counter":
        return "counter"
    entry = lookup_metric(metric.name)
    if metric.kind == "histogram" or (entry is not None and entry.kind == "histogram"):
        return "histogram"
    return "gauge"


class OpenTelemetrySink:
    """Forward packets to OpenTelemetry: metrics to a meter, events to a logger.

    Args:
        meter_provider: source of the ``tolaria`` meter; the global provider by default.
        logger_provider: source of the ``tolaria`` logger; the global provider by default.
        flush_timeout_ms: time limit passed to the providers' ``force_flush`` on ``close``.

    The sink does not shut the providers down: they belong to the application.

    Raises:
        ImportError: opentelemetry-api is not installed (``pip install 'tolaria[opentelemetry]'``).
    """

    def __init__(
        self, *, meter_provider: Any = None, logger_provider: Any = None, flush_timeout_ms: int = 5_000
    ) -> None:
        metrics_api, logs_api = _import_apis()
        self._meter_provider = meter_provider if meter_provider is not None else metrics_api.get_meter_provider()
        self._logger_provider = logger_provider if logger_provider is not None else logs_api.get_logger_provider()
        self._meter = self._meter_provider.get_meter(_SCOPE)
        self._logger = self._logger_provider.get_logger(_SCOPE)
        self._severity = {
            Level.DEBUG: logs_api.SeverityNumber.DEBUG,
            Level.INFO: logs_api.SeverityNumber.INFO,
            Level.WARNING: logs_api.SeverityNumber.WARN,
            Level.ERROR: logs_api.SeverityNumber.ERROR,
            Level.CRITICAL: logs_api.SeverityNumber.FATAL,
        }
        self._flush_timeout_ms = flush_timeout_ms
        self._instruments: dict[tuple[str, str, str], Any] = {}
        self._counter_totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def write(self, packet: TelemetryPacket) -> None:
        """Record the packet's metrics and emit its events as log records."""
        for metric in packet.metrics:
            self._record_metric(metric, packet)
        for event in packet.events:
            self._emit_event(event, packet)

    def close(self) -> None:
        """Ask both providers to export what they hold, within ``flush_timeout_ms`` each."""
        for provider in (self._meter_provider, self._logger_provider):
            # API-only (no-op) providers have nothing to flush and no force_flush method.
            force_flush = getattr(provider, "force_flush", None)
            if callable(force_flush):
                force_flush(timeout_millis=self._flush_timeout_ms)

    def _record_metric(self, metric: Metric, packet: TelemetryPacket) -> None:
        kind = _instrument_kind(metric)
        attributes = _attributes(metric.attributes, {"tolaria.rank": packet.rank, "tolaria.source": packet.source})
        instrument = self._instrument(metric, kind)
        if kind == "counter":
            instrument.add(self._counter_increase(metric), attributes)
        elif kind == "histogram":
            instrument.record(metric.value, attributes)
        else:
            instrument.set(metric.value, attributes)

    def _counter_increase(self, metric: Metric) -> float:
        """Return the increase of a running total since the last packet.

        A total below the previous one means the counting restarted (a new publisher in
        the same process), so the whole new total is the increase.
        """
        key = (metric.name, tuple(sorted((str(k), str(v)) for k, v in metric.attributes.items())))
        previous = self._counter_totals.get(key, 0.0)
        self._counter_totals[key] = metric.value
        return metric.value - previous if metric.value >= previous else metric.value

    def _instrument(self, metric: Metric, kind: str) -> Any:
        key = (metric.name, kind, metric.unit)
        instrument = self._instruments.get(key)
        if instrument is None:
            entry = lookup_metric(metric.name)
            description = entry.description if entry is not None else ""
            create = {
                "counter": self._meter.create_counter,
                "histogram": self._meter.create_histogram,
                "gauge": self._meter.create_gauge,
            }[kind]
            instrument = create(metric.name, unit=metric.unit, description=description)
            self._instruments[key] = instrument
        return instrument

    def _emit_event(self, event: Event, packet: TelemetryPacket) -> None:
        # Events carry monotonic times; shift them onto the packet's wall clock.
        wall_time_s = packet.wall_time_s - (packet.monotonic_s - event.monotonic_s)
        extra = {
            "tolaria.sequence": event.sequence,
            "tolaria.epoch": packet.epoch,
            "tolaria.step": packet.step,
            "tolaria.run_id": packet.run_id,
            "tolaria.rank": packet.rank,
            "tolaria.source": packet.source,
        }
        self._logger.emit(
            timestamp=int(wall_time_s * 1e9),
            observed_timestamp=int(packet.wall_time_s * 1e9),
            severity_number=self._severity[event.level],
            severity_text=event.level.name,
            body=event.name,
            event_name=event.name,
            attributes=_attributes(event.attributes, extra),
        )
