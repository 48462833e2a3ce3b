"""The figure of ``tolaria report``: six panels over the epoch axis, with event markers.

Panels: loss per objective (training solid, validation dashed), accuracy per objective
(validation solid, training dashed when reported), gradient conflict ratio, emergency
level, learning rate, and throughput. Rollbacks, controller and executor timeouts and
failures, skipped steps and loss spikes are vertical lines across every panel. The
emergency panel draws the level at each epoch end, the highest level inside each epoch,
and each escalation as a point. The figure is drawn with matplotlib's Agg canvas, without pyplot, so it needs no
display and leaves matplotlib's global state alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tolaria.functional.emergency import Level as EmergencyLevel
from tolaria.report import RunHistory

__all__ = ["draw_report"]

_INSTALL_HINT = "pip install 'tolaria[plot]'"

# Marker kind -> (colour, line style); a missing kind is not drawn as a line.
_LINE_MARKERS = {
    "rollback": ("tab:purple", "-"),
    "rollback failed": ("black", "-"),
    "controller timeout": ("tab:orange", "--"),
    "controller failure": ("tab:orange", "-"),
    "executor timeout": ("tab:olive", "--"),
    "executor failure": ("tab:olive", "-"),
    "skipped step": ("tab:red", ":"),
    "loss spike": ("tab:brown", "-."),
}


def _matplotlib_classes() -> tuple[Any, Any, Any]:
    """Import matplotlib only when a report is drawn; return the figure, canvas and tick locator classes.

    Raises:
        ImportError: matplotlib is not installed; the message names the extra to install.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(f"tolaria report needs matplotlib: {_INSTALL_HINT}") from error
    return Figure, FigureCanvasAgg, MaxNLocator


def _colours(labels: Iterable[str]) -> dict[str, str]:
    return {label: f"C{index % 10}" for index, label in enumerate(sorted(set(labels)))}


def _plot_series(axes: Any, history: RunHistory, name: str, colours: dict[str, str], style: str, suffix: str) -> bool:
    """Plot every label of metric ``name``; return whether anything was drawn."""
    drawn = False
    for label, points in sorted(history.values(name).items()):
        xs, ys = zip(*points, strict=True)
        text = f"{label} {suffix}".strip() if label else suffix or name
        axes.plot(xs, ys, style, color=colours.get(label, "C0"), marker="o", markersize=3, label=text)
        drawn = True
    return drawn


def _finish_axes(axes: Any, title: str, drawn: bool, *, legend: bool = True) -> None:
    axes.set_title(title, fontsize=10)
    axes.grid(visible=True, alpha=0.3)
    if not drawn:
        axes.text(0.5, 0.5, "not reported", transform=axes.transAxes, ha="center", va="center", color="gray")
    elif legend:
        axes.legend(fontsize=7, loc="best")


def _use_log_scale(axes: Any, history: RunHistory, names: Iterable[str]) -> None:
    """Switch ``axes`` to a log y scale when every value is positive and they span over 100x."""
    values = [v for name in names for points in history.values(name).values() for _, v in points if math.isfinite(v)]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        axes.set_yscale("log")


def _loss_panel(axes: Any, history: RunHistory, colours: dict[str, str]) -> None:
    drawn = _plot_series(axes, history, "tolaria.train.loss", colours, "-", "train")
    drawn = _plot_series(axes, history, "tolaria.val.loss", colours, "--", "val") or drawn
    _use_log_scale(axes, history, ("tolaria.train.loss", "tolaria.val.loss"))
    _finish_axes(axes, "loss per objective", drawn)


def _accuracy_panel(axes: Any, history: RunHistory, colours: dict[str, str]) -> None:
    drawn = _plot_series(axes, history, "tolaria.val.accuracy", colours, "-", "val")
    drawn = _plot_series(axes, history, "tolaria.train.accuracy", colours, "--", "train") or drawn
    _finish_axes(axes, "accuracy per objective", drawn)


