"""Fault injection for the demo and tests: controllers and executors that hang or raise on chosen epochs.

Faults are written ``NAME@EPOCH``, for example ``tamiyo-hang@3``. The controller faults
are ``tamiyo-hang``, ``tamiyo-error``, ``kasmina-hang`` and ``kasmina-error``. Callers
that handle further faults themselves (for example ``nan@STEP``) pass their names in
``extra_kinds``: those tokens are parsed the same way and returned with the others, and
the wrappers here ignore them.

A hang is cooperative: the wrapper waits on the task's ``CancelToken``, so it ends at the
worker's deadline and its thread is free again. Called without a token, it sleeps for
``hang_s`` seconds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Iterable
from typing import Any

from tolaria.control.clients import KasminaClient, TamiyoClient
from tolaria.control.commands import AdaptationCommand
from tolaria.control.state import EpochState
from tolaria.worker import CancelToken

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultPlan",
    "FaultyKasmina",
    "FaultyTamiyo",
    "InjectedFault",
    "parse_fault",
    "parse_faults",
]

FAULT_KINDS = ("tamiyo-hang", "tamiyo-error", "kasmina-hang", "kasmina-error")

# Long enough to outlast any sensible timeout; the cancel token ends the hang much sooner.
DEFAULT_HANG_S = 3600.0


class InjectedFault(RuntimeError):
    """The error an ``*-error`` fault raises."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault: its kind and when it fires.

    Attributes:
        kind: one of ``FAULT_KINDS`` or of the caller's ``extra_kinds``.
        at: the epoch (controller faults) or the position the caller defines (extra kinds).
    """

    kind: str
    at: int

    def __str__(self) -> str:
        return f"{self.kind}@{self.at}"


def parse_fault(token: str, *, extra_kinds: Collection[str] = ()) -> Fault:
    """Parse ``NAME@N`` into a ``Fault``.

    Raises:
        ValueError: the token is not ``NAME@N`` with ``N`` an integer ``>= 0``, or
            ``NAME`` is neither a controller fault nor in ``extra_kinds``. The message
            echoes the token and lists the valid names.
    """
    valid = (*FAULT_KINDS, *sorted(extra_kinds))
    name, separator, position = token.strip().partition("@")
    if not separator or not position.strip().isdigit():
        raise ValueError(
            f"invalid fault {token!r}: expected NAME@N with N an integer >= 0, such as 'tamiyo-hang@3'; "
            f"valid names: {', '.join(valid)}"
        )
    name = name.strip()
    if name not in valid:
        raise ValueError(f"unknown fault {name!r} in {token!r}; valid names: {', '.join(valid)}")
    return Fault(name, int(position))


def parse_faults(tokens: Iterable[str], *, extra_kinds: Collection[str] = ()) -> tuple[Fault, ...]:
    """Parse every token with ``parse_fault``, keeping their order.

    Raises:
        ValueError: for the first invalid token.
    """
    return tuple(parse_fault(token, extra_kinds=extra_kinds) for token in tokens)


def _hang(cancel: CancelToken | None, hang_s: float) -> None:
    if cancel is None:
        time.sleep(hang_s)
        return
    cancel.wait(hang_s)
    cancel.raise_if_cancelled()


class FaultyTamiyo:
    """A controller that hangs or raises at chosen epochs and otherwise delegates to ``inner``.

    Args:
        inner: the controller called on every other epoch.
        hang_epochs: epochs at which the call hangs (until cancelled, or ``hang_s``).
        error_epochs: epochs at which the call raises ``InjectedFault``.
        hang_s: the maximum hang, in seconds.
    """

    def __init__(
        self,
        inner: TamiyoClient,
        *,
        hang_epochs: Collection[int] = (),
        error_epochs: Collection[int] = (),
        hang_s: float = DEFAULT_HANG_S,
    ) -> None:
        self.inner = inner
        self.hang_epochs = frozenset(hang_epochs)
        self.error_epochs = frozenset(error_epochs)
        self.hang_s = hang_s

    def evaluate_epoch(self, state: EpochState, cancel: CancelToken | None = None) -> AdaptationCommand:
        """Hang or raise when ``state.epoch`` is a fault epoch, else return ``inner``'s command.

        Raises:
            InjectedFault: at an error epoch.
            TaskCancelled: a hang was cancelled.
        """
        if state.epoch in self.error_epochs:
            raise InjectedFault(f"injected tamiyo-error at epoch {state.epoch}")
        if state.epoch in self.hang_epochs:
            _hang(cancel, self.hang_s)
        return self.inner.evaluate_epoch(state)

    def state_dict(self) -> dict[str, Any]:
        """Return ``inner``'s state (empty when it keeps none), so a resumed run continues it."""
        state_dict = getattr(self.inner, "state_dict", None)
        return dict(state_dict()) if callable(state_dict) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``inner``'s state saved by ``state_dict``."""
        load_state_dict = getattr(self.inner, "load_state_dict", None)
        if callable(load_state_dict) and state:
            load_state_dict(state)


