"""Stateful hypothesis test of the pure circuit breaker.

The machine issues requests, reports results of admitted calls in any order (some long
after the breaker moved on), lets time pass and ticks. After every event it checks that
the phase changed only for an event allowed to change it, and that a half-open period
never admits more than ``half_open_probes`` probes.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tolaria.functional import breaker
from tolaria.functional.breaker import BreakerDecision, BreakerEvent, BreakerEventKind, BreakerPhase, BreakerState

CLOSED, OPEN, HALF_OPEN = BreakerPhase.CLOSED, BreakerPhase.OPEN, BreakerPhase.HALF_OPEN
FAILURES = (BreakerEventKind.FAILURE, BreakerEventKind.TIMEOUT)


class BreakerMachine(RuleBasedStateMachine):
    """Drives ``transition`` with requests, results, ticks and time steps in random order."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = breaker.BreakerPolicy()
        self.state: BreakerState = breaker.init(self.policy)
        self.now = 0.0
        # Generations of admitted calls whose result has not been reported yet.
        self.outstanding: list[int] = []
        self.probes_per_generation: dict[int, int] = {}

    @initialize(
        threshold=st.integers(1, 4),
        cooldown=st.sampled_from([0.0, 1.0, 5.0]),
        probes=st.integers(1, 3),
        successes=st.integers(1, 3),
        probe_timeout=st.sampled_from([0.5, 2.0, 10.0]),
    )
    def choose_policy(self, threshold, cooldown, probes, successes, probe_timeout):
        self.policy = breaker.BreakerPolicy(
            failure_threshold=threshold,
            cooldown_s=cooldown,
            half_open_probes=probes,
            success_threshold=min(successes, probes),
            probe_timeout_s=probe_timeout,
        )
        self.state = breaker.init(self.policy)

    def apply(self, event: BreakerEvent) -> BreakerDecision:
        before = self.state
        self.state, decision = breaker.transition(before, event, self.now)
        self.check_transition(before, event, decision)
        return decision

    def check_transition(self, before: BreakerState, event: BreakerEvent, decision: BreakerDecision) -> None:
        after = self.state
        assert decision.previous is before.phase
        assert decision.phase is after.phase
        if decision.ignored:
            assert after == before
            assert event.generation != before.generation
        if after.phase is before.phase:
            # Inside one phase the generation stays; a full cycle back to the same phase is impossible.
            assert after.generation == before.generation
            return

        assert after.generation == before.generation + 1
        assert decision.reason
        assert self.change_allowed(before, event, after.phase), (before, event, after)

    def change_allowed(self, before: BreakerState, event: BreakerEvent, phase: BreakerPhase) -> bool:
        """Return whether ``event`` at ``self.now`` may move the breaker from ``before.phase`` to ``phase``."""
        policy = self.policy
        current_failure = event.kind in FAILURES and event.generation == before.generation
        current_success = event.kind is BreakerEventKind.SUCCESS and event.generation == before.generation
        by_time = event.kind in (BreakerEventKind.REQUEST, BreakerEventKind.TICK)
        hung = bool(before.probe_starts) and self.now - before.probe_starts[0] >= policy.probe_timeout_s
        allowed = {
            (CLOSED, OPEN): current_failure and before.consecutive_failures + 1 >= policy.failure_threshold,
            (OPEN, HALF_OPEN): by_time and self.now - before.changed_at >= policy.cooldown_s,
            (HALF_OPEN, CLOSED): current_success and before.probe_successes + 1 >= policy.success_threshold,
            (HALF_OPEN, OPEN): current_failure or (by_time and hung),
        }
        return allowed.get((before.phase, phase), False)

    @rule(seconds=st.sampled_from([0.0, 0.1, 0.6, 1.5, 6.0]))
    def advance_time(self, seconds):
        self.now += seconds

    @rule()
    def request(self):
        decision = self.apply(breaker.request())
        if decision.admitted:
            self.outstanding.append(decision.generation)
            assert decision.probe == (self.state.phase is HALF_OPEN)
        if decision.probe:
            count = self.probes_per_generation.get(decision.generation, 0) + 1
            self.probes_per_generation[decision.generation] = count
            assert count <= self.policy.half_open_probes

    @precondition(lambda self: self.outstanding)
    @rule(
        position=st.integers(0, 50),
        kind=st.sampled_from([BreakerEventKind.SUCCESS, BreakerEventKind.FAILURE, BreakerEventKind.TIMEOUT]),
    )
    def report(self, position, kind):
        generation = self.outstanding.pop(position % len(self.outstanding))
        self.apply(BreakerEvent(kind, generation))

    @rule()
    def tick(self):
        self.apply(breaker.tick())

    @invariant()
    def counters_fit_the_phase(self):
        state = self.state
        assert 0 <= state.consecutive_failures < self.policy.failure_threshold
        assert len(state.probe_starts) <= state.probes_admitted <= self.policy.half_open_probes
        assert 0 <= state.probe_successes < self.policy.success_threshold
        assert list(state.probe_starts) == sorted(state.probe_starts)
        if state.phase is not CLOSED:
            assert state.consecutive_failures == 0
        if state.phase is not HALF_OPEN:
            assert state.probes_admitted == 0
            assert state.probe_successes == 0


TestBreakerMachine = BreakerMachine.TestCase
