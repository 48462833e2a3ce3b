"""Telemetry record types: levels, metrics, events and the packets that carry them.

Every record converts to and from a JSON-compatible ``dict`` so that sinks can
write one packet per line and readers (``tolaria report``) can load them back.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["METRIC_KINDS", "Event", "Level", "Metric", "TelemetryPacket"]


class Level(enum.IntEnum):
    """Severity of an event, with the numeric values of the standard ``logging`` levels."""

    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50

    @classmethod
    def parse(cls, value: Level | int | str) -> Level:
        """Convert a level name (``"warning"``) or number (``30``) to a ``Level``.

        Raises:
            ValueError: the value names no level.
        """
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                names = ", ".join(level.name for level in cls)
                raise ValueError(f"unknown telemetry level {value!r}; expected one of {names}") from None
        return cls(value)


def _json_value(value: Any) -> Any:
    """Return ``value`` in a form ``json.dumps`` accepts without losing meaning."""
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinity; keep them readable instead of writing invalid JSON.
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Mapping):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return str(value)


def _float_from_json(value: Any) -> float:
    """Invert ``_json_value`` for a float that may have been written as ``'nan'`` or ``'inf'``."""
    return float(value)


METRIC_KINDS = ("gauge", "counter", "histogram")
"""Values of ``Metric.kind``: a point value, a running total, or one sample of a distribution."""


@dataclasses.dataclass(frozen=True, slots=True)
class Metric:
    """A named measurement, such as a loss, a count or a latency.

    Attributes:
        name: dotted metric name, for example ``"tolaria.grad_agg.latency_ms"``.
        value: the measured value as a Python float (NaN and infinities allowed).
        unit: unit of ``value`` (``"ms"``, ``"1"``, ``"samples/s"``), empty when dimensionless.
        attributes: extra labels such as ``{"objective": "digit"}``.
        kind: ``"gauge"`` for a value at one moment, ``"counter"`` for a running total
            since the start of the run (what ``Telemetry.count`` produces), ``"histogram"``
            for one sample of a distribution.
    """

    name: str
    value: float
    unit: str = ""
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = "gauge"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-compatible dict."""
        return {
            "name": self.name,
            "value": _json_value(float(self.value)),
            "unit": self.unit,
            "attributes": _json_value(dict(self.attributes)),
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metric:
        """Build a metric from the output of ``to_dict``.

        Raises:
            KeyError: ``name`` or ``value`` is missing.
            ValueError: ``value`` is not a number or ``kind`` is not one of ``METRIC_KINDS``.
        """
        kind = str(data.get("kind", "gauge"))
        if kind not in METRIC_KINDS:
            raise ValueError(f"metric kind {kind!r} is invalid; expected one of {', '.join(METRIC_KINDS)}")
        return cls(
            name=str(data["name"]),
            value=_float_from_json(data["value"]),
            unit=str(data.get("unit", "")),
            attributes=dict(data.get("attributes", {})),
            kind=kind,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """Something that happened at one moment, such as an escalation or a timeout.

    Attributes:
        name: dotted event name, for example ``"tolaria.rollback.completed"``.
        level: severity.
        attributes: details such as the reason, the step or the error type.
        monotonic_s: ``time.monotonic()`` when the event was recorded, in seconds.
        sequence: position in the run's event order; it keeps growing across rollbacks.
    """

    name: str
    level: Level
    attributes: Mapping[str, Any]
    monotonic_s: float
    sequence: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-compatible dict."""
        return {
            "name": self.name,
            "level": self.level.name,
            "attributes": _json_value(dict(self.attributes)),
            "monotonic_s": self.monotonic_s,
            "sequence": self.sequence,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Build an event from the output of ``to_dict``."""
        return cls(
            name=str(data["name"]),
            level=Level.parse(data["level"]),
            attributes=dict(data.get("attributes", {})),
            monotonic_s=float(data["monotonic_s"]),
            sequence=int(data.get("sequence", 0)),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class TelemetryPacket:
    """The unit a sink receives: the metrics and events of one epoch, or one urgent event.

    Attributes:
        source: component that produced the packet, for example ``"trainer"``.
        epoch: epoch index (0-based) the packet belongs to, or -1 before training starts.
        step: global optimizer step when the packet was assembled.
        metrics: measurements of the period.
        events: events of the period, in sequence order.
        wall_time_s: ``time.time()`` when assembled (seconds since the Unix epoch).
        monotonic_s: ``time.monotonic()`` when assembled, in seconds.
        sequence: packet number within the run, strictly increasing; it keeps growing
            when training rolls back to an earlier step.
        attributes: run-level labels given to the publisher.
        run_id: identifier of the run, the same in every packet of one run.
        rank: process rank in distributed training, 0 for a single process.
        priority: highest event level in the packet, ``Level.INFO`` when it has no events.
            Packets below WARNING may be dropped under pressure; the others never are.
        health: status fields of the run when the packet was assembled, for example
            ``{"telemetry": "ok", "emergency_level": "NOMINAL"}``.
    """

    source: str
    epoch: int
    step: int
    metrics: tuple[Metric, ...]
    events: tuple[Event, ...]
    wall_time_s: float
    monotonic_s: float
    sequence: int = 0
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    run_id: str = ""
    rank: int = 0
    priority: Level = Level.INFO
    health: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-compatible dict, one line of a JSONL file."""
        return {
            "source": self.source,
            "epoch": self.epoch,
            "step": self.step,
            "sequence": self.sequence,
            "run_id": self.run_id,
            "rank": self.rank,
            "priority": self.priority.name,
            "wall_time_s": self.wall_time_s,
            "monotonic_s": self.monotonic_s,
            "attributes": _json_value(dict(self.attributes)),
            "health": _json_value(dict(self.health)),
            "metrics": [metric.to_dict() for metric in self.metrics],
            "events": [event.to_dict() for event in self.events],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TelemetryPacket:
        """Build a packet from the output of ``to_dict``.

        Raises:
            KeyError: a required field is missing.
            ValueError: a field has a value of the wrong kind.
        """
        return cls(
            source=str(data["source"]),
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            metrics=tuple(Metric.from_dict(item) for item in data.get("metrics", [])),
            events=tuple(Event.from_dict(item) for item in data.get("events", [])),
            wall_time_s=float(data["wall_time_s"]),
            monotonic_s=float(data["monotonic_s"]),
            sequence=int(data.get("sequence", 0)),
            attributes=dict(data.get("attributes", {})),
            run_id=str(data.get("run_id", "")),
            rank=int(data.get("rank", 0)),
            priority=Level.parse(data.get("priority", "INFO")),
            health=dict(data.get("health", {})),
        )

    def metric(self, name: str) -> Metric | None:
        """Return the first metric called ``name`` with no attributes, or ``None``."""
        for metric in self.metrics:
            if metric.name == name and not metric.attributes:
                return metric
        return None
