"""Trainer on small real problems: learning, skipping non-finite steps, clear errors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_cases import TwoHeadNet, regression_data, regression_objectives

from tolaria import Trainer, TrainerConfig
from tolaria.data import EpochBatches
from tolaria.telemetry import InMemorySink, Telemetry, read_jsonl


def make_trainer(config: TrainerConfig, telemetry: Telemetry | None = None, **kwargs: object) -> Trainer:
    torch.manual_seed(0)
    model = TwoHeadNet()
    x, y_a, y_b = regression_data()
    train = EpochBatches(x, y_a, y_b, batch_size=32, seed=0)
    val = EpochBatches(x[:64], y_a[:64], y_b[:64], batch_size=64, shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return Trainer(model, optimizer, regression_objectives, train, val, config, telemetry=telemetry, **kwargs)


@pytest.mark.parametrize("aggregator", ["sum", "mean", "pcgrad", "weighted"])
def test_fit_decreases_losses(aggregator: str) -> None:
    weights = (1.0, 0.5) if aggregator == "weighted" else None
    trainer = make_trainer(TrainerConfig(epochs=6, aggregator=aggregator, weights=weights, device="cpu"))
    result = trainer.fit()
    first, last = result.epochs[0], result.epochs[-1]
    for name in ("a", "b"):
        assert last.train_loss[name] < 0.5 * first.train_loss[name], (name, first.train_loss, last.train_loss)
        assert last.val_loss[name] < first.val_loss[name]
    assert result.global_step == 6 * 8
    assert last.skipped_steps == 0


def test_batched_and_loop_gradients_agree() -> None:
    batched = make_trainer(TrainerConfig(epochs=2, aggregator="pcgrad", gradient_mode="batched", device="cpu"))
    loop = make_trainer(TrainerConfig(epochs=2, aggregator="pcgrad", gradient_mode="loop", device="cpu"))
    batched.fit()
    loop.fit()
    for (name, p_batched), (_, p_loop) in zip(
        batched.model.named_parameters(), loop.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p_batched, p_loop, msg=name, rtol=1e-5, atol=1e-6)


def test_same_seed_gives_same_metrics() -> None:
    first = make_trainer(TrainerConfig(epochs=2, seed=3, device="cpu")).fit()
    second = make_trainer(TrainerConfig(epochs=2, seed=3, device="cpu")).fit()
    assert first.epochs[-1].train_loss == second.epochs[-1].train_loss
    assert first.epochs[-1].val_loss == second.epochs[-1].val_loss


def test_exclusive_head_gets_its_own_gradient() -> None:
    """A head used by one objective receives exactly that objective's gradient."""
    trainer = make_trainer(TrainerConfig(epochs=1, aggregator="pcgrad", device="cpu"))
    model = trainer.model
    x, y_a, y_b = (tensor[:32] for tensor in regression_data())
    expected = torch.autograd.grad(
        regression_objectives(model, (x, y_a, y_b))["a"], list(model.head_a.parameters())
    )
    before = [parameter.detach().clone() for parameter in model.head_a.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer.runner.optimizer = optimizer
    trainer.runner.run((x, y_a, y_b), global_step=0)
    for old, new, grad in zip(before, model.head_a.parameters(), expected, strict=True):
        torch.testing.assert_close(new.detach(), old - 0.1 * grad)


def test_nonfinite_loss_skips_update_bit_identically() -> None:
    trainer = make_trainer(TrainerConfig(epochs=1, device="cpu"))
    x, y_a, y_b = (tensor[:32] for tensor in regression_data())
    trainer.runner.run((x, y_a, y_b), global_step=0)
    parameters = [parameter.detach().clone() for parameter in trainer.model.parameters()]
    optimizer_state = {
        key: value.clone() for state in trainer.optimizer.state.values() for key, value in state.items()
    }
    y_bad = y_a.clone()
    y_bad[0] = math.nan
    outcome = trainer.runner.run((x, y_bad, y_b), global_step=1)
    assert not outcome.applied
    assert outcome.nonfinite
    for old, new in zip(parameters, trainer.model.parameters(), strict=True):
        assert torch.equal(old, new.detach())
    after = {key: value for state in trainer.optimizer.state.values() for key, value in state.items()}
    for key, value in optimizer_state.items():
        assert torch.equal(value, after[key]), key


def test_fit_counts_and_reports_skipped_steps() -> None:
    telemetry = Telemetry([sink := InMemorySink()])
    x, y_a, y_b = regression_data()
    y_a = y_a.clone()
    y_a[5] = math.inf
    torch.manual_seed(0)
    model = TwoHeadNet()
    trainer = Trainer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        regression_objectives,
        EpochBatches(x, y_a, y_b, batch_size=32, shuffle=False),
        config=TrainerConfig(epochs=2, device="cpu"),
        telemetry=telemetry,
    )
    result = trainer.fit()
    assert [epoch.skipped_steps for epoch in result.epochs] == [1, 1]
    assert result.global_step == 2 * 7
    assert telemetry.counters["tolaria.anomaly.nonfinite"] == 2
    assert len([event for event in sink.events() if event.name == "tolaria.anomaly.nonfinite"]) == 2


