"""A circuit breaker as a pure state machine.

Before each call to a component that may hang or fail (the controller and the executor),
the shell sends the breaker a request event, and afterwards the call's result. ``transition`` maps the
current ``BreakerState``, one ``BreakerEvent`` and the time to the next state and a
``BreakerDecision``:

* CLOSED admits every call. ``failure_threshold`` consecutive failures or timeouts open it.
* OPEN rejects every call. The first request or tick at least ``cooldown_s`` seconds
  after opening moves it to HALF_OPEN.
* HALF_OPEN admits at most ``half_open_probes`` probe calls. ``success_threshold``
  probe successes close it; one probe failure or timeout re-opens it, and so does a
  request or tick that finds a probe running for ``probe_timeout_s`` seconds or more.

Each phase change increments ``generation``. An admitted call reports its result with
the generation it was admitted in; results of calls admitted before the last phase
change are ignored. Every function here is pure: time is the ``now`` argument
(monotonic seconds), nothing is mutated and nothing is logged.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, NamedTuple

import optree

__all__ = [
    "BreakerDecision",
    "BreakerEvent",
    "BreakerEventKind",
    "BreakerPhase",
    "BreakerPolicy",
    "BreakerState",
    "failure",
    "init",
    "request",
    "success",
    "tick",
    "timeout",
    "transition",
]


class BreakerPhase(enum.IntEnum):
    """Phase of the breaker; integer-coded so that it can live in numeric state."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class BreakerEventKind(enum.StrEnum):
    """Kind of breaker event: a call requests to start, a call ended, or time passed."""

    REQUEST = "request"
    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    TICK = "tick"


class BreakerEvent(NamedTuple):
    """One input of ``transition``.

    Attributes:
        kind: the kind of event.
        generation: for results, the generation the call was admitted in (from its
            ``BreakerDecision``); ignored for requests and ticks.
    """

    kind: BreakerEventKind
    generation: int = -1


def request() -> BreakerEvent:
    """Return the event asking whether a call may start."""
    return BreakerEvent(BreakerEventKind.REQUEST)


def success(generation: int) -> BreakerEvent:
    """Return the event reporting that a call admitted in ``generation`` succeeded."""
    return BreakerEvent(BreakerEventKind.SUCCESS, generation)


def failure(generation: int) -> BreakerEvent:
    """Return the event reporting that a call admitted in ``generation`` raised."""
    return BreakerEvent(BreakerEventKind.FAILURE, generation)


def timeout(generation: int) -> BreakerEvent:
    """Return the event reporting that a call admitted in ``generation`` timed out."""
    return BreakerEvent(BreakerEventKind.TIMEOUT, generation)


def tick() -> BreakerEvent:
    """Return the event that only lets time pass (cooldowns and hung probes)."""
    return BreakerEvent(BreakerEventKind.TICK)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and (value > 0 or (allow_zero and value == 0)):  # type: ignore[arg-type, operator]
        return
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class BreakerPolicy:
    """Thresholds of the breaker.

    Attributes:
        failure_threshold: consecutive failures or timeouts that open a closed breaker.
        cooldown_s: seconds an open breaker waits before admitting probes.
        half_open_probes: probe calls admitted in one half-open period, at most.
        success_threshold: probe successes that close the breaker, ``<= half_open_probes``.
        probe_timeout_s: seconds after which a probe still running re-opens the breaker.

    Raises:
        ValueError: a count is below 1, a duration is negative or not finite, or
            ``success_threshold`` exceeds ``half_open_probes``.
    """

    failure_threshold: int = 3
    cooldown_s: float = 30.0
    half_open_probes: int = 1
    success_threshold: int = 1
    probe_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check_positive_int("failure_threshold", self.failure_threshold)
        _check_positive_int("half_open_probes", self.half_open_probes)
        _check_positive_int("success_threshold", self.success_threshold)
        _check_seconds("cooldown_s", self.cooldown_s, allow_zero=True)
        _check_seconds("probe_timeout_s", self.probe_timeout_s, allow_zero=False)
        if self.success_threshold > self.half_open_probes:
            raise ValueError(
                f"success_threshold={self.success_threshold} exceeds half_open_probes={self.half_open_probes}; "
                f"the breaker could never close"
            )


