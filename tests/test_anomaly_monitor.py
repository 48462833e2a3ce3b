"""Unit tests of the loss anomaly monitor."""

from __future__ import annotations

import math

import optree
import pytest
import torch

from tolaria.functional import anomaly
from tolaria.functional.anomaly import LossMonitorConfig, LossMonitorState, LossVerdict

SMALL = LossMonitorConfig(window=5, warmup=3, threshold=6.0, min_relative_scale=0.1)


def feed(state: LossMonitorState, losses) -> tuple[LossMonitorState, list[LossVerdict]]:
    verdicts = []
    for loss in losses:
        state, verdict = anomaly.update(state, torch.as_tensor(loss, dtype=torch.float64))
        verdicts.append(verdict)
    return state, verdicts


def nan_equal(first: torch.Tensor, second: torch.Tensor) -> bool:
    return bool(torch.equal(torch.isnan(first), torch.isnan(second))) and bool(
        torch.equal(torch.nan_to_num(first), torch.nan_to_num(second))
    )


def test_init_scalar_state():
    state = anomaly.init(config=SMALL, dtype=torch.float64)

    assert state.scalar
    assert state.loss_shape == ()
    assert state.history.shape == (1, 5)
    assert state.history.dtype == torch.float64
    assert torch.isnan(state.history).all()
    assert torch.equal(state.count, torch.zeros(1, dtype=torch.int64))


def test_init_vector_state():
    state = anomaly.init(4)

    assert not state.scalar
    assert state.loss_shape == (4,)
    assert state.history.shape == (4, 64)
    assert state.history.dtype == torch.float32
    assert state.config == LossMonitorConfig()


def test_score_matches_hand_computation():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [1.0, 2.0, 3.0])

    _, verdict = anomaly.update(state, torch.tensor(20.0, dtype=torch.float64))

    # median 2, MAD median(1, 0, 1) = 1, scale max(1.4826 * 1, 0.1 * 2) = 1.4826.
    assert verdict.score.item() == pytest.approx(18.0 / 1.4826)
    assert verdict.spike.item()
    assert not verdict.nonfinite.item()


def test_even_window_uses_mean_of_middle_values():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [1.0, 2.0, 3.0, 4.0])

    _, verdict = anomaly.update(state, torch.tensor(20.0, dtype=torch.float64))

    # median 2.5, deviations (1.5, 0.5, 0.5, 1.5) so MAD 1, scale 1.4826.
    assert verdict.score.item() == pytest.approx(17.5 / 1.4826)


def test_relative_floor_applies_to_constant_history():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [10.0, 10.0, 10.0])

    _, below = anomaly.update(state, torch.tensor(15.0, dtype=torch.float64))
    _, above = anomaly.update(state, torch.tensor(16.5, dtype=torch.float64))

    # MAD is 0, so the scale is the floor 0.1 * 10 = 1: the threshold 6 sits at 16.
    assert below.score.item() == pytest.approx(5.0)
    assert not below.spike.item()
    assert above.score.item() == pytest.approx(6.5)
    assert above.spike.item()


def test_no_spike_during_warmup():
    state = anomaly.init(config=SMALL, dtype=torch.float64)

    state, verdicts = feed(state, [1.0, 1000.0, 1e6])

    assert [bool(v.spike) for v in verdicts] == [False, False, False]
    assert [float(v.score) for v in verdicts] == [0.0, 0.0, 0.0]
    assert state.count.tolist() == [3]


def test_drop_is_not_a_spike():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [10.0, 11.0, 9.0, 10.0])

    _, verdict = anomaly.update(state, torch.tensor(0.01, dtype=torch.float64))

    assert not verdict.spike.item()
    assert verdict.score.item() < 0


def test_negative_losses_spike_upwards_only():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [-10.0, -10.5, -9.5, -10.0])

    _, rise = anomaly.update(state, torch.tensor(100.0, dtype=torch.float64))
    _, fall = anomaly.update(state, torch.tensor(-1000.0, dtype=torch.float64))

    assert rise.spike.item()
    assert not fall.spike.item()