# fp16 needs CUDA, so these tests put torch's CPU GradScaler on a float32 run. A scale near float32's
# maximum makes the scaled gradients overflow, as fp16 gradients do while the scaler looks for its scale.
HUGE_SCALE = 3e38


def test_scaler_overflow_skips_update_bit_identically() -> None:
    trainer = make_trainer(TrainerConfig(epochs=1, device="cpu"))
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=HUGE_SCALE)
    x, y_a, y_b = (tensor[:32] for tensor in regression_data())
    parameters = [parameter.detach().clone() for parameter in trainer.model.parameters()]

    outcome = trainer.runner.run((x, y_a, y_b), global_step=0)

    assert not outcome.applied
    assert outcome.scaler_skipped
    assert not outcome.nonfinite
    assert trainer.precision.scaler.get_scale() < HUGE_SCALE
    for old, new in zip(parameters, trainer.model.parameters(), strict=True):
        assert torch.equal(old, new.detach())


def test_fit_reports_scaler_overflows_as_skips() -> None:
    telemetry = Telemetry([sink := InMemorySink()])
    trainer = make_trainer(TrainerConfig(epochs=1, device="cpu"), telemetry=telemetry)
    scaler = torch.amp.GradScaler("cpu", init_scale=HUGE_SCALE)
    trainer.precision.scaler = scaler

    result = trainer.fit()

    skipped = result.epochs[0].skipped_steps
    assert 1 <= skipped < 8
    assert result.global_step == 8 - skipped
    assert telemetry.counters["tolaria.amp.overflows"] == skipped
    assert len([event for event in sink.events() if event.name == "tolaria.amp.overflow"]) == skipped
    assert "tolaria.anomaly.nonfinite" not in telemetry.counters
    assert trainer.guard.emergency.max_level == 0
    # Each overflow halved the scale, and too few steps followed to raise it again.
    assert scaler.get_scale() == pytest.approx(HUGE_SCALE * 0.5**skipped, rel=1e-6)


def test_wrong_input_shape_gives_clear_error() -> None:
    trainer = make_trainer(TrainerConfig(epochs=1, device="cpu"))
    x = torch.randn(8, 5)
    y = torch.randn(8)
    with pytest.raises(RuntimeError, match=r"forward pass failed for a batch with tensor shapes \[\(8, 5\)"):
        trainer.runner.run((x, y, y), global_step=0)


def test_objectives_returning_non_scalar_rejected() -> None:
    torch.manual_seed(0)
    model = TwoHeadNet()
    x, y_a, y_b = regression_data(64)

    def per_sample(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> Mapping[str, torch.Tensor]:
        out_a, out_b = model(batch[0])
        return {"a": (out_a - batch[1]) ** 2, "b": (out_b - batch[2]).pow(2).mean()}

    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        per_sample,
        EpochBatches(x, y_a, y_b, batch_size=32),
        config=TrainerConfig(epochs=1, device="cpu"),
    )
    with pytest.raises(ValueError, match=r"objective 'a' returned \(32,\); expected a scalar floating-point tensor"):
        trainer.fit()