@dataclasses.dataclass(frozen=True)
class BreakerState:
    """Immutable breaker state, a pytree in the ``"tolaria"`` optree namespace.

    Every field except ``policy`` is a leaf (Python ints and floats, ``probe_starts``
    a tuple of floats); ``policy`` is metadata.

    Attributes:
        phase: CLOSED, OPEN or HALF_OPEN.
        generation: number of phase changes so far.
        consecutive_failures: failures and timeouts in a row while closed.
        changed_at: monotonic time of the last phase change, in seconds.
        probes_admitted: probes admitted in the current half-open period.
        probe_successes: probe successes in the current half-open period.
        probe_starts: start times of the probes still running, oldest first.
        policy: the thresholds.
    """

    phase: BreakerPhase
    generation: int
    consecutive_failures: int
    changed_at: float
    probes_admitted: int
    probe_successes: int
    probe_starts: tuple[float, ...]
    policy: BreakerPolicy


_LEAVES = (
    "phase",
    "generation",
    "consecutive_failures",
    "changed_at",
    "probes_admitted",
    "probe_successes",
    "probe_starts",
)


def _flatten(state: BreakerState) -> tuple[tuple[object, ...], BreakerPolicy, tuple[str, ...]]:
    return tuple(getattr(state, name) for name in _LEAVES), state.policy, _LEAVES


def _unflatten(policy: BreakerPolicy, children: tuple[Any, ...]) -> BreakerState:
    phase, generation, failures, changed_at, admitted, successes, starts = children
    return BreakerState(
        phase=BreakerPhase(phase),
        generation=generation,
        consecutive_failures=failures,
        changed_at=changed_at,
        probes_admitted=admitted,
        probe_successes=successes,
        probe_starts=tuple(starts),
        policy=policy,
    )


# optree's stubs type nodes as collections of leaves; the registration itself is the documented API.
optree.register_pytree_node(
    BreakerState,  # type: ignore[arg-type]
    _flatten,  # type: ignore[arg-type]
    _unflatten,  # type: ignore[arg-type]
    namespace="tolaria",
)


class BreakerDecision(NamedTuple):
    """Result of ``transition`` for one event.

    Attributes:
        admitted: for a request, whether the call may start; ``False`` for other events.
        generation: the generation to report the admitted call's result with; the
            current generation otherwise.
        probe: whether the admitted call is a half-open probe.
        ignored: whether a result was ignored because it came from an earlier generation.
        previous: phase before the event.
        phase: phase after the event.
        reason: why, for logs and events; empty when nothing notable happened.
    """

    admitted: bool
    generation: int
    probe: bool
    ignored: bool
    previous: BreakerPhase
    phase: BreakerPhase
    reason: str

    @property
    def changed(self) -> bool:
        """Whether the phase changed."""
        return self.phase is not self.previous


def init(policy: BreakerPolicy, now: float = 0.0) -> BreakerState:
    """Return a closed breaker created at monotonic time ``now`` (seconds).

    Raises:
        ValueError: ``now`` is not finite.
    """
    _check_now(now)
    return BreakerState(BreakerPhase.CLOSED, 0, 0, float(now), 0, 0, (), policy)


def _check_now(now: float) -> None:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now must be a finite monotonic time in seconds, got {now!r}")


def _move(state: BreakerState, phase: BreakerPhase, now: float) -> BreakerState:
    """Enter ``phase`` at ``now``: a new generation with fresh counters."""
    return BreakerState(phase, state.generation + 1, 0, float(now), 0, 0, (), state.policy)


def _decide(
    previous: BreakerState, state: BreakerState, reason: str = "", *, admitted: bool = False, probe: bool = False
) -> tuple[BreakerState, BreakerDecision]:
    decision = BreakerDecision(admitted, state.generation, probe, False, previous.phase, state.phase, reason)
    return state, decision


def _elapse(state: BreakerState, now: float) -> tuple[BreakerState, str]:
    """Apply what the passage of time alone changes: a finished cooldown or a hung probe."""
    policy = state.policy
    if state.phase is BreakerPhase.OPEN and now - state.changed_at >= policy.cooldown_s:
        return _move(state, BreakerPhase.HALF_OPEN, now), f"cooldown of {policy.cooldown_s} s elapsed"
    if state.phase is BreakerPhase.HALF_OPEN and state.probe_starts:
        running_s = now - state.probe_starts[0]
        if running_s >= policy.probe_timeout_s:
            reason = f"a probe has been running for {running_s:.3f} s, limit {policy.probe_timeout_s} s"
            return _move(state, BreakerPhase.OPEN, now), reason
    return state, ""


