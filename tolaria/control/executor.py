"""``OptimizerExecutor``: the reference executor (Kasmina) used by the demo."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from tolaria.control.commands import AdaptationCommand, CommandKind, CommandRejected
from tolaria.worker import CancelToken

__all__ = ["OptimizerExecutor"]

logger = logging.getLogger(__name__)

_KINDS = ", ".join(kind.value for kind in CommandKind)
_LR_PARAMETERS = ("factor", "lr")


def _positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class OptimizerExecutor:
    """Apply ``noop`` and ``adjust_lr`` commands to an optimizer's parameter groups.

    ``adjust_lr`` takes exactly one parameter: ``factor`` multiplies every group's
    learning rate, ``lr`` sets every group's learning rate. The command is checked
    against every group before any group changes, so a rejected command changes nothing.
    A learning rate is never set to a value that is ``<= 0`` or not finite.

    NOTE: the executor writes ``param_group["lr"]`` from a worker thread; the control
    loop calls it between epochs, while the training thread waits for the outcome.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def validate(self, command: AdaptationCommand) -> list[float]:
        """Return the learning rate each parameter group would get.

        Raises:
            CommandRejected: unknown kind, unknown or invalid parameter, or a resulting
                learning rate that is ``<= 0`` or not finite.
        """
        current = [float(group["lr"]) for group in self.optimizer.param_groups]
        if command.kind == CommandKind.NOOP:
            if command.parameters:
                raise CommandRejected(command, f"noop takes no parameters, got {sorted(command.parameters)}")
            return current
        if command.kind != CommandKind.ADJUST_LR:
            raise CommandRejected(command, f"unknown command kind {command.kind!r}; expected one of {_KINDS}")
        return self._new_learning_rates(command, current)

    def apply_command(self, command: AdaptationCommand, cancel: CancelToken | None = None) -> None:
        """Validate ``command`` and apply it unless ``cancel`` was set first.

        Raises:
            CommandRejected: see ``validate``; nothing was changed.
            TaskCancelled: ``cancel`` was set before anything changed.
        """
        learning_rates = self.validate(command)
        if cancel is not None:
            cancel.raise_if_cancelled()
        if command.kind == CommandKind.NOOP:
            return
        for group, lr in zip(self.optimizer.param_groups, learning_rates, strict=True):
            group["lr"] = lr
        logger.info("command %r set the learning rates to %s (%s)", command.id, learning_rates, command.reason)

    def _new_learning_rates(self, command: AdaptationCommand, current: list[float]) -> list[float]:
        parameters: Mapping[str, Any] = command.parameters
        unknown = sorted(set(parameters) - set(_LR_PARAMETERS))
        if unknown:
            reason = f"unknown adjust_lr parameters {unknown}; expected exactly one of factor, lr"
            raise CommandRejected(command, reason)
        if len(parameters) != 1:
            raise CommandRejected(command, f"adjust_lr needs exactly one of factor, lr; got {sorted(parameters)}")

        name, value = next(iter(parameters.items()))
        if not _positive_finite(value):
            raise CommandRejected(command, f"adjust_lr parameter {name}={value!r} must be a finite number > 0")
        proposed = [lr * value for lr in current] if name == "factor" else [float(value)] * len(current)
        for index, lr in enumerate(proposed):
            if not _positive_finite(lr):
                raise CommandRejected(
                    command, f"parameter group {index} would get learning rate {lr!r}; it must be finite and > 0"
                )
        return proposed
