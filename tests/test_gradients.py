"""Per-objective gradients: batched and loop methods agree, and auto mode falls back loudly."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from tolaria import Trainer, TrainerConfig
from tolaria.data import EpochBatches
from tolaria.gradients import GradientComputer, objective_usage, per_objective_gradients
from tolaria.telemetry import InMemorySink, Telemetry


class HostReadSquare(torch.autograd.Function):
    """``x * x`` whose backward reads a value on the host, which has no batching rule under vmap."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = float(grad.abs().max()) + 1.0
        return 2 * x * grad * (scale / scale)


class HostReadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = HostReadSquare.apply(self.trunk(x))
        return self.head_a(shared).squeeze(-1), self.head_b(shared).squeeze(-1)


def objectives(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> Mapping[str, torch.Tensor]:
    x, y = batch
    out_a, out_b = model(x)
    return {"a": nn.functional.mse_loss(out_a, y), "b": nn.functional.mse_loss(out_b, -y)}


def loss_terms_and_parameters() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    head_a, head_b = nn.Linear(4, 1), nn.Linear(4, 1)
    x = torch.randn(5, 3)
    shared = model(x)
    terms = [head_a(shared).pow(2).mean(), head_b(shared).abs().mean()]
    return terms, [*model.parameters(), *head_a.parameters(), *head_b.parameters()]


def test_batched_and_loop_methods_agree() -> None:
    terms, parameters = loss_terms_and_parameters()
    losses = torch.stack(terms)
    batched = per_objective_gradients(losses, parameters, batched=True, retain_graph=True)
    loop = per_objective_gradients(losses, parameters, batched=False)
    for row_batched, row_loop in zip(batched, loop, strict=True):
        assert row_batched is not None
        assert row_loop is not None
        torch.testing.assert_close(row_batched, row_loop)


def test_usage_marks_exclusive_heads() -> None:
    terms, parameters = loss_terms_and_parameters()
    usage = objective_usage(terms, parameters)
    assert usage[:2] == [(True, True), (True, True)]
    assert usage[2:4] == [(True, False), (True, False)]
    assert usage[4:] == [(False, True), (False, True)]


def test_auto_mode_falls_back_and_reports() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = x.sum(dim=1)
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    model = HostReadNet()
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        objectives,
        EpochBatches(x, y, batch_size=8, seed=0),
        config=TrainerConfig(epochs=1, aggregator="pcgrad", gradient_mode="auto", device="cpu"),
        telemetry=telemetry,
    )
    with trainer:
        result = trainer.fit()
    assert trainer.runner.gradients.method == "loop"
    assert result.global_step == 4
    assert telemetry.counters["tolaria.gradients.batched_fallbacks"] == 1
    events = sink.events("tolaria.gradients.batched_fallback")
    assert len(events) == 1
    assert "aten::item" in events[0].attributes["message"]


def test_batched_mode_raises_without_fallback() -> None:
    torch.manual_seed(0)
    model = HostReadNet()
    losses = torch.stack(list(objectives(model, (torch.randn(4, 4), torch.randn(4))).values()))
    computer = GradientComputer("batched")
    with pytest.raises(RuntimeError, match="Batching rule not implemented"):
        computer(losses, list(model.parameters()))


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ValueError, match="gradient mode 'fast' is not one of 'auto', 'batched', 'loop'"):
        GradientComputer("fast")