def test_all_zero_window_scores_positive_loss_infinite():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [0.0, 0.0, 0.0])

    _, zero = anomaly.update(state, torch.tensor(0.0, dtype=torch.float64))
    _, positive = anomaly.update(state, torch.tensor(1e-9, dtype=torch.float64))

    assert zero.score.item() == 0.0
    assert not zero.spike.item()
    assert positive.score.item() == math.inf
    assert positive.spike.item()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_flagged_and_not_recorded(bad):
    state, _ = feed(anomaly.init(2, config=SMALL, dtype=torch.float64), [[1.0, 5.0], [2.0, 6.0]])

    new_state, verdict = anomaly.update(state, torch.tensor([bad, 7.0], dtype=torch.float64))

    assert verdict.nonfinite.tolist() == [True, False]
    assert verdict.spike.tolist() == [False, False]
    assert verdict.score.tolist() == [0.0, 0.0]
    assert new_state.count.tolist() == [2, 3]
    assert nan_equal(new_state.history[0], state.history[0])
    assert new_state.history[1].tolist()[:3] == [5.0, 6.0, 7.0]


def test_nonfinite_does_not_advance_warmup():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [1.0, 1.0, math.nan, math.nan])

    _, verdict = anomaly.update(state, torch.tensor(100.0, dtype=torch.float64))

    assert state.count.tolist() == [2]
    assert not verdict.spike.item()


def test_ring_buffer_keeps_last_window():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])

    assert state.count.tolist() == [7]
    assert sorted(state.history[0].tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0]


def test_lasting_level_change_stops_being_flagged():
    state, _ = feed(anomaly.init(config=SMALL, dtype=torch.float64), [1.0, 1.0, 1.0, 1.0, 1.0])

    state, verdicts = feed(state, [50.0] * 5)

    assert [bool(v.spike) for v in verdicts] == [True, True, True, False, False]


def test_objectives_are_judged_separately():
    state, _ = feed(anomaly.init(2, config=SMALL, dtype=torch.float64), [[1.0, 100.0]] * 4)

    _, verdict = anomaly.update(state, torch.tensor([100.0, 100.0], dtype=torch.float64))

    assert verdict.spike.tolist() == [True, False]
    assert verdict.nonfinite.tolist() == [False, False]


def test_scalar_verdict_has_scalar_shape():
    state = anomaly.init(config=SMALL)

    _, verdict = anomaly.update(state, torch.tensor(1.0))

    assert verdict.nonfinite.shape == ()
    assert verdict.spike.shape == ()
    assert verdict.score.shape == ()
    assert verdict.nonfinite.dtype == torch.bool
    assert verdict.spike.dtype == torch.bool


def test_update_does_not_mutate_state():
    state, _ = feed(anomaly.init(2, config=SMALL), [[1.0, 2.0]] * 2)
    history = state.history.clone()
    count = state.count.clone()

    anomaly.update(state, torch.tensor([3.0, math.nan]))

    assert nan_equal(state.history, history)
    assert torch.equal(state.count, count)


def test_loss_with_grad_is_detached():
    weight = torch.tensor(2.0, requires_grad=True)
    state = anomaly.init(config=SMALL)

    new_state, verdict = anomaly.update(state, weight * 3.0)

    assert not new_state.history.requires_grad
    assert not verdict.score.requires_grad


def test_update_runs_without_host_reads():
    # Meta tensors have no data: any read back to the host (.item(), bool(tensor)) would raise.
    state = anomaly.init(3, device="meta")

    for _ in range(4):
        state, verdict = anomaly.update(state, torch.empty(3, device="meta"))

    assert verdict.spike.device.type == "meta"
    assert anomaly.summarize(verdict).shape == (3,)


def test_lower_precision_losses_are_cast():
    state = anomaly.init(config=SMALL)

    state, verdict = anomaly.update(state, torch.tensor(1.5, dtype=torch.bfloat16))

    assert state.history.dtype == torch.float32
    assert state.history[0, 0].item() == 1.5
    assert verdict.score.dtype == torch.float32


