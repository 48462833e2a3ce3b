"""Properties of the loss anomaly monitor over generated loss sequences."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tolaria.functional import anomaly
from tolaria.functional.anomaly import LossMonitorConfig


@st.composite
def configs(draw: st.DrawFn) -> LossMonitorConfig:
    window = draw(st.integers(3, 24))
    return LossMonitorConfig(
        window=window,
        warmup=draw(st.integers(1, window)),
        threshold=draw(st.floats(0.5, 20.0)),
        min_relative_scale=draw(st.floats(0.01, 0.5)),
    )


# Magnitudes stay well inside float64 so that scaling by up to 1e3 neither overflows nor turns subnormal.
finite_losses = st.one_of(
    st.just(0.0),
    st.floats(1e-6, 1e6),
    st.floats(-1e6, -1e-6),
)
any_losses = st.one_of(finite_losses, st.sampled_from([math.nan, math.inf, -math.inf]))


def run(config: LossMonitorConfig, rows: list[list[float]]) -> list[anomaly.LossVerdict]:
    state = anomaly.init(len(rows[0]), config, dtype=torch.float64)
    verdicts = []
    for row in rows:
        state, verdict = anomaly.update(state, torch.tensor(row, dtype=torch.float64))
        verdicts.append(verdict)
    return verdicts


@given(config=configs(), width=st.integers(1, 3), data=st.data())
def test_nonfinite_always_flagged(config, width, data):
    rows = data.draw(st.lists(st.lists(any_losses, min_size=width, max_size=width), min_size=1, max_size=40))
    state = anomaly.init(width, config, dtype=torch.float64)

    for row in rows:
        loss = torch.tensor(row, dtype=torch.float64)
        finite = torch.isfinite(loss)
        previous_count = state.count.clone()

        state, verdict = anomaly.update(state, loss)

        assert torch.equal(verdict.nonfinite, ~finite)
        assert not verdict.spike[~finite].any()
        assert torch.equal(state.count, previous_count + finite.to(torch.int64))
        # Non-finite values never reach the window, which holds only finite numbers and NaN for empty slots.
        assert not torch.isinf(state.history).any()


@given(config=configs(), value=finite_losses, length=st.integers(1, 60))
def test_constant_losses_never_spike(config, value, length):
    verdicts = run(config, [[value]] * length)

    assert not any(bool(verdict.spike) for verdict in verdicts)
    assert all(float(verdict.score) == 0.0 for verdict in verdicts)


@given(
    config=configs(),
    base=st.floats(1e-3, 1e3),
    noise=st.lists(st.floats(-0.2, 0.2), min_size=24, max_size=24),
)
def test_hundredfold_jump_after_warmup_flagged(config, base, noise):
    history = [base * (1.0 + wobble) for wobble in noise[: config.window]]

    verdicts = run(config, [[loss] for loss in history] + [[100.0 * base]])

    assert bool(verdicts[-1].spike)
    assert float(verdicts[-1].score) > config.threshold


@given(
    config=configs(),
    losses=st.lists(any_losses, min_size=1, max_size=40),
    factor=st.floats(1e-3, 1e3),
)
def test_scale_invariance(config, losses, factor):
    plain = run(config, [[loss] for loss in losses])
    scaled = run(config, [[loss * factor] for loss in losses])

    for first, second in zip(plain, scaled, strict=True):
        assert bool(first.nonfinite) == bool(second.nonfinite)
        score, scaled_score = float(first.score), float(second.score)
        assert math.isclose(score, scaled_score, rel_tol=1e-9, abs_tol=1e-9)
        # Away from the threshold the verdicts must agree; within a rounding error of it either verdict is correct.
        if abs(score - config.threshold) > 1e-9 * (1.0 + config.threshold):
            assert bool(first.spike) == bool(second.spike)


@given(
    config=configs(),
    losses=st.lists(any_losses, min_size=1, max_size=40),
    exponent=st.integers(-10, 10),
)
def test_power_of_two_scaling_is_exact(config, losses, exponent):
    factor = 2.0**exponent
    assume(all(not math.isfinite(loss) or loss == 0.0 or abs(loss * factor) > 1e-290 for loss in losses))

    plain = run(config, [[loss] for loss in losses])
    scaled = run(config, [[loss * factor] for loss in losses])

    for first, second in zip(plain, scaled, strict=True):
        assert torch.equal(first.spike, second.spike)
        assert torch.equal(first.nonfinite, second.nonfinite)
        assert torch.equal(first.score, second.score)
