"""Adaptation commands: the changes the controller requests from the executor at the end of an epoch."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["AdaptationCommand", "CommandKind", "CommandRejected"]


class CommandKind(enum.StrEnum):
    """Command kinds that the reference executor understands.

    ``noop`` changes nothing and takes no parameters. ``adjust_lr`` takes exactly one
    of ``factor`` (multiply every parameter group's learning rate) or ``lr`` (set it).
    """

    NOOP = "noop"
    ADJUST_LR = "adjust_lr"


@dataclasses.dataclass(frozen=True)
class AdaptationCommand:
    """An immutable command from the controller (Tamiyo) to the executor (Kasmina).

    ``kind`` is a plain string so that a command of an unknown kind can be built and
    then rejected, with a reason, by the executor.

    Attributes:
        id: identifier for logs and telemetry, for example ``"plateau-e7"``.
        kind: a ``CommandKind`` value or any other string.
        parameters: read-only parameters of the command, such as ``{"factor": 0.5}``.
        reason: why the controller issued the command.
        epoch: the epoch the command was issued for, or -1 when not tied to one.
    """

    id: str
    kind: str
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""
    epoch: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"kind must be a non-empty string, got {self.kind!r}")
        if not isinstance(self.parameters, Mapping):
            raise TypeError(f"parameters must be a mapping, got {type(self.parameters).__name__}")
        # A private copy behind a read-only view: the command cannot change after it was issued.
        object.__setattr__(self, "kind", str(self.kind))
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    def __reduce__(self) -> tuple[type[AdaptationCommand], tuple[Any, ...]]:
        # MappingProxyType cannot be pickled; rebuild from a plain dict instead.
        return (type(self), (self.id, self.kind, dict(self.parameters), self.reason, self.epoch))

    @classmethod
    def noop(cls, *, epoch: int = -1, reason: str = "", command_id: str | None = None) -> AdaptationCommand:
        """Return a command that changes nothing (id ``noop-e<epoch>`` unless ``command_id`` is given)."""
        return cls(command_id or f"noop-e{epoch}", CommandKind.NOOP, {}, reason, epoch)

    @classmethod
    def adjust_lr(
        cls, *, factor: float, epoch: int = -1, reason: str = "", command_id: str | None = None
    ) -> AdaptationCommand:
        """Return a command that multiplies every learning rate by ``factor`` (id ``adjust-lr-e<epoch>``)."""
        return cls(command_id or f"adjust-lr-e{epoch}", CommandKind.ADJUST_LR, {"factor": factor}, reason, epoch)


class CommandRejected(ValueError):
    """The executor rejected a command; nothing was applied.

    Attributes:
        command: the rejected command.
        reason: why it was rejected.
    """

    def __init__(self, command: AdaptationCommand, reason: str) -> None:
        super().__init__(f"command {command.id!r} ({command.kind}) rejected: {reason}")
        self.command = command
        self.reason = reason

    def __reduce__(self) -> tuple[type[CommandRejected], tuple[AdaptationCommand, str]]:
        return (type(self), (self.command, self.reason))
