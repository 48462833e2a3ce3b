"""Stateful hypothesis test of the pure emergency state machine."""

from __future__ import annotations

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tolaria.functional import emergency as em
from tolaria.functional.emergency import EmergencyState, Level, StepSignals, TransitionKind

levels = st.sampled_from(list(Level))
signals_strategy = st.builds(
    StepSignals,
    step=st.just(0),
    nonfinite_loss=st.booleans(),
    nonfinite_grad=st.booleans(),
    spike=st.booleans(),
    timeouts=st.integers(0, 3),
    # Rare, because one failed rollback halts under the default ladder.
    rollback_failed=st.integers(0, 9).map(lambda draw: draw == 0),
)
# Healthy steps are drawn often so that cooldowns complete and levels come down.
maybe_healthy = st.one_of(st.just(StepSignals(0)), st.just(StepSignals(0)), signals_strategy)


class EmergencyMachine(RuleBasedStateMachine):
    """Drives ``evaluate``, ``escalate``, ``deescalate`` and ``reset`` in random order.

    ``healthy_model`` counts healthy steps independently of the state: it resets on
    every transition and unhealthy step, so a step-down seen with a smaller count
    would break the cooldown.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: EmergencyState = em.initial()
        self.policy = em.EmergencyPolicy()
        self.step = 0
        self.now = 0.0
        self.healthy_model = 0

    @initialize(
        cooldown=st.integers(1, 6),
        spike_ladder=st.sampled_from([(), ((1, "NOTICE"),), ((1, "NOTICE"), (2, "ELEVATED"), (4, "CONSERVATIVE"))]),
        nonfinite_ladder=st.sampled_from([((1, "ELEVATED"), (3, "CONSERVATIVE"), (5, "HALT")), ((2, "HALT"),)]),
    )
    def choose_policy(self, cooldown, spike_ladder, nonfinite_ladder):
        self.policy = em.EmergencyPolicy(cooldown_steps=cooldown, on_spike=spike_ladder, on_nonfinite=nonfinite_ladder)

    def advance(self) -> None:
        self.step += 1
        self.now += 0.5

    @rule(signals=maybe_healthy)
    def evaluate(self, signals):
        self.advance()
        before = self.state
        signals = signals._replace(step=self.step)

        self.state, transition = em.evaluate(before, signals, self.policy, now=self.now)
        event(f"evaluate: {transition.kind if transition else 'no transition'} to {self.state.level.name}")

        if before.level == Level.HALT:
            assert self.state.level == Level.HALT
        if not signals.healthy:
            self.healthy_model = 0
            assert self.state.level >= before.level
            assert transition is None or transition.kind is TransitionKind.ESCALATED
            return
        self.healthy_model += 1
        assert self.state.level <= before.level
        if transition is not None:
            assert transition.kind is TransitionKind.DEESCALATED
            assert transition.level == before.level - 1
            assert self.healthy_model >= self.policy.cooldown_steps
            self.healthy_model = 0

    @rule(level=levels)
    def escalate(self, level):
        self.advance()
        before = self.state

        self.state, transition = em.escalate(before, level, reason="test", now=self.now, step=self.step)

        assert self.state.level == max(before.level, level)
        assert self.state.escalations == before.escalations + (transition is not None)
        if transition is not None:
            assert transition == em.Transition(
                TransitionKind.ESCALATED, before.level, level, "test", self.step, self.now
            )
            self.healthy_model = 0

    @rule(level=levels)
    def deescalate(self, level):
        self.advance()
        before = self.state

        self.state, transition = em.deescalate(
            before, level, reason="test", now=self.now, step=self.step, policy=self.policy
        )

        assert self.state.level <= before.level
        if before.level == Level.HALT:
            assert self.state == before
        if transition is None:
            assert self.state == before
            return
        assert self.state.level == level
        assert self.healthy_model >= self.policy.cooldown_steps
        self.healthy_model = 0

    @rule()
    def reset(self):
        self.advance()
        before = self.state

        self.state, transition = em.reset(before, reason="operator", now=self.now, step=self.step)

        assert self.state.level == Level.NOMINAL
        assert self.state.escalations == before.escalations
        assert transition.previous == before.level
        self.healthy_model = 0

    @invariant()
    def level_is_valid(self):
        assert isinstance(self.state.level, Level)
        assert em.as_level(int(self.state.level)) == self.state.level

    @invariant()
    def counters_are_consistent(self):
        assert self.state.healthy_steps == self.healthy_model
        assert self.state.escalations >= 0
        for count in (
            self.state.nonfinite_count,
            self.state.spike_count,
            self.state.timeout_count,
            self.state.rollback_failure_count,
        ):
            assert count >= 0


TestEmergencyMachine = EmergencyMachine.TestCase
