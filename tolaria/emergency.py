"""The emergency controller: the shell around the pure emergency state machine.

``EmergencyController`` keeps an ``EmergencyState``, applies the pure transitions
of ``tolaria.functional.emergency`` and tells every registered listener about each
level change. Usage in a training loop::

    controller = EmergencyController(policy, telemetry=telemetry, worker=worker)
    controller.add_listener(on_level_change, name="checkpointer")   # called with a Transition
    controller.add_signal(SharedMemorySignal())                     # watchers in other processes

    # once per optimizer step, after reading the loss verdict:
    transition = controller.observe(StepSignals(step, nonfinite_loss=..., spike=..., timeouts=...))
    actions = controller.actions        # Actions of the current level
    if actions.save_and_stop: ...       # HALT: save what can be saved and stop
    if transition is not None and actions.roll_back: ...   # just entered CONSERVATIVE

    # at the end of each epoch, before telemetry.flush():
    controller.emit_epoch_metrics()
    controller.close()                  # at the end of training

Broadcasts: every listener of a level change is submitted to the shared
``AsyncWorker`` at once, then all results are collected against one deadline
``broadcast_timeout_s`` after the change, so a broadcast blocks the caller for at
most about that long however many listeners hang. Every listener is called even
when others fail. Each failure, a timeout included, is logged at ERROR with the
exception, counted in ``tolaria.emergency.broadcast_failures`` and emitted as a
CRITICAL ``tolaria.emergency.broadcast_failed`` event naming the listener. With
``strict=True`` the failures are also raised together as an ``ExceptionGroup``
after all listeners have been called.

Listeners run on worker threads (or on the worker's event loop for coroutine
functions). A listener that declares a ``cancel`` parameter receives the task's
``CancelToken``, which is set at the deadline. A listener that ignores it keeps its
worker thread until it returns. A listener that calls back into the controller
waits until the broadcast in progress ends, so it is reported as timed out.

Telemetry: events ``tolaria.emergency.escalated`` (severity INFO for NOTICE, WARNING
for ELEVATED, ERROR for CONSERVATIVE, CRITICAL for HALT), ``.deescalated`` (INFO),
``.reset`` (WARNING) and ``.broadcast_failed`` (CRITICAL); counters
``tolaria.emergency.escalations``, ``.deescalations``, ``.resets``, ``.broadcasts``
and ``.broadcast_failures``; metric ``tolaria.emergency.broadcast_latency_ms`` per
broadcast; and, from ``emit_epoch_metrics``, ``tolaria.emergency.level``,
``tolaria.emergency.max_level`` and ``tolaria.emergency.escalation_count``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from tolaria._emergency_broadcast import (
    BroadcastReport,
    LevelSignal,
    Listener,
    SignalPublisher,
    broadcast,
    check_timeout,
    record_transition,
    report_failure,
)
from tolaria.emergency_signals import (
    SIGNAL_LAYOUT_SIZE,
    LocalSignal,
    SharedMemorySignal,
    SharedMemorySignalWatcher,
    SignalReading,
)
from tolaria.functional import emergency
from tolaria.functional.emergency import Actions, EmergencyPolicy, EmergencyState, Level, StepSignals, Transition
from tolaria.telemetry import Telemetry
from tolaria.worker import AsyncWorker

__all__ = [
    "SIGNAL_LAYOUT_SIZE",
    "BroadcastReport",
    "EmergencyController",
    "LevelSignal",
    "Listener",
    "LocalSignal",
    "SharedMemorySignal",
    "SharedMemorySignalWatcher",
    "SignalReading",
]


class EmergencyController:
    """Keeps the emergency state, applies transitions and broadcasts level changes.

    Thread-safe: transitions and their broadcasts are serialised, so listeners see
    level changes in the order they happened.

    Args:
        policy: how signals map to levels; ``EmergencyPolicy()`` when ``None``.
        telemetry: receives events, counters and metrics; a telemetry object without
            sinks is created when ``None``.
        worker: the shared worker that runs listeners. When ``None`` the controller
            starts its own and shuts it down in ``close``.
        broadcast_timeout_s: deadline of each broadcast, in seconds after its start.
        strict: raise the broadcast failures as an ``ExceptionGroup`` once every
            listener was called, in addition to reporting them.
        clock: monotonic clock in seconds for state and transition times.
        step: global step the controller starts at (a resumed run passes its step).

    Raises:
        ValueError: ``broadcast_timeout_s`` is not a finite number > 0, or ``step`` is negative.
    """

    def __init__(
        self,
        policy: EmergencyPolicy | None = None,
        *,
        telemetry: Telemetry | None = None,
        worker: AsyncWorker | None = None,
        broadcast_timeout_s: float = 1.0,
        strict: bool = False,
        clock: Callable[[], float] = time.monotonic,
        step: int = 0,
    ) -> None:
        self.policy = EmergencyPolicy() if policy is None else policy
        self.telemetry = Telemetry() if telemetry is None else telemetry
        self.broadcast_timeout_s = check_timeout(broadcast_timeout_s)
        self.strict = strict
        self._clock = clock
        self._owns_worker = worker is None
        self._worker = AsyncWorker(name="tolaria-emergency", telemetry=self.telemetry) if worker is None else worker
        self._state = emergency.initial(step=step, now=clock())
        self._last_step = step
        self._max_level = Level.NOMINAL
        self._epoch_max_level = Level.NOMINAL
        self._listeners: dict[str, Listener] = {}
        self._broadcast_failures = 0
        self._last_broadcast: BroadcastReport | None = None
        self._closed = False
        # Held only briefly, for reads and state swaps.
        self._state_lock = threading.Lock()
        # Held from a transition until its broadcast ends, so broadcasts keep the order of transitions.
        self._transition_lock = threading.Lock()

    # Reading the state.

    @property
    def state(self) -> EmergencyState:
        """The current emergency state."""
        with self._state_lock:
            return self._state

    @property
    def level(self) -> Level:
        """The current level."""
        return Level(self.state.level)

    @property
    def actions(self) -> Actions:
        """The actions of the current level (see ``tolaria.functional.emergency.actions``)."""
        return emergency.actions(self.level)

    @property
    def max_level(self) -> Level:
        """The highest level reached since the controller was created."""
        with self._state_lock:
            return self._max_level

    @property
    def broadcast_failures(self) -> int:
        """Listener failures (exceptions, timeouts, rejected submissions) since the controller was created."""
        with self._state_lock:
            return self._broadcast_failures

    @property
    def last_broadcast(self) -> BroadcastReport | None:
        """The report of the most recent broadcast, or ``None`` before the first level change."""
        with self._state_lock:
            return self._last_broadcast

    @property
    def listeners(self) -> tuple[str, ...]:
        """Names of the registered listeners, in registration order."""
        with self._state_lock:
            return tuple(self._listeners)

    # Listeners.

    def add_listener(self, listener: Listener, *, name: str | None = None) -> str:
        """Register ``listener`` for every later level change and return its name.

        Args:
            listener: called with the ``Transition``; may be a coroutine function and
                may declare a ``cancel`` parameter to receive a ``CancelToken``.
            name: name used in logs and events; defaults to the listener's qualified name.

        Raises:
            TypeError: ``listener`` is not callable.
            ValueError: a listener with that name is already registered.
        """
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        key = name if name is not None else getattr(listener, "__qualname__", repr(listener))
        with self._state_lock:
            if key in self._listeners:
                raise ValueError(f"a listener named {key!r} is already registered; pass another name=")
            self._listeners[key] = listener
        return key

    def add_signal(self, signal: LevelSignal, *, name: str | None = None) -> str:
        """Publish every later level change to ``signal`` (a ``LocalSignal`` or ``SharedMemorySignal``).

        The signal is set at once to the current level, then updated like a listener.
        Returns the listener name (default ``"signal:<name or class>"``).

        Raises:
            ValueError: a listener with that name is already registered.
            Exception: whatever ``signal.set`` raises; the signal is then not registered.
        """
        key = name if name is not None else f"signal:{getattr(signal, 'name', type(signal).__name__)}"
        if key in self.listeners:
            raise ValueError(f"a listener named {key!r} is already registered; pass another name=")

        state = self.state
        signal.set(state.level, state.reason, timestamp_s=state.since_s)
        return self.add_listener(SignalPublisher(signal), name=key)

    def remove_listener(self, name: str) -> None:
        """Stop calling the listener called ``name``.

        Raises:
            ValueError: no listener has that name.
        """
        with self._state_lock:
            if name not in self._listeners:
                raise ValueError(f"no listener named {name!r}; registered listeners are {list(self._listeners)}")
            del self._listeners[name]

    # Transitions.

    def observe(self, signals: StepSignals) -> Transition | None:
        """Apply one step's signals; broadcast and return the transition, or return ``None``.

        Raises:
            ValueError: ``signals`` is invalid (see ``evaluate``).
            RuntimeError: the controller is closed.
            ExceptionGroup: ``strict=True`` and some listeners failed.
        """
        if not isinstance(signals, StepSignals):
            raise ValueError(f"signals={signals!r} is invalid; expected StepSignals")
        return self._apply(
            lambda state, now: emergency.evaluate(state, signals, self.policy, now=now), step=signals.step
        )

    def escalate(self, level: Level | int | str, *, reason: str, step: int | None = None) -> Transition | None:
        """Raise the level to ``level`` now; a lower or equal level changes nothing.

        Args:
            step: step of the change; the last observed step when ``None``.

        Raises:
            ValueError: ``level`` is not a ``Level``.
            RuntimeError: the controller is closed.
            ExceptionGroup: ``strict=True`` and some listeners failed.
        """
        return self._apply(
            lambda state, now: emergency.escalate(state, level, reason=reason, now=now, step=self._step(step)),
            step=step,
        )

    def deescalate(self, level: Level | int | str, *, reason: str, step: int | None = None) -> Transition | None:
        """Lower the level to ``level`` if the policy's cooldown has passed; it never moves up and never leaves HALT.

        Raises:
            ValueError: ``level`` is not a ``Level``.
            RuntimeError: the controller is closed.
            ExceptionGroup: ``strict=True`` and some listeners failed.
        """
        return self._apply(
            lambda state, now: emergency.deescalate(
                state, level, reason=reason, now=now, step=self._step(step), policy=self.policy
            ),
            step=step,
        )

    def reset(self, *, reason: str, step: int | None = None) -> Transition:
        """Return to NOMINAL from any level, HALT included, and broadcast the reset.

        Raises:
            RuntimeError: the controller is closed.
            ExceptionGroup: ``strict=True`` and some listeners failed.
        """
        transition = self._apply(
            lambda state, now: emergency.reset(state, reason=reason, now=now, step=self._step(step)), step=step
        )
        assert transition is not None  # reset always returns a transition
        return transition

    def _step(self, step: int | None) -> int:
        return self._last_step if step is None else step

    def _apply(
        self,
        transition_fn: Callable[[EmergencyState, float], tuple[EmergencyState, Transition | None]],
        *,
        step: int | None,
    ) -> Transition | None:
        """Run a pure transition under the locks, then record and broadcast what changed."""
        with self._transition_lock:
            if self._closed:
                raise RuntimeError("the emergency controller is closed; create a new one")
            with self._state_lock:
                new_state, transition = transition_fn(self._state, self._clock())
                self._state = new_state
                if step is not None:
                    self._last_step = step
                if transition is not None:
                    self._max_level = max(self._max_level, transition.level)
                    self._epoch_max_level = max(self._epoch_max_level, transition.level)
            if transition is None:
                return None
            record_transition(self.telemetry, transition)
            report = self._broadcast(transition)
        if self.strict and report.failed:
            raise ExceptionGroup(
                f"{len(report.failed)} of {len(report.failed) + len(report.delivered)} emergency listeners "
                f"failed on {transition.kind} to {transition.level.name}",
                [error for _, error in report.failed],
            )
        return transition

    # Reporting.

    def _broadcast(self, transition: Transition) -> BroadcastReport:
        """Tell every listener about ``transition`` and keep the report."""
        with self._state_lock:
            listeners = list(self._listeners.items())
        report = broadcast(
            self._worker, self.telemetry, listeners, transition, self.broadcast_timeout_s, self._report_failure
        )
        with self._state_lock:
            self._last_broadcast = report
        return report

    def _report_failure(self, name: str, error: Exception, transition: Transition) -> None:
        """Count one listener failure, then log and emit it."""
        with self._state_lock:
            self._broadcast_failures += 1
        report_failure(self.telemetry, name, error, transition)

    def emit_epoch_metrics(self) -> None:
        """Record the current level, the epoch's highest level and the escalation count, then start a new epoch.

        Call it once per epoch before ``telemetry.flush``.
        """
        with self._state_lock:
            current = Level(self._state.level)
            epoch_max = self._epoch_max_level
            escalations = self._state.escalations
            self._epoch_max_level = current
        self.telemetry.metric("tolaria.emergency.level", float(current), "1")
        self.telemetry.metric("tolaria.emergency.max_level", float(epoch_max), "1")
        self.telemetry.metric("tolaria.emergency.escalation_count", float(escalations), "1")

    # Lifecycle.

    def state_dict(self) -> dict[str, Any]:
        """Return the emergency state and the highest level reached, as plain values."""
        with self._state_lock:
            data = emergency.state_to_mapping(self._state, now=self._clock())
            data["max_level"] = int(self._max_level)
        return data

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore a state from ``state_dict`` when a run resumes; listeners are not called.

        Raises:
            ValueError: ``data`` is not a state saved by ``state_dict``.
        """
        state = emergency.state_from_mapping(data, now=self._clock())
        with self._state_lock:
            self._state = state
            self._last_step = state.since_step
            self._max_level = max(self._max_level, Level(int(data.get("max_level", state.level))))

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting transitions and shut down the worker if the controller started it. Idempotent."""
        with self._transition_lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_worker:
            self._worker.shutdown(timeout=timeout)

    def __enter__(self) -> EmergencyController:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EmergencyController level={self.level.name} listeners={len(self.listeners)}>"
