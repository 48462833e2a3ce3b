"""Step-by-step tests of the pure emergency state machine."""

from __future__ import annotations

import optree
import pytest

from tolaria.functional import emergency as em
from tolaria.functional.emergency import EmergencyState, Level, StepSignals, Transition, TransitionKind

POLICY = em.EmergencyPolicy(
    cooldown_steps=2,
    on_nonfinite=((1, Level.ELEVATED), (2, Level.CONSERVATIVE)),
    on_spike=((1, Level.NOTICE), (2, Level.ELEVATED)),
    on_timeout=((2, Level.NOTICE),),
    on_rollback_failure=((1, Level.HALT),),
)


def make_state(
    level: Level, reason: str, since_step: int, since_s: float, escalations: int, healthy: int, counts=(0, 0, 0, 0)
):
    nonfinite, spike, timeout, rollback = counts
    return EmergencyState(level, reason, since_step, since_s, escalations, healthy, nonfinite, spike, timeout, rollback)


def test_initial_state_whole():
    assert em.initial() == make_state(Level.NOMINAL, "initial", 0, 0.0, 0, 0)
    assert em.initial(step=7, now=3.5) == make_state(Level.NOMINAL, "initial", 7, 3.5, 0, 0)


def test_evaluate_walks_levels_step_by_step():
    # Each row: signals, expected whole state afterwards, expected transition.
    ladder = [
        (
            StepSignals(1, spike=True),
            make_state(Level.NOTICE, "loss spikes: 1", 1, 101.0, 1, 0, (0, 1, 0, 0)),
            Transition(TransitionKind.ESCALATED, Level.NOMINAL, Level.NOTICE, "loss spikes: 1", 1, 101.0),
        ),
        (StepSignals(2), make_state(Level.NOTICE, "loss spikes: 1", 1, 101.0, 1, 1, (0, 1, 0, 0)), None),
        (
            StepSignals(3, spike=True),
            make_state(Level.ELEVATED, "loss spikes: 2", 3, 103.0, 2, 0, (0, 2, 0, 0)),
            Transition(TransitionKind.ESCALATED, Level.NOTICE, Level.ELEVATED, "loss spikes: 2", 3, 103.0),
        ),
        # One timeout is below the timeout ladder: counted, resets the cooldown, no transition.
        (StepSignals(4, timeouts=1), make_state(Level.ELEVATED, "loss spikes: 2", 3, 103.0, 2, 0, (0, 2, 1, 0)), None),
        (StepSignals(5), make_state(Level.ELEVATED, "loss spikes: 2", 3, 103.0, 2, 1, (0, 2, 1, 0)), None),
        (
            StepSignals(6),
            make_state(Level.NOTICE, "2 healthy steps at ELEVATED", 6, 106.0, 2, 0),
            Transition(
                TransitionKind.DEESCALATED, Level.ELEVATED, Level.NOTICE, "2 healthy steps at ELEVATED", 6, 106.0
            ),
        ),
        (StepSignals(7), make_state(Level.NOTICE, "2 healthy steps at ELEVATED", 6, 106.0, 2, 1), None),
        (
            StepSignals(8),
            make_state(Level.NOMINAL, "2 healthy steps at NOTICE", 8, 108.0, 2, 0),
            Transition(TransitionKind.DEESCALATED, Level.NOTICE, Level.NOMINAL, "2 healthy steps at NOTICE", 8, 108.0),
        ),
        (StepSignals(9), make_state(Level.NOMINAL, "2 healthy steps at NOTICE", 8, 108.0, 2, 1), None),
        (
            StepSignals(10, nonfinite_loss=True, nonfinite_grad=True),
            make_state(Level.ELEVATED, "non-finite steps: 1", 10, 110.0, 3, 0, (1, 0, 0, 0)),
            Transition(TransitionKind.ESCALATED, Level.NOMINAL, Level.ELEVATED, "non-finite steps: 1", 10, 110.0),
        ),
        (
            StepSignals(11, nonfinite_grad=True, spike=True),
            make_state(Level.CONSERVATIVE, "non-finite steps: 2, loss spikes: 1", 11, 111.0, 4, 0, (2, 1, 0, 0)),
            Transition(
                TransitionKind.ESCALATED,
                Level.ELEVATED,
                Level.CONSERVATIVE,
                "non-finite steps: 2, loss spikes: 1",
                11,
                111.0,
            ),
        ),
        (
            StepSignals(12, rollback_failed=True),
            make_state(Level.HALT, "rollback failures: 1", 12, 112.0, 5, 0, (2, 1, 0, 1)),
            Transition(TransitionKind.ESCALATED, Level.CONSERVATIVE, Level.HALT, "rollback failures: 1", 12, 112.0),
        ),
        # HALT is absorbing: healthy steps end the episode but never lower the level.
        (StepSignals(13), make_state(Level.HALT, "rollback failures: 1", 12, 112.0, 5, 1, (2, 1, 0, 1)), None),
        (StepSignals(14), make_state(Level.HALT, "rollback failures: 1", 12, 112.0, 5, 2), None),
        (StepSignals(15), make_state(Level.HALT, "rollback failures: 1", 12, 112.0, 5, 3), None),
        (
            StepSignals(16, spike=True),
            make_state(Level.HALT, "rollback failures: 1", 12, 112.0, 5, 0, (0, 1, 0, 0)),
            None,
        ),
    ]

    state = em.initial(now=100.0)
    for signals, expected_state, expected_transition in ladder:
        state, transition = em.evaluate(state, signals, POLICY, now=100.0 + signals.step)
        assert state == expected_state, f"step {signals.step}"
        assert transition == expected_transition, f"step {signals.step}"

    state, transition = em.reset(state, reason="operator", now=200.0, step=17)
    assert state == make_state(Level.NOMINAL, "operator", 17, 200.0, 5, 0)
    assert transition == Transition(TransitionKind.RESET, Level.HALT, Level.NOMINAL, "operator", 17, 200.0)


