"""``EpochState``: the controller's input at the end of an epoch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["EpochState"]


def _empty() -> Mapping[str, float]:
    return MappingProxyType({})


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _frozen_floats(name: str, values: Mapping[str, float]) -> Mapping[str, float]:
    if not isinstance(values, Mapping):
        raise TypeError(f"{name} must be a mapping of names to floats, got {type(values).__name__}")
    converted: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}[{key!r}] must be a Python float (call .item() on tensors), got {value!r}")
        converted[key] = float(value)
    return MappingProxyType(converted)


@dataclasses.dataclass(frozen=True)
class EpochState:
    """An immutable summary of one finished epoch, the input of ``TamiyoClient.evaluate_epoch``.

    Values are Python floats (host values, not tensors). NaN and infinities are kept:
    a non-finite loss is information for the controller.

    Attributes:
        epoch: index of the finished epoch, from 0.
        global_step: optimizer steps taken so far.
        train_loss: mean training loss per objective name.
        val_loss: validation loss per objective name (empty without validation data).
        train_accuracy: training accuracy per objective, between 0 and 1, where measured.
        val_accuracy: validation accuracy per objective, between 0 and 1, where measured.
        aggregation: gradient-aggregation statistics of the epoch, such as
            ``conflict_ratio`` and ``cosine_min``.
        learning_rates: learning rate of each optimizer parameter group.
        conservative: whether training was in conservative mode during the epoch.
        emergency_level: the emergency level (0 NOMINAL to 4 HALT), or ``None`` when
            no emergency controller runs.

    Raises:
        ValueError: a negative epoch, step or emergency level.
        TypeError: a mapping with non-string keys or non-float values.
    """

    epoch: int
    global_step: int
    train_loss: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    val_loss: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    train_accuracy: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    val_accuracy: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    aggregation: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    learning_rates: tuple[float, ...] = ()
    conservative: bool = False
    emergency_level: int | None = None

    def __post_init__(self) -> None:
        for name in ("epoch", "global_step"):
            _check_count(name, getattr(self, name))
        if self.emergency_level is not None:
            _check_count("emergency_level", self.emergency_level)
        for name in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "aggregation"):
            object.__setattr__(self, name, _frozen_floats(name, getattr(self, name)))
        object.__setattr__(self, "learning_rates", tuple(float(lr) for lr in self.learning_rates))

    def __reduce__(self) -> tuple[type[EpochState], tuple[Any, ...]]:
        # MappingProxyType cannot be pickled; rebuild from plain dicts instead.
        return (
            type(self),
            (
                self.epoch,
                self.global_step,
                dict(self.train_loss),
                dict(self.val_loss),
                dict(self.train_accuracy),
                dict(self.val_accuracy),
                dict(self.aggregation),
                self.learning_rates,
                self.conservative,
                self.emergency_level,
            ),
        )

    def monitored_loss(self, objective: str | None = None) -> float:
        """Return the validation loss of ``objective``, or the mean over objectives.

        Falls back to the training loss when there is no validation loss; returns NaN
        when there is neither.

        Raises:
            KeyError: ``objective`` is not among the losses.
        """
        losses = self.val_loss or self.train_loss
        if objective is not None:
            if objective not in losses:
                raise KeyError(f"objective {objective!r} not among the losses {sorted(losses)}")
            return losses[objective]
        if not losses:
            return math.nan
        return sum(losses.values()) / len(losses)
