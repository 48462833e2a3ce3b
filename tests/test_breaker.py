"""Step-by-step tests of the pure circuit breaker, with the time passed in by hand."""

from __future__ import annotations

import math

import optree
import pytest

from tolaria.functional import breaker
from tolaria.functional.breaker import BreakerDecision, BreakerPhase, BreakerPolicy, BreakerState

CLOSED, OPEN, HALF_OPEN = BreakerPhase.CLOSED, BreakerPhase.OPEN, BreakerPhase.HALF_OPEN

POLICY = BreakerPolicy(
    failure_threshold=2, cooldown_s=10.0, half_open_probes=2, success_threshold=2, probe_timeout_s=5.0
)


def make_state(phase, generation, failures=0, changed_at=0.0, admitted=0, successes=0, starts=(), policy=POLICY):
    return BreakerState(phase, generation, failures, changed_at, admitted, successes, tuple(starts), policy)


def decision(admitted, generation, previous, phase, *, probe=False, ignored=False, reason=""):
    return BreakerDecision(admitted, generation, probe, ignored, previous, phase, reason)


def test_init_is_closed():
    assert breaker.init(POLICY, now=3.0) == make_state(CLOSED, 0, changed_at=3.0)


def test_walk_through_every_phase():
    # Each row: event, time, expected whole state afterwards, expected decision.
    steps = [
        (breaker.request(), 1.0, make_state(CLOSED, 0), decision(True, 0, CLOSED, CLOSED)),
        (breaker.failure(0), 1.5, make_state(CLOSED, 0, failures=1), decision(False, 0, CLOSED, CLOSED)),
        (breaker.success(0), 2.0, make_state(CLOSED, 0), decision(False, 0, CLOSED, CLOSED)),
        (breaker.failure(0), 2.5, make_state(CLOSED, 0, failures=1), decision(False, 0, CLOSED, CLOSED)),
        (
            breaker.timeout(0),
            3.0,
            make_state(OPEN, 1, changed_at=3.0),
            decision(False, 1, CLOSED, OPEN, reason="2 consecutive failures or timeouts (threshold 2); last: timeout"),
        ),
        (
            breaker.request(),
            12.0,
            make_state(OPEN, 1, changed_at=3.0),
            decision(False, 1, OPEN, OPEN, reason="open; cooldown ends in 1.000 s"),
        ),
        (
            breaker.request(),
            13.0,
            make_state(HALF_OPEN, 2, changed_at=13.0, admitted=1, starts=(13.0,)),
            decision(True, 2, OPEN, HALF_OPEN, probe=True, reason="cooldown of 10.0 s elapsed"),
        ),
        (
            breaker.request(),
            13.5,
            make_state(HALF_OPEN, 2, changed_at=13.0, admitted=2, starts=(13.0, 13.5)),
            decision(True, 2, HALF_OPEN, HALF_OPEN, probe=True),
        ),
        (
            breaker.request(),
            13.6,
            make_state(HALF_OPEN, 2, changed_at=13.0, admitted=2, starts=(13.0, 13.5)),
            decision(False, 2, HALF_OPEN, HALF_OPEN, reason="half-open; all 2 probes already admitted"),
        ),
        (
            breaker.success(2),
            14.0,
            make_state(HALF_OPEN, 2, changed_at=13.0, admitted=2, successes=1, starts=(13.5,)),
            decision(False, 2, HALF_OPEN, HALF_OPEN),
        ),
        (
            breaker.success(2),
            14.5,
            make_state(CLOSED, 3, changed_at=14.5),
            decision(False, 3, HALF_OPEN, CLOSED, reason="2 probe successes"),
        ),
    ]
    state = breaker.init(POLICY)
    for event, now, expected_state, expected_decision in steps:
        state, got = breaker.transition(state, event, now)
        assert state == expected_state, (event, now)
        assert got == expected_decision, (event, now)


def test_probe_failure_reopens():
    state = make_state(HALF_OPEN, 2, changed_at=13.0, admitted=1, starts=(13.0,))
    state, got = breaker.transition(state, breaker.failure(2), 14.0)
    assert state == make_state(OPEN, 3, changed_at=14.0)
    assert got == decision(False, 3, HALF_OPEN, OPEN, reason="probe failure")
    assert got.changed


def test_hung_probe_reopens_on_tick():
    state = make_state(HALF_OPEN, 2, changed_at=13.0, admitted=1, starts=(13.0,))
    state, got = breaker.transition(state, breaker.tick(), 17.9)
    assert state == make_state(HALF_OPEN, 2, changed_at=13.0, admitted=1, starts=(13.0,))
    assert not got.changed

    state, got = breaker.transition(state, breaker.tick(), 18.0)
    assert state == make_state(OPEN, 3, changed_at=18.0)
    assert got == decision(False, 3, HALF_OPEN, OPEN, reason="a probe has been running for 5.000 s, limit 5.0 s")


