"""``ControlLoop``: one controller call and one executor call per epoch, through the shared worker.

At the end of each epoch the trainer calls ``run_epoch``. The loop requests a command
from the controller (Tamiyo) and hands it to the executor (Kasmina). Each call runs on
the shared ``AsyncWorker`` with its own timeout and behind its own circuit breaker. A
timeout, a failure or an open breaker never raises and never blocks past the timeouts:
the epoch's outcome says what happened and training continues in conservative mode,
where commands are not applied (the effective command is ``noop``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from tolaria.control.clients import KasminaClient, TamiyoClient
from tolaria.control.commands import AdaptationCommand, CommandRejected
from tolaria.control.outcome import CallResult, ControlOutcome, ControlStatus
from tolaria.control.reporting import ControlReporter
from tolaria.control.state import EpochState
from tolaria.functional import breaker
from tolaria.functional.breaker import BreakerPhase, BreakerPolicy, BreakerState
from tolaria.functional.emergency import Level as EmergencyLevel
from tolaria.telemetry import Telemetry
from tolaria.worker import AsyncWorker, TaskTimeout, WorkerClosed

__all__ = ["KASMINA", "TAMIYO", "ControlLoop"]

TAMIYO = "tamiyo"
KASMINA = "kasmina"


@dataclasses.dataclass(frozen=True)
class _Verdict:
    """The epoch's status before conservative mode is evaluated."""

    status: ControlStatus
    command: AdaptationCommand | None
    stage: str | None
    reason: str
    error_type: str | None = None
    tamiyo_latency_s: float | None = None
    kasmina_latency_s: float | None = None


_CALL_STATUS = {
    "rejected": ControlStatus.REJECTED,
    "timed_out": ControlStatus.TIMED_OUT,
    "failed": ControlStatus.FAILED,
    "skipped": ControlStatus.SKIPPED_CONSERVATIVE,
}

_BREAKER_EVENTS = {"ok": breaker.success, "rejected": breaker.success, "timed_out": breaker.timeout}


