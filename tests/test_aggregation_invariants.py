"""Invariants every aggregator keeps, checked over a seeded set of hard inputs in both input forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch

from tolaria.functional.aggregation import Aggregate, mean_grads, pcgrad, sum_grads, weighted


def _pcgrad(grads: Any, count: int, **options: Any) -> Aggregate:
    return pcgrad(grads, seed=count, **options)


def _pcgrad_mean_rescaled(grads: Any, count: int, **options: Any) -> Aggregate:
    return pcgrad(grads, seed=count + 1, reduction="mean", rescale=True, **options)


def _weighted(grads: Any, count: int, **options: Any) -> Aggregate:
    return weighted(grads, torch.arange(1, count + 1, dtype=torch.float32), **options)


def _sum(grads: Any, count: int, **options: Any) -> Aggregate:
    return sum_grads(grads, **options)


def _mean(grads: Any, count: int, **options: Any) -> Aggregate:
    return mean_grads(grads, **options)


AGGREGATORS: dict[str, Callable[..., Aggregate]] = {
    "pcgrad": _pcgrad,
    "pcgrad-mean-rescaled": _pcgrad_mean_rescaled,
    "weighted": _weighted,
    "sum": _sum,
    "mean": _mean,
}


def _model_like(generator: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return {
        "conv": {
            "kernel": torch.randn(2, 3, 2, 2, generator=generator).to(dtype),
            "bias": torch.randn(2, generator=generator).to(dtype),
        },
        "scale": torch.randn((), generator=generator).to(dtype),
        "blocks": [torch.randn(3, generator=generator).to(dtype), (torch.randn(1, 4, generator=generator).to(dtype),)],
    }


def _case_random(generator: torch.Generator) -> list[Any]:
    return [_model_like(generator) for _ in range(4)]


def _case_zero_gradient(generator: torch.Generator) -> list[Any]:
    grads = [_model_like(generator) for _ in range(3)]
    grads[1] = optree.tree_map(torch.zeros_like, grads[1])
    return grads


def _case_antiparallel(generator: torch.Generator) -> list[Any]:
    first = _model_like(generator)
    return [first, optree.tree_map(lambda leaf: -2.0 * leaf, first), _model_like(generator)]


def _case_identical(generator: torch.Generator) -> list[Any]:
    first = _model_like(generator)
    return [first, optree.tree_map(torch.clone, first)]


def _case_scaled(generator: torch.Generator) -> list[Any]:
    return [optree.tree_map(lambda leaf, s=scale: leaf * s, _model_like(generator)) for scale in (1e3, 1e-3, 1.0)]


def _case_single(generator: torch.Generator) -> list[Any]:
    return [_model_like(generator)]


def _case_mixed_dtypes(generator: torch.Generator) -> list[Any]:
    grads = []
    for _ in range(3):
        tree = _model_like(generator)
        tree["conv"]["kernel"] = tree["conv"]["kernel"].to(torch.bfloat16)
        tree["scale"] = tree["scale"].to(torch.float64)
        grads.append(tree)
    return grads


def _case_half(generator: torch.Generator) -> list[Any]:
    return [_model_like(generator, torch.float16) for _ in range(3)]


def _case_none_and_empty(generator: torch.Generator) -> list[Any]:
    grads = [_model_like(generator) for _ in range(3)]
    for index, tree in enumerate(grads):
        tree["unused"] = None
        tree["empty"] = torch.ones(0, 2)
        if index == 1:
            tree["conv"]["bias"] = None
    return grads


CASES: dict[str, Callable[[torch.Generator], list[Any]]] = {
    "random": _case_random,
    "zero-gradient": _case_zero_gradient,
    "antiparallel": _case_antiparallel,
    "identical": _case_identical,
    "scaled": _case_scaled,
    "single": _case_single,
    "mixed-dtypes": _case_mixed_dtypes,
    "float16": _case_half,
    "none-and-empty": _case_none_and_empty,
}


def _stack(grads: list[Any]) -> Any:
    """Stack n trees into one tree with a leading objective axis (None leaves become zeros)."""

    def stack_leaf(*leaves: torch.Tensor | None) -> torch.Tensor | None:
        present = next((leaf for leaf in leaves if leaf is not None), None)
        if present is None:
            return None
        return torch.stack([torch.zeros_like(present) if leaf is None else leaf for leaf in leaves])

    return optree.tree_map(stack_leaf, grads[0], *grads[1:], none_is_leaf=True)


def assert_structure_preserved(result: Aggregate, reference: Any) -> None:
    """The result has the structure of one gradient, and each leaf its shape, dtype and device (None stays None)."""
    result_leaves, result_spec = optree.tree_flatten(result.grad, none_is_leaf=True)
    reference_leaves, reference_spec = optree.tree_flatten(reference, none_is_leaf=True)
    assert result_spec == reference_spec
    for got, expected in zip(result_leaves, reference_leaves, strict=True):
        if expected is None:
            assert got is None
            continue
        assert got.shape == expected.shape
        assert got.dtype == expected.dtype
        assert got.device == expected.device


def assert_finite(result: Aggregate) -> None:
    for leaf in optree.tree_leaves(result.grad):
        assert torch.isfinite(leaf).all()
    for name in ("conflict_ratio", "cosine", "norms", "weights"):
        assert torch.isfinite(getattr(result.stats, name)).all(), name


def assert_statistics_shaped(result: Aggregate, count: int, device: torch.device) -> None:
    stats = result.stats
    assert stats.conflicts.shape == ()
    assert stats.conflicts.dtype == torch.int64
    assert stats.conflict_ratio.shape == ()
    assert stats.cosine.shape == (count, count)
    assert stats.norms.shape == (count,)
    assert stats.weights.shape == (count,)
    assert stats.precision_loss.shape == ()
    assert stats.precision_loss.dtype == torch.bool
    for value in stats:
        assert value.device == device
    assert 0.0 <= stats.conflict_ratio.item() <= 1.0
    assert (stats.cosine.abs() <= 1.0).all()
    torch.testing.assert_close(stats.cosine, stats.cosine.T)


def assert_weights_reproduce_grad(result: Aggregate, grads: list[Any]) -> None:
    """grad equals sum_k weights[k] g_k, leaf by leaf, computed here in float64."""
    weights = result.stats.weights.double()
    flat = [optree.tree_leaves(tree, none_is_leaf=True) for tree in grads]
    for position, leaf in enumerate(optree.tree_leaves(result.grad, none_is_leaf=True)):
        if leaf is None:
            continue
        expected = sum(
            weights[k] * (flat[k][position].double() if flat[k][position] is not None else 0.0)
            for k in range(len(grads))
        )
        tolerance = 2e-2 if leaf.dtype in (torch.float16, torch.bfloat16) else 1e-4
        torch.testing.assert_close(
            leaf.double(), expected * torch.ones_like(leaf.double()), rtol=tolerance, atol=tolerance
        )


def _snapshot(grads: Any) -> list[tuple[torch.Tensor, int] | None]:
    return [
        None if leaf is None else (leaf.clone(), leaf._version) for leaf in optree.tree_leaves(grads, none_is_leaf=True)
    ]


def assert_unchanged(grads: Any, snapshot: list[tuple[torch.Tensor, int] | None]) -> None:
    for leaf, saved in zip(optree.tree_leaves(grads, none_is_leaf=True), snapshot, strict=True):
        if saved is None:
            assert leaf is None
            continue
        assert torch.equal(leaf, saved[0])
        assert leaf._version == saved[1], "an input tensor was modified in place"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("name", list(AGGREGATORS), ids=list(AGGREGATORS))
def test_aggregator_invariants_on_sequences(name: str, case: str) -> None:
    grads = CASES[case](torch.Generator().manual_seed(len(case)))
    snapshot = _snapshot(grads)

    result = AGGREGATORS[name](grads, len(grads))

    assert_unchanged(grads, snapshot)
    assert_structure_preserved(result, grads[0])
    assert_finite(result)
    assert_statistics_shaped(result, len(grads), torch.device("cpu"))
    assert_weights_reproduce_grad(result, grads)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("name", list(AGGREGATORS), ids=list(AGGREGATORS))
def test_aggregator_invariants_on_stacked_trees(name: str, case: str) -> None:
    grads = CASES[case](torch.Generator().manual_seed(len(case)))
    stacked = _stack(grads)
    snapshot = _snapshot(stacked)

    result = AGGREGATORS[name](stacked, len(grads), stacked=True)
    from_sequence = AGGREGATORS[name](grads, len(grads))

    assert_unchanged(stacked, snapshot)
    assert_structure_preserved(result, from_sequence.grad)
    assert_finite(result)
    assert_statistics_shaped(result, len(grads), torch.device("cpu"))
    for got, expected in zip(optree.tree_leaves(result.grad), optree.tree_leaves(from_sequence.grad), strict=True):
        tolerance = 2e-2 if got.dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", list(AGGREGATORS), ids=list(AGGREGATORS))
def test_aggregator_on_test_device(name: str, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    grads = [optree.tree_map(lambda leaf: leaf.to(device), _model_like(generator)) for _ in range(3)]

    result = AGGREGATORS[name](grads, 3)

    assert_structure_preserved(result, grads[0])
    assert_statistics_shaped(result, 3, grads[0]["scale"].device)