class FaultyKasmina:
    """An executor that hangs or raises for commands of chosen epochs and otherwise calls ``inner``.

    The epoch is the command's ``epoch`` field.

    Args:
        inner: the executor to call for every other command.
        hang_epochs: epochs whose command makes the call hang.
        error_epochs: epochs whose command makes the call raise ``InjectedFault``.
        hang_s: the maximum hang, in seconds.
    """

    def __init__(
        self,
        inner: KasminaClient,
        *,
        hang_epochs: Collection[int] = (),
        error_epochs: Collection[int] = (),
        hang_s: float = DEFAULT_HANG_S,
    ) -> None:
        self.inner = inner
        self.hang_epochs = frozenset(hang_epochs)
        self.error_epochs = frozenset(error_epochs)
        self.hang_s = hang_s

    def apply_command(self, command: AdaptationCommand, cancel: CancelToken | None = None) -> None:
        """Hang or raise when ``command.epoch`` is a fault epoch, else let ``inner`` apply it.

        Raises:
            InjectedFault: at an error epoch; nothing is applied.
            TaskCancelled: a hang was cancelled; nothing is applied.
            CommandRejected: from ``inner``.
        """
        if command.epoch in self.error_epochs:
            raise InjectedFault(f"injected kasmina-error at epoch {command.epoch}")
        if command.epoch in self.hang_epochs:
            _hang(cancel, self.hang_s)
        self.inner.apply_command(command)


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """The faults of one run.

    Attributes:
        faults: every parsed fault, controller faults and extra kinds, in input order.
    """

    faults: tuple[Fault, ...] = ()

    @classmethod
    def parse(cls, tokens: Iterable[str], *, extra_kinds: Collection[str] = ()) -> FaultPlan:
        """Parse ``NAME@N`` tokens, for example the values of repeated ``--inject`` options.

        Raises:
            ValueError: for the first invalid token; see ``parse_fault``.
        """
        return cls(parse_faults(tokens, extra_kinds=extra_kinds))

    def at(self, kind: str) -> frozenset[int]:
        """Return the positions of the faults of ``kind``."""
        return frozenset(fault.at for fault in self.faults if fault.kind == kind)

    def extra(self) -> tuple[Fault, ...]:
        """Return the faults that are not controller faults, for the caller to handle."""
        return tuple(fault for fault in self.faults if fault.kind not in FAULT_KINDS)

    def wrap_tamiyo(self, tamiyo: TamiyoClient, *, hang_s: float = DEFAULT_HANG_S) -> FaultyTamiyo:
        """Return ``tamiyo`` wrapped with this plan's ``tamiyo-*`` faults."""
        return FaultyTamiyo(
            tamiyo, hang_epochs=self.at("tamiyo-hang"), error_epochs=self.at("tamiyo-error"), hang_s=hang_s
        )

    def wrap_kasmina(self, kasmina: KasminaClient, *, hang_s: float = DEFAULT_HANG_S) -> FaultyKasmina:
        """Return ``kasmina`` wrapped with this plan's ``kasmina-*`` faults."""
        return FaultyKasmina(
            kasmina, hang_epochs=self.at("kasmina-hang"), error_epochs=self.at("kasmina-error"), hang_s=hang_s
        )
