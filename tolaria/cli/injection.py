"""Loss faults for ``tolaria demo --inject``: a NaN loss or a ×1000 spike at a chosen step."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from tolaria.control import Fault
from tolaria.step import Objectives

__all__ = ["LOSS_FAULTS", "SPIKE_FACTOR", "LossFaults"]

logger = logging.getLogger(__name__)

LOSS_FAULTS = ("nan", "spike")
SPIKE_FACTOR = 1000.0


class LossFaults:
    """Wraps objectives so that chosen training steps return corrupted losses.

    Training calls are counted from 0 (calls with the model in eval mode, which is
    validation, are not counted); the count keeps growing across rollbacks, so each
    fault fires exactly once. ``nan@K`` makes every loss of call K NaN; ``spike@K``
    multiplies every loss of call K by ``SPIKE_FACTOR``.
    """

    def __init__(self, objectives: Objectives, faults: Iterable[Fault]) -> None:
        self.objectives = objectives
        self.nan_steps = frozenset(fault.at for fault in faults if fault.kind == "nan")
        self.spike_steps = frozenset(fault.at for fault in faults if fault.kind == "spike")
        self.calls = 0

    def __call__(self, model: torch.nn.Module, batch: Any) -> Mapping[str, torch.Tensor]:
        """Return the wrapped objectives' losses, corrupted at the chosen steps."""
        losses = self.objectives(model, batch)
        if not model.training:
            return losses
        call = self.calls
        self.calls += 1
        if call in self.nan_steps:
            logger.warning("injecting a NaN loss at training step %d", call)
            return {name: loss * math.nan for name, loss in losses.items()}
        if call in self.spike_steps:
            logger.warning("injecting a loss spike (x%g) at training step %d", SPIKE_FACTOR, call)
            return {name: loss * SPIKE_FACTOR for name, loss in losses.items()}
        return losses