def test_weights_of_wrong_length_rejected() -> None:
    config = TrainerConfig(epochs=1, aggregator="weighted", weights=(1.0, 1.0, 1.0), device="cpu")
    with pytest.raises(ValueError, match=r"TrainerConfig\.weights: .*expected 2 weights"):
        make_trainer(config).fit()


def test_failure_is_reported_and_reraised(tmp_path: Path) -> None:
    def broken(model: nn.Module, batch: object) -> Mapping[str, torch.Tensor]:
        raise KeyError("label")

    model = TwoHeadNet()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        broken,
        [(torch.zeros(2, 4),)],
        config=TrainerConfig(epochs=1, device="cpu", out_dir=tmp_path / "run"),
    )
    with trainer, pytest.raises(KeyError, match="label"):
        trainer.fit()
    events = [event for packet in read_jsonl(tmp_path / "run" / "telemetry.jsonl") for event in packet.events]
    failed = [event for event in events if event.name == "tolaria.run.failed"]
    assert len(failed) == 1
    assert failed[0].attributes["error"] == "KeyError"


def test_telemetry_file_has_epoch_packets(tmp_path: Path) -> None:
    with make_trainer(TrainerConfig(epochs=2, device="cpu", out_dir=tmp_path / "run")) as trainer:
        trainer.fit()
    packets = list(read_jsonl(tmp_path / "run" / "telemetry.jsonl"))
    epochs = {packet.epoch for packet in packets if any(m.name == "tolaria.train.loss" for m in packet.metrics)}
    assert epochs == {0, 1}
    names = {metric.name for packet in packets for metric in packet.metrics}
    for expected in (
        "tolaria.train.loss",
        "tolaria.val.loss",
        "tolaria.train.throughput",
        "tolaria.optim.lr",
        "tolaria.grad_agg.conflict_ratio",
        "tolaria.grad_agg.conflicts",
        "tolaria.grad_agg.cosine_min",
        "tolaria.grad_agg.latency_ms",
    ):
        assert expected in names


@pytest.mark.parametrize(("aggregator", "weights"), [("sum", None), ("mean", None), ("weighted", (3.0, 1.0))])
def test_summed_steps_match_per_objective_steps(aggregator: str, weights: tuple[float, ...] | None) -> None:
    """One backward of the weighted loss sum gives the update the aggregator gives."""
    every_step = make_trainer(
        TrainerConfig(epochs=2, aggregator=aggregator, weights=weights, stats_every=1, device="cpu")
    )
    summed = make_trainer(
        TrainerConfig(epochs=2, aggregator=aggregator, weights=weights, stats_every=1000, device="cpu")
    )
    every_step.fit()
    result = summed.fit()
    for (name, expected), (_, actual) in zip(
        every_step.model.named_parameters(), summed.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(actual, expected, msg=name, rtol=1e-5, atol=1e-6)
    # Only step 0 computed statistics, so the epoch means come from it alone or are NaN.
    assert math.isnan(result.epochs[1].aggregation["conflict_ratio"])


def test_pcgrad_ignores_stats_every() -> None:
    trainer = make_trainer(TrainerConfig(epochs=1, aggregator="pcgrad", stats_every=1000, device="cpu"))
    result = trainer.fit()
    assert math.isfinite(result.epochs[0].aggregation["conflict_ratio"])


def test_bf16_autocast_trains_on_cpu() -> None:
    trainer = make_trainer(TrainerConfig(epochs=4, amp="bf16", device="cpu"))
    with trainer:
        result = trainer.fit()
    for name in ("a", "b"):
        assert result.epochs[-1].train_loss[name] < result.epochs[0].train_loss[name]


def test_fp16_without_cuda_rejected() -> None:
    with pytest.raises(ValueError, match=r"amp 'fp16' needs a CUDA device, got cpu; use amp 'bf16' or 'off'"):
        make_trainer(TrainerConfig(epochs=1, amp="fp16", device="cpu"))


def test_gradient_clipping_bounds_the_update() -> None:
    """With SGD (lr 1) the parameter change equals the clipped gradient, whose norm is at most the limit."""
    torch.manual_seed(0)
    model = TwoHeadNet()
    x, y_a, y_b = (tensor[:32] * 100 for tensor in regression_data())
    before = torch.cat([parameter.detach().flatten().clone() for parameter in model.parameters()])
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        regression_objectives,
        [(x, y_a, y_b)],
        config=TrainerConfig(epochs=1, aggregator="sum", grad_clip_norm=0.5, device="cpu"),
    )
    with trainer:
        trainer.fit()
    after = torch.cat([parameter.detach().flatten() for parameter in model.parameters()])
    change = torch.linalg.vector_norm(after - before)
    assert change <= 0.5 + 1e-5
    assert change > 0.4