def test_state_round_trips_through_optree():
    state, _ = feed(anomaly.init(2, config=SMALL), [[1.0, 2.0]] * 3)

    leaves, spec = optree.tree_flatten(state, namespace="tolaria")
    rebuilt = optree.tree_unflatten(spec, leaves)

    assert len(leaves) == 2
    assert isinstance(rebuilt, LossMonitorState)
    assert rebuilt.config == SMALL
    assert not rebuilt.scalar
    assert nan_equal(rebuilt.history, state.history)
    assert torch.equal(rebuilt.count, state.count)


def test_state_maps_over_leaves():
    state = anomaly.init(2, config=SMALL)

    doubled = optree.tree_map(lambda leaf: leaf.to(torch.float64), state, namespace="tolaria")

    assert doubled.history.dtype == torch.float64
    assert doubled.count.dtype == torch.float64
    assert doubled.config == SMALL


def test_merge_and_summarize():
    first = LossVerdict(torch.tensor([False, True]), torch.tensor([False, False]), torch.tensor([1.0, 0.0]))
    second = LossVerdict(torch.tensor([False, False]), torch.tensor([True, False]), torch.tensor([0.5, 9.0]))

    merged = anomaly.merge(first, second)

    assert merged.nonfinite.tolist() == [False, True]
    assert merged.spike.tolist() == [True, False]
    assert merged.score.tolist() == [1.0, 9.0]
    assert anomaly.summarize(merged).tolist() == [1.0, 1.0, 9.0]
    assert anomaly.summarize(first).tolist() == [1.0, 0.0, 1.0]


def test_update_rejects_wrong_shape():
    state = anomaly.init(3)

    with pytest.raises(ValueError, match=r"loss has shape \(2,\); this monitor expects shape \(3,\)"):
        anomaly.update(state, torch.zeros(2))
    with pytest.raises(ValueError, match=r"loss has shape \(\); this monitor expects shape \(3,\)"):
        anomaly.update(state, torch.tensor(1.0))


def test_update_rejects_integer_loss():
    with pytest.raises(ValueError, match=r"loss has dtype torch.int64; expected a floating point dtype"):
        anomaly.update(anomaly.init(), torch.tensor(1))


def test_update_rejects_other_device():
    state = anomaly.init(device="meta")

    with pytest.raises(ValueError, match=r"loss is on cpu but the monitor state is on meta"):
        anomaly.update(state, torch.tensor(1.0))


def test_update_rejects_non_tensor():
    with pytest.raises(TypeError, match=r"loss must be a torch.Tensor, got float"):
        anomaly.update(anomaly.init(), 1.0)


def test_init_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"num_losses=0 is invalid; expected an integer >= 1"):
        anomaly.init(0)
    with pytest.raises(ValueError, match=r"dtype=torch.int32 is invalid; expected a floating point torch.dtype"):
        anomaly.init(dtype=torch.int32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 2}, r"window=2 is invalid; expected an integer >= 3"),
        ({"warmup": 0}, r"warmup=0 is invalid; expected an integer >= 1"),
        ({"window": 8, "warmup": 9}, r"warmup=9 is invalid; expected at most window=8"),
        ({"threshold": 0.0}, r"threshold=0.0 is invalid; expected a finite number > 0"),
        ({"threshold": math.inf}, r"threshold=inf is invalid"),
        ({"min_relative_scale": -0.1}, r"min_relative_scale=-0.1 is invalid; expected a finite number >= 0"),
        ({"min_relative_scale": "0.1"}, r"min_relative_scale='0.1' is invalid"),
    ],
)
def test_config_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossMonitorConfig(**kwargs)


def test_config_from_mapping():
    config = LossMonitorConfig.from_mapping({"window": 32, "threshold": 8})

    assert config == LossMonitorConfig(window=32, threshold=8.0)
    assert isinstance(config.threshold, float)
    assert LossMonitorConfig.from_mapping(config.to_mapping()) == config


def test_config_from_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown loss monitor keys \['windows'\]; allowed keys are \['window'"):
        LossMonitorConfig.from_mapping({"windows": 32})