def _emergency_levels(axes: Any, history: RunHistory) -> bool:
    """Draw the level at each epoch end and the highest level in each epoch; return whether anything was drawn."""
    drawn = False
    for label, points in sorted(history.values("tolaria.emergency.level").items()):
        xs, ys = zip(*points, strict=True)
        # A value is the level at the end of its epoch, so it is drawn over that epoch.
        axes.step(xs, ys, where="pre", marker="o", markersize=3, label=label or "level at epoch end")
        drawn = True
    for label, points in sorted(history.values("tolaria.emergency.max_level").items()):
        xs, ys = zip(*points, strict=True)
        text = f"{label} max in epoch" if label else "max in epoch"
        axes.step(xs, ys, where="pre", linestyle="--", color="tab:gray", marker="v", markersize=3, label=text)
        drawn = True
    return drawn


def _emergency_panel(axes: Any, history: RunHistory) -> None:
    drawn = _emergency_levels(axes, history)
    escalations = [marker for marker in history.markers if marker.kind == "escalation"]
    if escalations:
        levels = [_level_value(marker.attributes.get("level")) for marker in escalations]
        axes.scatter([m.x for m in escalations], levels, color="tab:red", marker="^", zorder=3, label="escalation")
        drawn = True
    axes.set_yticks([level.value for level in EmergencyLevel], [level.name for level in EmergencyLevel], fontsize=7)
    axes.set_ylim(-0.3, max(EmergencyLevel) + 0.3)
    _finish_axes(axes, "emergency level", drawn)


def _level_value(level: object) -> float:
    """Return the numeric emergency level of an event attribute (a name or a number)."""
    if isinstance(level, str) and level.upper() in EmergencyLevel.__members__:
        return float(EmergencyLevel[level.upper()])
    if isinstance(level, (int, float)) and not isinstance(level, bool):
        return float(level)
    return float(EmergencyLevel.NOTICE)


def _single_panel(axes: Any, history: RunHistory, name: str, title: str, *, log: bool = False) -> None:
    drawn = _plot_series(axes, history, name, _colours(history.series.get(name, {})), "-", "")
    if log:
        _use_log_scale(axes, history, (name,))
    _finish_axes(axes, title, drawn, legend=len(history.series.get(name, {})) > 1)


def _draw_markers(figure: Any, panels: Iterable[Any], history: RunHistory) -> None:
    """Draw the line markers on every panel and one figure legend for the kinds present."""
    handles = {}
    for axes in panels:
        for marker in history.markers:
            style = _LINE_MARKERS.get(marker.kind)
            if style is not None:
                colour, line = style
                handles[marker.kind] = axes.axvline(marker.x, color=colour, linestyle=line, linewidth=1.2, alpha=0.8)
    if handles:
        kinds = sorted(handles)
        figure.legend([handles[kind] for kind in kinds], kinds, loc="upper right", ncols=len(kinds), fontsize=8)


def draw_report(history: RunHistory, path: Path, *, title: str) -> None:
    """Draw the report figure of ``history`` and save it as a PNG at ``path``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'tolaria[plot]'``).
        OSError: ``path`` cannot be written.
    """
    figure_class, canvas_class, locator_class = _matplotlib_classes()
    figure = figure_class(figsize=(13, 10), dpi=100, layout="constrained")
    canvas_class(figure)
    grid = figure.subplots(3, 2, sharex=True)
    panels = list(grid.flat)
    colours = _colours(
        label
        for name in ("tolaria.train.loss", "tolaria.val.loss", "tolaria.val.accuracy")
        for label in history.series.get(name, {})
    )
    _loss_panel(panels[0], history, colours)
    _accuracy_panel(panels[1], history, colours)
    _single_panel(panels[2], history, "tolaria.grad_agg.conflict_ratio", "gradient conflict ratio")
    _emergency_panel(panels[3], history)
    _single_panel(panels[4], history, "tolaria.optim.lr", "learning rate", log=True)
    _single_panel(panels[5], history, "tolaria.train.throughput", "throughput (samples/s)")
    for axes in panels[4:]:
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(locator_class(integer=True))
    _draw_markers(figure, panels, history)
    figure.suptitle(title, x=0.01, ha="left", fontsize=12)
    figure.savefig(path, format="png")
