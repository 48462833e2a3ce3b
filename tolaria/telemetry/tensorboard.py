"""A telemetry sink that writes TensorBoard event files through ``torch.utils.tensorboard``.

Mapping of a packet (the global step of every record is ``packet.step`` and its wall
time ``packet.wall_time_s``):

- each metric becomes a scalar. Its tag is the metric name, followed by ``/`` and the
  sorted ``key=value`` attributes joined by ``,`` when it has attributes, for example
  ``tolaria.train.loss/objective=digit``. Counter totals are scalars like any other.
- each event becomes a text entry under the tag ``events/<event name>``, whose Markdown
  body gives the level, the sequence number and the attributes.

Needs the ``tensorboard`` package: ``pip install 'tolaria[tensorboard]'``. In distributed
training give each rank its own ``log_dir`` (for example ``runs/x/tb/rank0``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tolaria.telemetry.records import Event, Metric, TelemetryPacket

__all__ = ["TensorBoardSink", "event_tag", "scalar_tag"]

_INSTALL_HINT = "pip install 'tolaria[tensorboard]'"


def _summary_writer_class() -> Any:
    """Import ``SummaryWriter`` only when a sink is created, so tolaria works without tensorboard.

    Raises:
        ImportError: tensorboard is not installed; the message names the extra to install.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(f"TensorBoardSink needs the tensorboard package: {_INSTALL_HINT}") from error
    return SummaryWriter


def _format_attributes(attributes: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={attributes[key]}" for key in sorted(attributes))


def scalar_tag(metric: Metric) -> str:
    """Return the TensorBoard tag of ``metric``: its name, plus ``/key=value,...`` when it has attributes."""
    if not metric.attributes:
        return metric.name
    return f"{metric.name}/{_format_attributes(metric.attributes)}"


def event_tag(event: Event) -> str:
    """Return the TensorBoard text tag of ``event``: ``events/<name>``."""
    return f"events/{event.name}"


def _event_markdown(event: Event) -> str:
    details = ", ".join(f"`{key}`={event.attributes[key]!r}" for key in sorted(event.attributes))
    return f"**{event.level.name}** (sequence {event.sequence}) {details}".rstrip()


class TensorBoardSink:
    """Write each packet's metrics as scalars and its events as text to a TensorBoard log folder.

    Args:
        log_dir: folder of the event files; created when missing.
        flush_each_packet: flush the event file after every packet (the default), so
            TensorBoard shows an epoch as soon as it ends. Otherwise ``SummaryWriter``
            flushes every 120 s (its ``flush_secs`` default) and on ``close``.

    Raises:
        ImportError: tensorboard is not installed (``pip install 'tolaria[tensorboard]'``).
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, flush_each_packet: bool = True) -> None:
        writer_class = _summary_writer_class()
        self.log_dir = Path(log_dir)
        self._flush_each_packet = flush_each_packet
        self._writer = writer_class(log_dir=str(self.log_dir))

    def write(self, packet: TelemetryPacket) -> None:
        """Add the packet's metrics and events at step ``packet.step``."""
        for metric in packet.metrics:
            self._writer.add_scalar(
                scalar_tag(metric), metric.value, global_step=packet.step, walltime=packet.wall_time_s
            )
        for event in packet.events:
            self._writer.add_text(
                event_tag(event), _event_markdown(event), global_step=packet.step, walltime=packet.wall_time_s
            )
        if self._flush_each_packet:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()
