"""A small two-objective regression problem and recorders shared by the Trainer integration tests.

The model is a shared ``tanh`` trunk and two linear heads. Its optional dropout makes
resuming depend on the RNG state. Each epoch has ``SAMPLES / BATCH_SIZE`` batches in
an order drawn from ``(seed, epoch)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from tolaria import Trainer, TrainerConfig
from tolaria.data import EpochBatches
from tolaria.loop import StepRecord
from tolaria.telemetry import InMemorySink, Telemetry

__all__ = [
    "BATCHES_PER_EPOCH",
    "BATCH_SIZE",
    "SAMPLES",
    "StepLog",
    "TwoHeadNet",
    "make_trainer",
    "recording_telemetry",
    "regression_data",
    "regression_objectives",
]

SAMPLES = 256
BATCH_SIZE = 32
BATCHES_PER_EPOCH = SAMPLES // BATCH_SIZE


class TwoHeadNet(nn.Module):
    """A shared trunk ``[B, 4] -> [B, 16]`` with two scalar regression heads."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(dropout))
        self.head_a = nn.Linear(16, 1)
        self.head_b = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.trunk(x)
        return self.head_a(shared).squeeze(-1), self.head_b(shared).squeeze(-1)


def regression_objectives(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> Mapping[str, torch.Tensor]:
    """Mean squared error of each head on an ``(x, y_a, y_b)`` batch."""
    x, y_a, y_b = batch
    out_a, out_b = model(x)
    return {"a": nn.functional.mse_loss(out_a, y_a), "b": nn.functional.mse_loss(out_b, y_b)}


def regression_data(samples: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``x [samples, 4]`` and two smooth targets ``[samples]``, drawn from a fixed seed."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 4, generator=generator)
    return x, x[:, 0] - 2 * x[:, 1], torch.sin(x[:, 2]) + 0.5 * x[:, 3]


def recording_telemetry() -> tuple[Telemetry, InMemorySink]:
    """Return a telemetry object that keeps every packet in memory, and its sink."""
    sink = InMemorySink()
    return Telemetry([sink], source="test"), sink


def make_trainer(
    config: TrainerConfig,
    *,
    dropout: float = 0.0,
    objectives: Any = regression_objectives,
    train_data: Iterable[Any] | None = None,
    scheduler: bool = False,
    **kwargs: Any,
) -> Trainer:
    """Build a fresh model, Adam optimizer (and optional ``StepLR``) and a ``Trainer`` over them.

    Every call draws the same initial weights, so two trainers built with the same
    arguments run the same computation.
    """
    torch.manual_seed(0)
    model = TwoHeadNet(dropout)
    x, y_a, y_b = regression_data()
    train = train_data if train_data is not None else EpochBatches(x, y_a, y_b, batch_size=BATCH_SIZE, seed=0)
    val = EpochBatches(x[:64], y_a[:64], y_b[:64], batch_size=64, shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7) if scheduler else None
    return Trainer(model, optimizer, objectives, train, val, config, lr_scheduler=lr_scheduler, **kwargs)


@dataclasses.dataclass
class StepLog:
    """A step callback that keeps every ``StepRecord`` (losses copied) and when it arrived."""

    records: list[StepRecord] = dataclasses.field(default_factory=list)
    arrived_s: list[float] = dataclasses.field(default_factory=list)

    def __call__(self, record: StepRecord) -> None:
        self.records.append(dataclasses.replace(record, losses=record.losses.detach().clone()))
        self.arrived_s.append(time.monotonic())

    @property
    def positions(self) -> list[tuple[int, int, int]]:
        """``(epoch, batch, global_step)`` of every recorded step, in order."""
        return [(record.epoch, record.batch, record.global_step) for record in self.records]
