"""Terminal output and result files of the ``tolaria`` command."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tolaria.results import EpochMetrics

__all__ = ["EpochTable", "finite_or_none", "write_json_atomic"]


def finite_or_none(value: float) -> float | None:
    """Return ``value``, or ``None`` for NaN and infinities, which JSON cannot hold."""
    return value if math.isfinite(value) else None


class EpochTable:
    """Prints one row per epoch: training loss and validation accuracy per objective.

    The ``conflict`` column is the epoch's mean conflict ratio, or ``-`` for an epoch
    without aggregation statistics. Epochs are numbered from 1, as in ``tolaria
    report``. Telemetry packets count them from 0.

    Args:
        objectives: column order.
    """

    def __init__(self, objectives: Sequence[str]) -> None:
        self.objectives = tuple(objectives)

    def print_header(self) -> None:
        """Print the two header lines."""
        losses = " ".join(f"{name:>7}" for name in self.objectives)
        accuracy = " ".join(f"{name[:6]:>6}" for name in self.objectives)
        print(f"{'epoch':>5}  {losses}   {accuracy}   {'conflict':>8}  {'skipped':>7}  {'time s':>6}")
        loss_width = 8 * len(self.objectives) - 1
        accuracy_width = 7 * len(self.objectives) - 1
        print(f"{'':>5}  {'train loss':^{loss_width}}   {'val accuracy':^{accuracy_width}}")

    def __call__(self, metrics: EpochMetrics) -> None:
        """Print the row of one epoch."""
        losses = " ".join(f"{metrics.train_loss.get(name, math.nan):7.4f}" for name in self.objectives)
        accuracy = " ".join(f"{metrics.val_accuracy.get(name, math.nan):6.3f}" for name in self.objectives)
        ratio = metrics.aggregation.get("conflict_ratio", math.nan)
        # The linear aggregators compute statistics every stats_every steps, so an epoch may have none.
        conflict = "-" if math.isnan(ratio) else f"{ratio:.3f}"
        print(
            f"{metrics.epoch + 1:5d}  {losses}   {accuracy}   {conflict:>8}  {metrics.skipped_steps:7d}  "
            f"{metrics.wall_time_s:6.2f}",
            flush=True,
        )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, ``fsync`` and a rename.

    A crash or a failed write leaves any previous file at ``path`` untouched.

    Raises:
        OSError: the write failed; the temporary file is removed.
        ValueError: ``data`` contains NaN or infinities.
    """
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file readable by its owner only; give it the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, allow_nan=False)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