def _on_request(state: BreakerState, now: float) -> tuple[BreakerState, BreakerDecision]:
    current, reason = _elapse(state, now)
    if current.phase is BreakerPhase.CLOSED:
        return _decide(state, current, reason, admitted=True)
    if current.phase is BreakerPhase.OPEN:
        remaining = current.policy.cooldown_s - (now - current.changed_at)
        return _decide(state, current, reason or f"open; cooldown ends in {remaining:.3f} s")
    if current.probes_admitted >= current.policy.half_open_probes:
        return _decide(state, current, f"half-open; all {current.policy.half_open_probes} probes already admitted")
    probing = dataclasses.replace(
        current, probes_admitted=current.probes_admitted + 1, probe_starts=(*current.probe_starts, float(now))
    )
    return _decide(state, probing, reason, admitted=True, probe=True)


def _on_closed_result(state: BreakerState, kind: BreakerEventKind, now: float) -> tuple[BreakerState, BreakerDecision]:
    if kind is BreakerEventKind.SUCCESS:
        return _decide(state, dataclasses.replace(state, consecutive_failures=0))
    failures = state.consecutive_failures + 1
    threshold = state.policy.failure_threshold
    if failures < threshold:
        return _decide(state, dataclasses.replace(state, consecutive_failures=failures))
    reason = f"{failures} consecutive failures or timeouts (threshold {threshold}); last: {kind.value}"
    return _decide(state, _move(state, BreakerPhase.OPEN, now), reason)


def _on_probe_result(state: BreakerState, kind: BreakerEventKind, now: float) -> tuple[BreakerState, BreakerDecision]:
    if not state.probe_starts:
        raise ValueError(
            f"a {kind.value} was reported for generation {state.generation} but no probe is running; "
            f"report exactly one result per admitted call"
        )
    if kind is not BreakerEventKind.SUCCESS:
        return _decide(state, _move(state, BreakerPhase.OPEN, now), f"probe {kind.value}")
    successes = state.probe_successes + 1
    if successes >= state.policy.success_threshold:
        return _decide(state, _move(state, BreakerPhase.CLOSED, now), f"{successes} probe successes")
    # Results carry no call identity, so the oldest running probe is taken as the one that ended.
    remaining = state.probe_starts[1:]
    return _decide(state, dataclasses.replace(state, probe_successes=successes, probe_starts=remaining))


def _on_result(state: BreakerState, event: BreakerEvent, now: float) -> tuple[BreakerState, BreakerDecision]:
    if event.generation > state.generation or event.generation < 0:
        raise ValueError(
            f"generation={event.generation} was never issued; the breaker is at generation {state.generation}"
        )
    if event.generation != state.generation:
        stale = f"result of generation {event.generation} ignored; the breaker is at generation {state.generation}"
        decision = BreakerDecision(False, state.generation, False, True, state.phase, state.phase, stale)
        return state, decision
    if state.phase is BreakerPhase.CLOSED:
        return _on_closed_result(state, event.kind, now)
    return _on_probe_result(state, event.kind, now)


def transition(state: BreakerState, event: BreakerEvent, now: float) -> tuple[BreakerState, BreakerDecision]:
    """Apply ``event`` at monotonic time ``now`` (seconds); return the new state and the decision.

    Raises:
        ValueError: ``now`` is not finite, or earlier than the last phase change. Also
            when a result names a generation that was never issued, when a probe result
            arrives while no probe is running, and when ``event.kind`` is unknown.
    """
    _check_now(now)
    if now < state.changed_at:
        raise ValueError(f"now={now!r} is earlier than the last phase change at {state.changed_at!r}")
    kind = BreakerEventKind(event.kind)  # raises ValueError for an unknown kind
    if kind is BreakerEventKind.REQUEST:
        return _on_request(state, now)
    if kind is BreakerEventKind.TICK:
        current, reason = _elapse(state, now)
        return _decide(state, current, reason)
    return _on_result(state, event, now)