def _check_timeout(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _expect_command(value: object) -> str:
    if isinstance(value, AdaptationCommand):
        return ""
    return f"evaluate_epoch returned {type(value).__name__}; expected an AdaptationCommand"


class ControlLoop:
    """Ask the controller and apply its command once per epoch, with deadlines and circuit breakers.

    Args:
        tamiyo: the controller.
        kasmina: the executor.
        worker: the shared worker the calls run on; the loop never shuts it down.
        tamiyo_timeout_s: deadline of each controller call, in seconds.
        kasmina_timeout_s: deadline of each executor call, in seconds.
        breaker_policy: thresholds of the two circuit breakers (one per client).
        telemetry: receives the loop's metrics and events; one without sinks when ``None``.
        clock: monotonic clock in seconds, for latencies and breaker cooldowns.
        conservative_level: emergency level from which commands are no longer applied.

    Raises:
        ValueError: a timeout is not a finite number of seconds > 0.
    """

    def __init__(
        self,
        tamiyo: TamiyoClient,
        kasmina: KasminaClient,
        worker: AsyncWorker,
        *,
        tamiyo_timeout_s: float,
        kasmina_timeout_s: float,
        breaker_policy: BreakerPolicy | None = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.monotonic,
        conservative_level: int = EmergencyLevel.CONSERVATIVE,
    ) -> None:
        self._tamiyo = tamiyo
        self._kasmina = kasmina
        self._worker = worker
        self._timeouts = {
            TAMIYO: _check_timeout("tamiyo_timeout_s", tamiyo_timeout_s),
            KASMINA: _check_timeout("kasmina_timeout_s", kasmina_timeout_s),
        }
        self._reporter = ControlReporter(telemetry if telemetry is not None else Telemetry(), worker)
        self._clock = clock
        self._conservative_level = conservative_level
        policy = breaker_policy if breaker_policy is not None else BreakerPolicy()
        now = clock()
        self._breakers = {TAMIYO: breaker.init(policy, now), KASMINA: breaker.init(policy, now)}
        self._conservative = False
        self._conservative_reason = ""
        self._epoch = -1

    @property
    def conservative(self) -> bool:
        """Whether the last epoch ended in conservative mode."""
        return self._conservative

    @property
    def conservative_reason(self) -> str:
        """Why conservative mode is on, or an empty string."""
        return self._conservative_reason

    @property
    def breakers(self) -> Mapping[str, BreakerState]:
        """The current breaker state of each client, by role (``"tamiyo"``, ``"kasmina"``)."""
        return MappingProxyType(dict(self._breakers))

    def run_epoch(self, state: EpochState) -> ControlOutcome:
        """Ask the controller, apply its command, and return what happened.

        Never raises because the controller or the executor failed, hung or rejected
        the command; returns within the two timeouts plus the worker's lateness.

        Raises:
            TypeError: ``state`` is not an ``EpochState``.
            WorkerClosed: the shared worker was shut down.
        """
        if not isinstance(state, EpochState):
            raise TypeError(f"state must be an EpochState, got {type(state).__name__}")
        self._epoch = state.epoch
        verdict = self._decide(state)
        return self._conclude(state, verdict)

    # One epoch's decision.

    def _decide(self, state: EpochState) -> _Verdict:
        tamiyo = self._call(TAMIYO, self._tamiyo.evaluate_epoch, state, check=_expect_command)
        if tamiyo.status != "ok":
            return _Verdict(
                _CALL_STATUS[tamiyo.status], None, TAMIYO, tamiyo.reason, tamiyo.error_type, tamiyo.latency_s
            )
        command: AdaptationCommand = tamiyo.value

        level = state.emergency_level
        if level is not None and level >= self._conservative_level:
            reason = f"emergency level {level} >= {int(self._conservative_level)}: commands are not applied"
            return _Verdict(ControlStatus.SKIPPED_CONSERVATIVE, command, TAMIYO, reason, None, tamiyo.latency_s)
        if self._breakers[TAMIYO].phase is not BreakerPhase.CLOSED:
            reason = "the tamiyo circuit breaker is half-open: a probe's command is not applied"
            return _Verdict(ControlStatus.SKIPPED_CONSERVATIVE, command, TAMIYO, reason, None, tamiyo.latency_s)

        kasmina = self._call(KASMINA, self._kasmina.apply_command, command)
        if kasmina.status == "ok":
            return _Verdict(
                ControlStatus.APPLIED, command, None, command.reason, None, tamiyo.latency_s, kasmina.latency_s
            )
        return _Verdict(
            _CALL_STATUS[kasmina.status],
            command,
            KASMINA,
            kasmina.reason,
            kasmina.error_type,
            tamiyo.latency_s,
            kasmina.latency_s,
        )

    def _call(
        self, role: str, fn: Callable[[Any], Any], argument: Any, check: Callable[[Any], str] | None = None
    ) -> CallResult:
        task = f"{role}.{getattr(fn, '__name__', 'call')}"
        admission, decision = breaker.transition(self._breakers[role], breaker.request(), self._clock())
        self._set_breaker(role, admission, decision)
        if not decision.admitted:
            reason = f"the {role} circuit breaker is {decision.phase.name.lower()}: {decision.reason}"
            return CallResult("skipped", task, reason=reason)

        started = self._clock()
        result = self._run_on_worker(role, task, fn, argument, check)
        result = dataclasses.replace(result, latency_s=self._clock() - started)

        report = _BREAKER_EVENTS.get(result.status, breaker.failure)
        after, outcome = breaker.transition(self._breakers[role], report(decision.generation), self._clock())
        self._set_breaker(role, after, outcome)
        self._reporter.call_finished(role, result, self._timeouts[role], self._epoch)
        return result

    def _run_on_worker(
        self, role: str, task: str, fn: Callable[[Any], Any], argument: Any, check: Callable[[Any], str] | None
    ) -> CallResult:
        try:
            value = self._worker.submit(fn, argument, timeout=self._timeouts[role], name=task).result()
        except TaskTimeout as error:
            return CallResult("timed_out", task, error=error, reason=str(error))
        except CommandRejected as error:
            if role == KASMINA:
                return CallResult("rejected", task, error=error, reason=error.reason)
            return CallResult("failed", task, error=error, reason=str(error))
        except WorkerClosed:
            raise
        except Exception as error:  # noqa: BLE001 - logged, emitted and counted by the reporter
            return CallResult("failed", task, error=error, reason=f"{type(error).__name__}: {error}")

        problem = check(value) if check is not None else ""
        if problem:
            return CallResult("failed", task, error=TypeError(problem), reason=problem)
        return CallResult("ok", task, value=value)

    # Breakers and conservative mode.

    def _set_breaker(self, role: str, state: BreakerState, decision: breaker.BreakerDecision) -> None:
        self._breakers[role] = state
        if decision.changed:
            self._reporter.breaker_changed(role, decision, self._epoch)

    def _conclude(self, state: EpochState, verdict: _Verdict) -> ControlOutcome:
        reasons = []
        if verdict.status in (ControlStatus.TIMED_OUT, ControlStatus.FAILED, ControlStatus.SKIPPED_CONSERVATIVE):
            reasons.append(verdict.reason)
        reasons += [
            f"the {role} circuit breaker is {current.phase.name.lower()}"
            for role, current in self._breakers.items()
            if current.phase is not BreakerPhase.CLOSED
        ]
        conservative = bool(reasons)
        entered = conservative and not self._conservative
        exited = self._conservative and not conservative
        self._conservative = conservative
        self._conservative_reason = "; ".join(reasons)

        reporter = self._reporter
        reporter.command_finished(verdict.status, verdict.command, verdict.reason, state.epoch)
        reporter.mode(
            state.epoch, conservative=conservative, reason=self._conservative_reason, entered=entered, exited=exited
        )
        reporter.worker_gauges()
        return ControlOutcome(
            epoch=state.epoch,
            status=verdict.status,
            command=verdict.command,
            stage=verdict.stage,
            reason=verdict.reason,
            error_type=verdict.error_type,
            tamiyo_latency_s=verdict.tamiyo_latency_s,
            kasmina_latency_s=verdict.kasmina_latency_s,
            conservative=conservative,
            entered_conservative=entered,
            exited_conservative=exited,
        )
