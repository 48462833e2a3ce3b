"""``PlateauPolicy``: the reference controller (Tamiyo) used by the demo."""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from tolaria.control.commands import AdaptationCommand
from tolaria.control.state import EpochState

__all__ = ["PlateauPolicy"]

logger = logging.getLogger(__name__)


class PlateauPolicy:
    """Halve the learning rate after ``patience`` epochs without validation improvement.

    The monitored value is the validation loss of ``objective``, or the mean over the
    objectives (the training loss when the epoch has no validation loss). An epoch
    improves when the value drops below the best so far by more than ``min_delta``; a
    NaN or infinite value never improves. After ``patience`` epochs without improvement
    the policy returns ``adjust_lr`` with ``factor``, then waits another ``patience``
    epochs. Every other epoch gets ``noop``.

    Thread-safe: calls may overlap when an earlier call outlived its timeout.

    Args:
        patience: epochs without improvement before the learning rate changes, ``>= 1``.
        factor: multiplier of the learning rate, in ``(0, 1)``.
        objective: objective whose loss is monitored; ``None`` uses the mean.
        min_delta: smallest decrease that counts as an improvement, ``>= 0``.

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self, patience: int = 3, factor: float = 0.5, *, objective: str | None = None, min_delta: float = 0.0
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if not (isinstance(factor, (int, float)) and 0 < factor < 1):
            raise ValueError(f"factor must be a number in (0, 1), got {factor!r}")
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.patience = patience
        self.factor = float(factor)
        self.objective = objective
        self.min_delta = float(min_delta)
        self._lock = threading.Lock()
        self._best = math.inf
        self._best_epoch = -1
        self._stale_epochs = 0

    def evaluate_epoch(self, state: EpochState) -> AdaptationCommand:
        """Return ``adjust_lr`` after a plateau of ``patience`` epochs, else ``noop``.

        Raises:
            KeyError: ``objective`` is not among the epoch's losses.
        """
        value = state.monitored_loss(self.objective)
        with self._lock:
            if math.isfinite(value) and value < self._best - self.min_delta:
                self._best, self._best_epoch, self._stale_epochs = value, state.epoch, 0
                return AdaptationCommand.noop(epoch=state.epoch, reason=f"monitored loss improved to {value:.6g}")

            self._stale_epochs += 1
            if self._stale_epochs < self.patience:
                reason = f"no improvement for {self._stale_epochs} of {self.patience} epochs"
                return AdaptationCommand.noop(epoch=state.epoch, reason=reason)

            self._stale_epochs = 0
            reason = (
                f"monitored loss has not improved for {self.patience} epochs "
                f"(best {self._best:.6g} at epoch {self._best_epoch}); multiplying the learning rate by {self.factor}"
            )
        logger.info("plateau at epoch %d: %s", state.epoch, reason)
        return AdaptationCommand.adjust_lr(
            factor=self.factor, epoch=state.epoch, reason=reason, command_id=f"plateau-e{state.epoch}"
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the policy's progress, for checkpoints."""
        with self._lock:
            return {"best": self._best, "best_epoch": self._best_epoch, "stale_epochs": self._stale_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by ``state_dict``.

        Raises:
            KeyError: a key is missing.
        """
        with self._lock:
            self._best = float(state["best"])
            self._best_epoch = int(state["best_epoch"])
            self._stale_epochs = int(state["stale_epochs"])