def test_timeouts_count_one_by_one():
    state, transition = em.evaluate(em.initial(), StepSignals(1, timeouts=2), POLICY, now=1.0)

    assert state == make_state(Level.NOTICE, "timeouts: 2", 1, 1.0, 1, 0, (0, 0, 2, 0))
    assert transition == Transition(TransitionKind.ESCALATED, Level.NOMINAL, Level.NOTICE, "timeouts: 2", 1, 1.0)


def test_interleaved_trouble_accumulates_within_episode():
    # Non-finite every other step never completes a cooldown of 2, so the counts keep growing.
    state = em.initial()
    for step in range(1, 4):
        state, _ = em.evaluate(state, StepSignals(step, nonfinite_loss=step % 2 == 1), POLICY, now=float(step))

    assert state == make_state(Level.CONSERVATIVE, "non-finite steps: 2", 3, 3.0, 2, 0, (2, 0, 0, 0))


def test_empty_ladder_ignores_signal():
    policy = em.EmergencyPolicy(on_spike=())

    state, transition = em.evaluate(em.initial(), StepSignals(4, spike=True), policy, now=2.0)

    assert state == make_state(Level.NOMINAL, "initial", 0, 0.0, 0, 0, (0, 1, 0, 0))
    assert transition is None


def test_escalate_never_lowers():
    state, _ = em.escalate(em.initial(), Level.ELEVATED, reason="manual", now=1.0, step=3)

    for level in (Level.NOMINAL, Level.NOTICE, Level.ELEVATED):
        same, transition = em.escalate(state, level, reason="lower", now=2.0, step=4)
        assert same is state
        assert transition is None


def test_escalate_accepts_names_and_numbers():
    by_name, _ = em.escalate(em.initial(), "conservative", reason="r", now=1.0, step=1)
    by_number, _ = em.escalate(em.initial(), 3, reason="r", now=1.0, step=1)

    assert by_name == make_state(Level.CONSERVATIVE, "r", 1, 1.0, 1, 0)
    assert by_number == by_name


def test_deescalate_waits_for_cooldown():
    state, _ = em.escalate(em.initial(), Level.CONSERVATIVE, reason="manual", now=1.0, step=1)

    blocked, transition = em.deescalate(state, Level.NOTICE, reason="early", now=2.0, step=2, policy=POLICY)
    assert blocked is state
    assert transition is None

    ready = state._replace(healthy_steps=2, spike_count=1)
    lowered, transition = em.deescalate(ready, Level.NOTICE, reason="calm", now=3.0, step=5, policy=POLICY)
    assert lowered == make_state(Level.NOTICE, "calm", 5, 3.0, 1, 0)
    assert transition == Transition(TransitionKind.DEESCALATED, Level.CONSERVATIVE, Level.NOTICE, "calm", 5, 3.0)


def test_deescalate_never_raises_level():
    state = make_state(Level.NOTICE, "x", 1, 1.0, 1, 50)

    for level in (Level.NOTICE, Level.ELEVATED, Level.HALT):
        same, transition = em.deescalate(state, level, reason="up", now=2.0, step=2, policy=POLICY)
        assert same is state
        assert transition is None


def test_deescalate_cannot_leave_halt():
    halted = make_state(Level.HALT, "x", 1, 1.0, 1, 1000)

    same, transition = em.deescalate(halted, Level.NOMINAL, reason="try", now=2.0, step=2, policy=POLICY)

    assert same is halted
    assert transition is None