def test_hung_probe_reopens_on_request():
    state = make_state(HALF_OPEN, 2, changed_at=13.0, admitted=2, starts=(13.0, 14.0))
    state, got = breaker.transition(state, breaker.request(), 19.0)
    assert state == make_state(OPEN, 3, changed_at=19.0)
    assert not got.admitted
    assert got.reason == "a probe has been running for 6.000 s, limit 5.0 s"


def test_cooldown_elapses_on_tick():
    state = make_state(OPEN, 1, changed_at=3.0)
    state, got = breaker.transition(state, breaker.tick(), 13.0)
    assert state == make_state(HALF_OPEN, 2, changed_at=13.0)
    assert got == decision(False, 2, OPEN, HALF_OPEN, reason="cooldown of 10.0 s elapsed")


def test_stale_results_are_ignored():
    state = make_state(OPEN, 1, changed_at=3.0)
    for event in (breaker.success(0), breaker.failure(0), breaker.timeout(0)):
        after, got = breaker.transition(state, event, 4.0)
        assert after == state
        assert got == decision(
            False, 1, OPEN, OPEN, ignored=True, reason="result of generation 0 ignored; the breaker is at generation 1"
        )

    closed = make_state(CLOSED, 3, failures=1, changed_at=14.5)
    after, got = breaker.transition(closed, breaker.failure(2), 15.0)
    assert after == closed
    assert got.ignored


def test_unknown_generation_is_rejected():
    state = make_state(CLOSED, 0)
    with pytest.raises(ValueError, match="generation=1 was never issued; the breaker is at generation 0"):
        breaker.transition(state, breaker.success(1), 1.0)
    with pytest.raises(ValueError, match="generation=-1 was never issued"):
        breaker.transition(state, breaker.BreakerEvent(breaker.BreakerEventKind.FAILURE), 1.0)


def test_probe_result_without_probe_is_rejected():
    state = make_state(HALF_OPEN, 2, changed_at=13.0)
    with pytest.raises(ValueError, match="no probe is running; report exactly one result per admitted call"):
        breaker.transition(state, breaker.success(2), 14.0)


@pytest.mark.parametrize("now", [math.nan, math.inf, "1.0", True])
def test_transition_rejects_bad_time(now):
    with pytest.raises(ValueError, match="now must be a finite monotonic time in seconds"):
        breaker.transition(breaker.init(POLICY), breaker.tick(), now)


def test_transition_rejects_time_going_back():
    state = make_state(OPEN, 1, changed_at=3.0)
    with pytest.raises(ValueError, match=r"now=2.0 is earlier than the last phase change at 3.0"):
        breaker.transition(state, breaker.tick(), 2.0)


def test_transition_rejects_unknown_event_kind():
    with pytest.raises(ValueError, match="'explode' is not a valid BreakerEventKind"):
        breaker.transition(breaker.init(POLICY), breaker.BreakerEvent("explode"), 1.0)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold must be an integer >= 1, got 0"),
        ({"half_open_probes": 1.5}, "half_open_probes must be an integer >= 1, got 1.5"),
        ({"success_threshold": True}, "success_threshold must be an integer >= 1, got True"),
        ({"cooldown_s": -1.0}, r"cooldown_s must be a finite number of seconds >= 0, got -1.0"),
        ({"cooldown_s": math.inf}, r"cooldown_s must be a finite number of seconds >= 0, got inf"),
        ({"probe_timeout_s": 0.0}, r"probe_timeout_s must be a finite number of seconds > 0, got 0.0"),
        ({"half_open_probes": 1, "success_threshold": 2}, "success_threshold=2 exceeds half_open_probes=1"),
    ],
)
def test_policy_rejects_bad_values(arguments, message):
    with pytest.raises(ValueError, match=message):
        BreakerPolicy(**arguments)


def test_zero_cooldown_probes_at_once():
    policy = BreakerPolicy(failure_threshold=1, cooldown_s=0.0)
    state, _ = breaker.transition(breaker.init(policy), breaker.failure(0), 1.0)
    assert state.phase is OPEN
    state, got = breaker.transition(state, breaker.request(), 1.0)
    assert state.phase is HALF_OPEN
    assert got.admitted
    assert got.probe


def test_state_round_trips_through_optree():
    state = make_state(HALF_OPEN, 2, changed_at=13.0, admitted=2, successes=1, starts=(13.5, 14.0))
    leaves, spec = optree.tree_flatten(state, namespace="tolaria")
    assert leaves == [HALF_OPEN, 2, 0, 13.0, 2, 1, 13.5, 14.0]
    assert optree.tree_unflatten(spec, leaves) == state
    assert optree.tree_map(lambda leaf: leaf, state, namespace="tolaria") == state
