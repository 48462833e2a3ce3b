"""The two roles of the control loop: the controller (Tamiyo) and the executor (Kasmina)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tolaria.control.commands import AdaptationCommand
from tolaria.control.state import EpochState

__all__ = ["KasminaClient", "TamiyoClient"]


@runtime_checkable
class TamiyoClient(Protocol):
    """The controller: reads an epoch's state and returns an adaptation command.

    The call runs on the shared worker under a timeout. An implementation may add a
    keyword parameter ``cancel``; it then receives the task's ``CancelToken``, which
    is set at the deadline. Synchronous methods and coroutine functions both work.
    """

    def evaluate_epoch(self, state: EpochState) -> AdaptationCommand:
        """Return the command for the epoch that just ended."""
        ...


@runtime_checkable
class KasminaClient(Protocol):
    """The executor: validates and applies an adaptation command.

    It raises ``CommandRejected`` with a reason, and changes nothing, when a command
    has an unknown kind or invalid parameters. Like the controller, it may declare a
    ``cancel`` keyword parameter. It must then check the token before changing anything,
    because a timed-out executor that ignores its token may still apply the command later.
    """

    def apply_command(self, command: AdaptationCommand) -> None:
        """Apply ``command``, or raise ``CommandRejected`` having changed nothing."""
        ...