def test_reset_from_nominal_still_reports():
    state, transition = em.reset(em.initial(), reason="new run", now=4.0, step=9)

    assert state == make_state(Level.NOMINAL, "new run", 9, 4.0, 0, 0)
    assert transition == Transition(TransitionKind.RESET, Level.NOMINAL, Level.NOMINAL, "new run", 9, 4.0)


@pytest.mark.parametrize("bad", [5, -1, "PANIC", True, 2.0, None])
def test_invalid_levels_raise(bad):
    with pytest.raises(ValueError, match=r"level=.* is not an emergency level; expected one of NOMINAL=0"):
        em.escalate(em.initial(), bad, reason="r", now=0.0, step=0)
    with pytest.raises(ValueError, match=r"level=.* is not an emergency level"):
        em.deescalate(em.initial(), bad, reason="r", now=0.0, step=0, policy=POLICY)
    with pytest.raises(ValueError, match=r"level=.* is not an emergency level"):
        em.actions(bad)


def test_invalid_state_level_raises():
    broken = em.initial()._replace(level=9)

    with pytest.raises(ValueError, match=r"state.level=9 is not an emergency level"):
        em.evaluate(broken, StepSignals(1), POLICY, now=0.0)


def test_invalid_time_and_step_raise():
    with pytest.raises(ValueError, match=r"now=nan is invalid; expected a finite monotonic time"):
        em.escalate(em.initial(), Level.NOTICE, reason="r", now=float("nan"), step=0)
    with pytest.raises(ValueError, match=r"step=-1 is invalid; expected an integer >= 0"):
        em.reset(em.initial(), reason="r", now=0.0, step=-1)
    with pytest.raises(ValueError, match=r"signals.timeouts=-2 is invalid"):
        em.evaluate(em.initial(), StepSignals(1, timeouts=-2), POLICY, now=0.0)
    with pytest.raises(ValueError, match=r"signals=.* is invalid; expected StepSignals"):
        em.evaluate(em.initial(), (1, True), POLICY, now=0.0)


def test_pure_functions_do_not_mutate_inputs():
    state = make_state(Level.ELEVATED, "x", 1, 1.0, 1, 1, (1, 1, 1, 0))
    copy = tuple(state)

    em.evaluate(state, StepSignals(2), POLICY, now=2.0)
    em.evaluate(state, StepSignals(2, spike=True), POLICY, now=2.0)
    em.escalate(state, Level.HALT, reason="r", now=2.0, step=2)
    em.reset(state, reason="r", now=2.0, step=2)

    assert tuple(state) == copy


def test_state_round_trips_through_optree():
    state, _ = em.evaluate(em.initial(now=1.0), StepSignals(3, spike=True, timeouts=1), POLICY, now=2.5)

    leaves, spec = optree.tree_flatten(state, namespace="tolaria")
    rebuilt = optree.tree_unflatten(spec, leaves)

    assert len(leaves) == len(EmergencyState._fields)
    assert rebuilt == state
    assert isinstance(rebuilt, EmergencyState)
    assert rebuilt.level is Level.NOTICE


def test_transition_round_trips_through_optree():
    _, transition = em.escalate(em.initial(), Level.HALT, reason="r", now=1.0, step=2)

    leaves, spec = optree.tree_flatten(transition)

    assert optree.tree_unflatten(spec, leaves) == transition


def test_actions_per_level():
    assert em.actions(Level.NOMINAL) == em.Actions(False, False, False, False, False, False, "Train normally.")
    assert em.actions(Level.NOTICE).record
    assert not em.actions(Level.NOTICE).warn
    assert em.actions(Level.ELEVATED).warn
    assert em.actions(Level.ELEVATED).snapshot_more_often
    assert not em.actions(Level.ELEVATED).stop_adaptation
    assert em.actions(Level.CONSERVATIVE).stop_adaptation
    assert em.actions(Level.CONSERVATIVE).roll_back
    assert not em.actions(Level.CONSERVATIVE).save_and_stop
    assert em.actions("HALT").save_and_stop
    assert em.actions(4).stop_adaptation
    assert not em.actions(Level.HALT).roll_back


def test_state_mapping_round_trip_keeps_age() -> None:
    from tolaria.functional import emergency as core

    start = core.initial(step=0, now=100.0)
    state, _ = core.escalate(start, core.Level.CONSERVATIVE, reason="spikes", now=130.0, step=7)
    data = core.state_to_mapping(state, now=150.0)
    assert data["age_s"] == 20.0
    restored = core.state_from_mapping(data, now=5.0)
    assert restored == state._replace(since_s=-15.0)


def test_state_mapping_missing_field_rejected() -> None:
    from tolaria.functional import emergency as core

    data = core.state_to_mapping(core.initial(), now=1.0)
    del data["level"]
    with pytest.raises(ValueError, match="missing the field 'level'"):
        core.state_from_mapping(data, now=1.0)
