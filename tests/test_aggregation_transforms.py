"""Aggregators under torch.vmap and torch.compile(fullgraph=True), and on torch.func.jacrev output."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.func import functional_call, jacrev

from tolaria.functional.aggregation import mean_grads, pcgrad, pcgrad_orders, sum_grads, weighted


def _batch_of_gradient_sets(batch: int, count: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(21)
    return {
        "weight": torch.randn(batch, count, 3, 2, generator=generator),
        "bias": torch.randn(batch, count, 2, generator=generator),
    }


def test_pcgrad_under_vmap_stacked() -> None:
    batch = _batch_of_gradient_sets(5, 4)
    orders = pcgrad_orders(4, 3)

    mapped = torch.vmap(lambda stacked: pcgrad(stacked, orders=orders, stacked=True))(batch)

    for index in range(5):
        single = pcgrad({name: leaf[index] for name, leaf in batch.items()}, orders=orders, stacked=True)
        torch.testing.assert_close(mapped.grad["weight"][index], single.grad["weight"])
        torch.testing.assert_close(mapped.grad["bias"][index], single.grad["bias"])
        torch.testing.assert_close(mapped.stats.cosine[index], single.stats.cosine)
        assert mapped.stats.conflicts[index].item() == single.stats.conflicts.item()


def test_pcgrad_under_vmap_sequence_with_rescale() -> None:
    batch = _batch_of_gradient_sets(3, 3)
    orders = pcgrad_orders(3, 9)

    def aggregate(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        trees = [{"weight": weight[k], "bias": bias[k]} for k in range(3)]
        return pcgrad(trees, orders=orders, rescale=True).grad["weight"]

    mapped = torch.vmap(aggregate)(batch["weight"], batch["bias"])

    for index in range(3):
        torch.testing.assert_close(mapped[index], aggregate(batch["weight"][index], batch["bias"][index]))


def test_other_aggregators_under_vmap() -> None:
    batch = _batch_of_gradient_sets(4, 3)
    weights = torch.tensor([1.0, 2.0, 3.0])

    for aggregate in (
        lambda stacked: sum_grads(stacked, stacked=True),
        lambda stacked: mean_grads(stacked, stacked=True),
        lambda stacked: weighted(stacked, weights, stacked=True),
    ):
        mapped = torch.vmap(aggregate)(batch)
        for index in range(4):
            single = aggregate({name: leaf[index] for name, leaf in batch.items()})
            torch.testing.assert_close(mapped.grad["weight"][index], single.grad["weight"])


def _inductor_available() -> bool:
    return shutil.which("g++") is not None or shutil.which("c++") is not None


# torch's own modules warn about their deprecated internals while Inductor imports and lowers.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch", "ignore::FutureWarning:torch")
@pytest.mark.skipif(not _inductor_available(), reason="torch.compile's Inductor backend needs a C++ compiler on PATH")
def test_pcgrad_compiles_with_fullgraph() -> None:
    trees = [{"weight": torch.randn(4, 3), "bias": torch.randn(3), "frozen": None} for _ in range(3)]
    trees[1]["weight"] = -trees[0]["weight"]  # conflicting pair
    compiled = torch.compile(lambda grads, orders: pcgrad(grads, orders=orders), fullgraph=True)

    for seed in (0, 1):
        orders = pcgrad_orders(3, seed)
        result = compiled(trees, orders)
        expected = pcgrad(trees, orders=orders)
        torch.testing.assert_close(result.grad["weight"], expected.grad["weight"])
        torch.testing.assert_close(result.grad["bias"], expected.grad["bias"])
        assert result.grad["frozen"] is None
        assert result.stats.conflicts.item() == expected.stats.conflicts.item()
        assert result.stats.precision_loss.item() is False


def _two_objective_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    inputs = torch.randn(16, 4)
    targets = torch.randn(16, 2)
    return model, inputs, targets


def test_pcgrad_on_jacrev_output_matches_autograd() -> None:
    model, inputs, targets = _two_objective_model()
    params = {name: param.detach() for name, param in model.named_parameters()}

    def losses(parameters: dict[str, torch.Tensor]) -> torch.Tensor:
        output = functional_call(model, parameters, (inputs,))
        return ((output - targets) ** 2).mean(dim=0)  # one loss per output column: [2]

    jacobian = jacrev(losses)(params)  # every leaf has shape [2, *parameter_shape]
    orders = pcgrad_orders(2, 0)
    from_jacobian = pcgrad(jacobian, orders=orders, stacked=True)

    per_objective = []
    for index in range(2):
        model.zero_grad()
        loss = ((model(inputs) - targets) ** 2).mean(dim=0)[index]
        per_objective.append(dict(zip(params, torch.autograd.grad(loss, list(model.parameters())), strict=True)))
    from_autograd = pcgrad(per_objective, orders=orders)

    for name, param in params.items():
        assert from_jacobian.grad[name].shape == param.shape
        torch.testing.assert_close(from_jacobian.grad[name], from_autograd.grad[name], rtol=1e-5, atol=1e-6)


def test_sum_of_batched_autograd_grads_matches_total_loss() -> None:
    model, inputs, targets = _two_objective_model()
    parameters = list(model.parameters())
    losses = ((model(inputs) - targets) ** 2).mean(dim=0)

    # is_grads_batched gives one gradient per row of the identity: a stacked gradient per parameter.
    rows = torch.autograd.grad(losses, parameters, grad_outputs=torch.eye(2), is_grads_batched=True, retain_graph=True)
    summed = sum_grads(list(rows), stacked=True)
    total = torch.autograd.grad(losses.sum(), parameters)

    for aggregated, expected in zip(summed.grad, total, strict=True):
        torch.testing.assert_close(aggregated, expected, rtol=1e-5, atol=1e-6)
