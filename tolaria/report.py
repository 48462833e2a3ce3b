"""``tolaria report RUN_DIR``: read a run's ``telemetry.jsonl``, draw ``report.png`` and print a summary.

The report works on a finished run, on a run that is still going, and on one that
crashed half-way. A line that is not a valid packet (such as a cut-off last line) is
skipped with a WARNING log naming its line number, and the report covers the rest.

Time axis: epochs, counted from 1. The metrics of epoch ``e`` (0-based in the packets)
are drawn at ``x = e + 1``, the end of that epoch. Events are drawn inside their epoch,
between ``x = e`` and ``x = e + 1``, in proportion to their step within the epoch's step
range. An event's step is the first of its ``step``, ``restored_step`` and ``target_step``
attributes that is a number (rollback events carry only the last two), else the packet's
step. The step range of an epoch runs from the last step of the epoch before to the last
step of the epoch. Both come only from the packets that carry ``tolaria.train.loss``, so
the packet a crashed or finished run flushes last cannot move a marker.

Exit codes of ``run_report``: 0 when the report was written. Bad input (a missing
folder, a missing or empty telemetry file) raises ``ReportInputError``, which the CLI
maps to exit code 2. A missing ``plot`` extra raises ``ImportError``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeGuard

from tolaria.functional.emergency import Level as EmergencyLevel
from tolaria.telemetry.records import TelemetryPacket
from tolaria.telemetry.sinks import read_jsonl

__all__ = [
    "MARKER_EVENTS",
    "Marker",
    "ReportInputError",
    "RunHistory",
    "format_summary",
    "load_history",
    "run_report",
]

logger = logging.getLogger(__name__)

TELEMETRY_FILE = "telemetry.jsonl"
REPORT_FILE = "report.png"

MARKER_EVENTS: Mapping[str, str] = {
    "tolaria.rollback.completed": "rollback",
    "tolaria.rollback.failed": "rollback failed",
    "tolaria.rollback.deadline_exceeded": "rollback failed",
    "timeout_inference": "controller",
    "tolaria.command.failed": "executor",
    "tolaria.anomaly.nonfinite": "skipped step",
    "tolaria.anomaly.spike": "loss spike",
    "tolaria.emergency.escalated": "escalation",
}
"""Events marked on the time axis, and the kind of marker each becomes.

The controller and executor events get ``" timeout"`` or ``" failure"`` added from their
``status`` attribute (``timed_out`` or ``failed``): ``"controller timeout"``, ``"executor failure"``.
"""

_CONTROL_ROLES = frozenset({"controller", "executor"})

# Attributes that hold the step of an event, most precise first.
_STEP_ATTRIBUTES = ("step", "target_step", "restored_step")

# The per-epoch training metric whose packets define the epochs and their step ranges.
_EPOCH_METRIC = "tolaria.train.loss"

# Counters of calls that timed out, by role.
_TIMEOUT_COUNTERS = {"controller": "tolaria.timeout.tamiyo", "executor": "tolaria.timeout.kasmina"}


class ReportInputError(ValueError):
    """The run folder or its telemetry file is missing, or the file contains no packet; the CLI exits with code 2."""


@dataclasses.dataclass(frozen=True)
class Marker:
    """One event drawn on the time axis.

    Attributes:
        x: position on the epoch axis (see the module docstring).
        kind: marker kind from ``MARKER_EVENTS``, for example ``"rollback"``.
        event: the event name.
        attributes: the event's attributes.
    """

    x: float
    kind: str
    event: str
    attributes: Mapping[str, Any]


@dataclasses.dataclass
class RunHistory:
    """The contents of a telemetry file, arranged for plotting and the summary.

    Attributes:
        packets: every valid packet, in file order.
        invalid_lines: ``(line number, problem)`` of each skipped line.
        series: ``{metric name: {label: {x: value}}}``; the label joins the metric's
            attribute values (``"digit"`` for ``objective=digit``), empty without attributes.
            A later packet for the same epoch (a resumed run) replaces the earlier value.
        markers: events of ``MARKER_EVENTS`` on the time axis, in file order.
        event_counts: number of events by name.
        counters: last running total of every counter metric.
    """

    packets: list[TelemetryPacket]
    invalid_lines: list[tuple[int, str]]
    series: dict[str, dict[str, dict[float, float]]]
    markers: list[Marker]
    event_counts: Counter[str]
    counters: dict[str, float]

    def values(self, name: str) -> dict[str, list[tuple[float, float]]]:
        """Return ``{label: [(x, value), ...]}`` of metric ``name``, each list sorted by x."""
        return {label: sorted(points.items()) for label, points in self.series.get(name, {}).items()}

    def last(self, name: str, label: str = "") -> float | None:
        """Return the value at the largest x of ``name`` and ``label``, or ``None``."""
        points = self.series.get(name, {}).get(label)
        return points[max(points)] if points else None


def _label(attributes: Mapping[str, Any]) -> str:
    return ",".join(str(attributes[key]) for key in sorted(attributes))


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_epoch_packet(packet: TelemetryPacket) -> bool:
    """Return whether ``packet`` ends a training epoch, that is, carries ``tolaria.train.loss``."""
    return packet.epoch >= 0 and any(metric.name == _EPOCH_METRIC for metric in packet.metrics)


def _epoch_ends(packets: Iterable[TelemetryPacket]) -> dict[int, int]:
    """Map each training epoch to its last step: the largest step of its end-of-epoch packets.

    The largest, so that a later packet of the same epoch with a smaller step (a repeat
    after a crash or a resume) never shrinks the epoch.
    """
    ends: dict[int, int] = {}
    for packet in packets:
        if _is_epoch_packet(packet):
            ends[packet.epoch] = max(ends.get(packet.epoch, packet.step), packet.step)
    return ends


def _epoch_step_ranges(packets: Iterable[TelemetryPacket]) -> dict[int, tuple[int, int]]:
    """Map each training epoch to ``(first step, last step)``.

    The first step is the last step of the epoch before. When that epoch is missing (a
    file that starts with a resumed run) the epochs before are taken as equally long.
    """
    ends = _epoch_ends(packets)
    ranges = {}
    for epoch, end in ends.items():
        start = ends.get(epoch - 1, end * epoch // (epoch + 1))
        ranges[epoch] = (start, end)
    return ranges


def _event_step(attributes: Mapping[str, Any], packet: TelemetryPacket) -> float:
    """Return the step an event happened at: its first numeric step attribute, else the packet's step."""
    for key in _STEP_ATTRIBUTES:
        value = attributes.get(key)
        if _is_number(value):
            return float(value)
    return float(packet.step)