def test_state_dict_round_trip_continues_exactly(tmp_path: Path) -> None:
    """A state saved after epoch 1 and loaded into a new trainer gives the uninterrupted run's steps."""
    uninterrupted_losses: list[torch.Tensor] = []
    with make_trainer(
        TrainerConfig(epochs=2, device="cpu"), step_callbacks=[lambda r: uninterrupted_losses.append(r.losses.clone())]
    ) as trainer:
        trainer.fit()

    with make_trainer(TrainerConfig(epochs=1, device="cpu")) as first:
        first.fit()
        torch.save(first.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    resumed_losses: list[torch.Tensor] = []
    with make_trainer(
        TrainerConfig(epochs=2, device="cpu"), step_callbacks=[lambda r: resumed_losses.append(r.losses.clone())]
    ) as second:
        second.load_state_dict(state)
        assert second.global_step == first.global_step
        second.fit()
    assert len(resumed_losses) == len(uninterrupted_losses) - first.global_step
    for expected, actual in zip(uninterrupted_losses[first.global_step :], resumed_losses, strict=True):
        assert torch.equal(expected, actual)


def test_heads_are_exclusive_and_trunk_shared() -> None:
    trainer = make_trainer(TrainerConfig(epochs=1, device="cpu"))
    with trainer:
        trainer.fit()
    usage = trainer.runner._usage
    assert usage is not None
    assert usage["trunk.0.weight"] == (True, True)
    assert usage["head_a.weight"] == (True, False)
    assert usage["head_b.bias"] == (False, True)


def test_exclusive_head_unchanged_under_conflict() -> None:
    """With conflicting objectives PCGrad changes the trunk's gradient but never a head's."""
    torch.manual_seed(0)
    model = TwoHeadNet()
    with torch.no_grad():
        # Equal, near-zero heads and opposite targets make the trunk gradients conflict.
        model.head_a.weight.mul_(0.01)
        model.head_a.bias.zero_()
        model.head_b.weight.copy_(model.head_a.weight)
        model.head_b.bias.zero_()
    x = torch.randn(32, 4)
    target = x[:, 0]
    batch = (x, target, -target)
    expected = torch.autograd.grad(regression_objectives(model, batch)["a"], list(model.head_a.parameters()))
    before = [parameter.detach().clone() for parameter in model.head_a.parameters()]
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        regression_objectives,
        [batch],
        config=TrainerConfig(epochs=1, aggregator="pcgrad", device="cpu"),
    )
    with trainer:
        result = trainer.fit()
    assert result.epochs[0].aggregation["conflicts"] >= 1
    for old, new, grad in zip(before, model.head_a.parameters(), expected, strict=True):
        torch.testing.assert_close(new.detach(), old - 0.1 * grad)


def test_state_dict_carries_emergency_state() -> None:
    from tolaria.functional.emergency import Level

    with make_trainer(TrainerConfig(epochs=1, device="cpu")) as first:
        first.fit()
        first.guard.emergency.escalate(Level.ELEVATED, reason="test trouble", step=first.global_step)
        state = first.state_dict()
    with make_trainer(TrainerConfig(epochs=1, device="cpu")) as second:
        second.load_state_dict(state)
        assert second.guard.emergency.level == Level.ELEVATED
        assert second.guard.emergency.state.reason == "test trouble"
        assert second.guard.emergency.max_level == Level.ELEVATED
