"""The per-epoch telemetry packet of the trainer."""

from __future__ import annotations

from tolaria.results import EpochMetrics
from tolaria.telemetry import Telemetry

__all__ = ["publish_epoch"]


def publish_epoch(telemetry: Telemetry, metrics: EpochMetrics) -> None:
    """Record an epoch's metrics and write them, with the buffered events, as one packet.

    Losses and accuracies carry an ``objective`` attribute, learning rates a ``group``
    attribute (the parameter group's index).
    """
    for name, value in metrics.train_loss.items():
        telemetry.metric("tolaria.train.loss", value, "1", objective=name)
    for name, value in metrics.val_loss.items():
        telemetry.metric("tolaria.val.loss", value, "1", objective=name)
    for name, value in metrics.val_accuracy.items():
        telemetry.metric("tolaria.val.accuracy", value, "1", objective=name)
    for key, value in metrics.aggregation.items():
        unit = "ms" if key == "latency_ms" else "1"
        telemetry.metric(f"tolaria.grad_agg.{key}", value, unit)
    for index, lr in enumerate(metrics.learning_rates):
        telemetry.metric("tolaria.optim.lr", lr, "1", group=index)
    telemetry.metric("tolaria.train.throughput", metrics.samples_per_s, "samples/s")
    telemetry.metric("tolaria.train.skipped_steps", metrics.skipped_steps, "1")
    telemetry.metric("tolaria.train.epoch_ms", metrics.wall_time_s * 1000.0, "ms")
    telemetry.flush(metrics.epoch, metrics.global_step)
