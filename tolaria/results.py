"""Result records returned by ``Trainer.fit``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["EpochMetrics", "FitResult"]


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured, as Python numbers read from the device once per epoch.

    Attributes:
        epoch: 0-based epoch index.
        global_step: optimizer steps taken since the run started, at the end of the epoch.
        train_loss: mean training loss per objective over the epoch's applied steps.
        val_loss: mean validation loss per objective; empty without validation data.
        val_accuracy: validation accuracy per objective in [0, 1]; empty without
            validation data or an ``accuracy`` function.
        aggregation: epoch means of the aggregation statistics: ``conflict_ratio``,
            ``conflicts``, ``cosine_min`` and ``latency_ms``.
        learning_rates: learning rate of each optimizer parameter group at the end.
        samples_per_s: training throughput in samples per second.
        skipped_steps: steps whose update was skipped (non-finite loss or gradient, or an fp16
            ``GradScaler`` overflow).
        wall_time_s: seconds the epoch took, validation included.
        extra: further per-epoch values reported by safety and control components.
    """

    epoch: int
    global_step: int
    train_loss: Mapping[str, float]
    val_loss: Mapping[str, float]
    val_accuracy: Mapping[str, float]
    aggregation: Mapping[str, float]
    learning_rates: tuple[float, ...]
    samples_per_s: float
    skipped_steps: int
    wall_time_s: float
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-compatible dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """The outcome of ``Trainer.fit``.

    Attributes:
        epochs: metrics of each completed epoch, in order.
        global_step: optimizer steps taken when ``fit`` returned.
        wall_time_s: seconds ``fit`` ran.
        halted: whether training stopped early because the emergency level reached HALT.
        halt_reason: why it halted; ``None`` when it did not.
    """

    epochs: tuple[EpochMetrics, ...]
    global_step: int
    wall_time_s: float
    halted: bool = False
    halt_reason: str | None = None

    @property
    def last(self) -> EpochMetrics | None:
        """Metrics of the last completed epoch, or ``None`` when no epoch completed."""
        return self.epochs[-1] if self.epochs else None