def _event_x(packet: TelemetryPacket, step: float, ranges: Mapping[int, tuple[int, int]]) -> float:
    """Return the x position of an event of ``packet`` that happened at ``step``."""
    epoch = max(packet.epoch, 0)
    start, end = ranges.get(epoch, (0, 0))
    if end > start:
        fraction = min(max((step - start) / (end - start), 0.0), 1.0)
        return epoch + fraction
    return float(epoch + 1)


def _marker_kind(name: str, attributes: Mapping[str, Any]) -> str | None:
    """Return the marker kind of event ``name``, or ``None`` when it is not marked."""
    kind = MARKER_EVENTS.get(name)
    if kind in _CONTROL_ROLES:
        return f"{kind} timeout" if attributes.get("status") == "timed_out" else f"{kind} failure"
    return kind


def _add_packet(history: RunHistory, packet: TelemetryPacket, ranges: Mapping[int, tuple[int, int]]) -> None:
    x = float(max(packet.epoch, 0) + 1)
    for metric in packet.metrics:
        if metric.kind == "counter":
            history.counters[metric.name] = metric.value
        else:
            history.series.setdefault(metric.name, {}).setdefault(_label(metric.attributes), {})[x] = metric.value
    for event in packet.events:
        history.event_counts[event.name] += 1
        kind = _marker_kind(event.name, event.attributes)
        if kind is not None:
            x = _event_x(packet, _event_step(event.attributes, packet), ranges)
            history.markers.append(Marker(x, kind, event.name, dict(event.attributes)))


def load_history(path: Path) -> RunHistory:
    """Read the telemetry file at ``path``, skipping invalid lines with a WARNING log.

    Raises:
        ReportInputError: the file is missing or contains no valid packet.
    """
    if not path.is_file():
        raise ReportInputError(f"telemetry file {path} not found; expected the folder written by `tolaria demo --out`")
    invalid: list[tuple[int, str]] = []

    def skip(line_number: int, problem: str) -> None:
        logger.warning("%s: line %d is not a telemetry packet and is skipped (%s)", path, line_number, problem)
        invalid.append((line_number, problem))

    packets = list(read_jsonl(path, on_invalid=skip))
    if not packets:
        raise ReportInputError(f"telemetry file {path} contains no valid packet; the run stopped before writing one")
    history = RunHistory(packets, invalid, {}, [], Counter(), {})
    ranges = _epoch_step_ranges(packets)
    for packet in packets:
        _add_packet(history, packet, ranges)
    return history


def _format_value(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.{digits}g}"


def _emergency_name(value: float | None) -> str:
    if value is None:
        return "-"
    try:
        return EmergencyLevel(round(value)).name
    except ValueError:
        return _format_value(value)


def _best(points: Mapping[float, float]) -> tuple[float, float] | None:
    finite = [(value, x) for x, value in points.items() if math.isfinite(value)]
    if not finite:
        return None
    value, x = max(finite)
    return value, x


def _objective_rows(history: RunHistory) -> list[tuple[str, ...]]:
    objectives = sorted(
        {
            label
            for name in ("tolaria.train.loss", "tolaria.val.loss", "tolaria.val.accuracy")
            for label in history.series.get(name, {})
        }
    )
    rows: list[tuple[str, ...]] = [("objective", "train loss", "val loss", "val accuracy", "best val accuracy")]
    for objective in objectives:
        best = _best(history.series.get("tolaria.val.accuracy", {}).get(objective, {}))
        rows.append(
            (
                objective or "(all)",
                _format_value(history.last("tolaria.train.loss", objective)),
                _format_value(history.last("tolaria.val.loss", objective)),
                _format_value(history.last("tolaria.val.accuracy", objective)),
                f"{best[0]:.4g} (epoch {best[1]:.0f})" if best else "-",
            )
        )
    return rows


def _emergency_summary(history: RunHistory) -> str:
    """Return ``"max <level>, last <level>"`` of the run's emergency level.

    The max is the highest ``tolaria.emergency.max_level`` (each epoch's highest level,
    escalations inside the epoch included). A run that does not report it falls back to
    the highest ``tolaria.emergency.level``, which holds only the level at each epoch end.
    The last level is read from the ``tolaria.emergency.level`` series without
    attributes, or else from the one labelled ``current``.
    """
    series = history.series.get("tolaria.emergency.level", {})
    maxima = history.series.get("tolaria.emergency.max_level") or series
    highest = max((value for points in maxima.values() for value in points.values()), default=None)
    label = "" if "" in series else "current"
    return f"max {_emergency_name(highest)}, last {_emergency_name(history.last('tolaria.emergency.level', label))}"


def _run_rows(history: RunHistory) -> list[tuple[str, str]]:
    packets = history.packets
    last = packets[-1]
    epochs = {packet.epoch for packet in packets if _is_epoch_packet(packet)}
    kinds = Counter(marker.kind for marker in history.markers)
    timeouts = {role: round(history.counters.get(name, 0.0)) for role, name in _TIMEOUT_COUNTERS.items()}
    timeout_text = f"{sum(timeouts.values())} (controller {timeouts['controller']}, executor {timeouts['executor']})"
    return [
        ("run id", last.run_id or "-"),
        ("epochs reported", str(len(epochs))),
        ("last step", str(last.step)),
        ("packets", f"{len(packets)} ({len(history.invalid_lines)} invalid lines skipped)"),
        ("rollbacks", f"{kinds['rollback']} completed, {kinds['rollback failed']} failed"),
        ("timeouts", timeout_text),
        ("control call failures", f"controller {kinds['controller failure']}, executor {kinds['executor failure']}"),
        ("skipped steps", str(kinds["skipped step"])),
        ("loss spikes", str(kinds["loss spike"])),
        ("emergency level", _emergency_summary(history)),
    ]


def _counter_rows(history: RunHistory) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("counter", "total")]
    rows.extend((name, _format_value(value, 10)) for name, value in sorted(history.counters.items()))
    return rows


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_summary(history: RunHistory) -> str:
    """Return the terminal summary: run-level counts, counter totals, then one row per objective."""
    lines = _table(_run_rows(history))
    for rows in (_counter_rows(history), _objective_rows(history)):
        if len(rows) > 1:
            lines += ["", *_table(rows)]
    return "\n".join(lines) + "\n"


def _check_run_dir(run_dir: Path) -> Path:
    """Return the telemetry file of ``run_dir``.

    Raises:
        ReportInputError: ``run_dir`` is missing or is not a folder.
    """
    if not run_dir.exists():
        raise ReportInputError(f"run folder {run_dir} does not exist; pass the RUN_DIR of a tolaria run")
    if not run_dir.is_dir():
        raise ReportInputError(f"run folder {run_dir} is not a folder; pass the RUN_DIR of a tolaria run")
    return run_dir / TELEMETRY_FILE


def run_report(run_dir: Path, *, out: TextIO | None = None) -> int:
    """Write ``run_dir/report.png`` from ``run_dir/telemetry.jsonl``, print the summary to ``out``, return 0.

    Args:
        run_dir: folder of a run (the ``--out`` folder of ``tolaria demo``).
        out: where the summary goes; standard output by default.

    Raises:
        ReportInputError: ``run_dir`` or its telemetry file is missing, or the file contains
            no valid packet. The CLI prints the message and exits with code 2.
        ImportError: matplotlib is missing (``pip install 'tolaria[plot]'``).
        OSError: ``report.png`` cannot be written.
    """
    from tolaria.report_figure import draw_report

    stream = out if out is not None else sys.stdout
    history = load_history(_check_run_dir(Path(run_dir)))
    image = Path(run_dir) / REPORT_FILE
    draw_report(history, image, title=f"{Path(run_dir).name} (run {history.packets[-1].run_id or '-'})")
    stream.write(format_summary(history))
    stream.write(f"\nreport written to {image}\n")
    return 0
