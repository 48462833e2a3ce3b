"""Aggregator inputs: every invalid input fails fast with a clear message; None and empty leaves work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tolaria.functional.aggregation import (
    AGGREGATOR_NAMES,
    get,
    mean_grads,
    pcgrad,
    pcgrad_orders,
    sum_grads,
    weighted,
)


def _pcgrad(grads: Any, **options: Any) -> Any:
    return pcgrad(grads, seed=0, **options)


def _weighted(grads: Any, **options: Any) -> Any:
    count = grads[next(iter(grads))].shape[0] if options.get("stacked") else len(grads)
    return weighted(grads, [1.0] * max(count, 1), **options)


AGGREGATORS: dict[str, Callable[..., Any]] = {
    "pcgrad": _pcgrad,
    "weighted": _weighted,
    "sum": sum_grads,
    "mean": mean_grads,
}

each_aggregator = pytest.mark.parametrize("aggregate", list(AGGREGATORS.values()), ids=list(AGGREGATORS))


@each_aggregator
def test_empty_sequence_is_rejected(aggregate: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="no gradients to aggregate: grads is empty"):
        aggregate([])


@each_aggregator
def test_single_tensor_is_rejected(aggregate: Callable[..., Any]) -> None:
    with pytest.raises(TypeError, match=r"grads is a single tensor of shape \(2, 3\).*stacked=True"):
        aggregate(torch.ones(2, 3))


def test_non_sequence_is_rejected() -> None:
    with pytest.raises(TypeError, match="grads is a dict; expected a sequence"):
        sum_grads({"a": torch.ones(2)})


@each_aggregator
def test_structure_mismatch_names_key_path(aggregate: Callable[..., Any]) -> None:
    grads = [{"a": torch.ones(2), "b": torch.ones(3)}, {"a": torch.ones(2)}]

    with pytest.raises(ValueError, match=r"gradient 1 has a different pytree structure") as caught:
        aggregate(grads)

    message = str(caught.value)
    assert "key path ['b'] is in gradient 0 but missing from gradient 1" in message
    assert "Structure of gradient 0: PyTreeSpec" in message
    assert "Structure of gradient 1: PyTreeSpec" in message


def test_structure_mismatch_extra_key() -> None:
    grads = [{"a": torch.ones(2)}, {"a": torch.ones(2), "c": torch.ones(1)}]
    with pytest.raises(ValueError, match=r"key path \['c'\] is in gradient 1 but missing from gradient 0"):
        sum_grads(grads)


def test_structure_mismatch_container_type() -> None:
    grads = [[torch.ones(2)], (torch.ones(2),)]
    with pytest.raises(ValueError, match="the key paths are the same but the container types differ"):
        sum_grads(grads)


@each_aggregator
def test_dtype_mismatch_names_key_path(aggregate: Callable[..., Any]) -> None:
    grads = [{"w": [torch.ones(2)]}, {"w": [torch.ones(2, dtype=torch.float64)]}]
    with pytest.raises(
        ValueError,
        match=r"key path \['w'\]\[0\] has dtype torch.float64 in gradient 1 but dtype torch.float32 in gradient 0",
    ):
        aggregate(grads)


@each_aggregator
def test_device_mismatch_names_key_path(aggregate: Callable[..., Any]) -> None:
    # A meta tensor has a device of its own and no data, so the check must fire before any arithmetic.
    grads = [{"w": torch.ones(2)}, {"w": torch.empty(2, device="meta")}]
    with pytest.raises(ValueError, match=r"leaf at key path \['w'\] has device meta in gradient 1 but device cpu"):
        aggregate(grads)


def test_shape_mismatch_names_key_path() -> None:
    grads = [{"w": torch.ones(2, 3)}, {"w": torch.ones(3, 2)}]
    with pytest.raises(ValueError, match=r"\['w'\] has shape torch.Size\(\[3, 2\]\) in gradient 1"):
        pcgrad(grads, seed=0)


@each_aggregator
def test_integer_leaf_is_rejected(aggregate: Callable[..., Any]) -> None:
    grads = [{"w": torch.ones(2), "step": torch.tensor(3)}, {"w": torch.ones(2), "step": torch.tensor(3)}]
    with pytest.raises(TypeError, match=r"gradient 0 has a tensor of dtype torch.int64 at key path \['step'\]"):
        aggregate(grads)


@pytest.mark.parametrize(
    "leaf",
    [np.ones(2, dtype=np.float32), 1.5, torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.bool)],
    ids=["numpy", "float", "complex", "bool"],
)
def test_non_floating_tensor_leaf_is_rejected(leaf: object) -> None:
    with pytest.raises(TypeError, match=r"at key path \['w'\]; expected a floating-point torch.Tensor"):
        sum_grads([{"w": leaf}, {"w": leaf}])


def test_all_none_gradients_are_rejected() -> None:
    with pytest.raises(ValueError, match="every leaf of every gradient is None"):
        pcgrad([{"w": None}, {"w": None}], seed=0)


def test_stacked_zero_dim_leaf_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"0-d tensor at key path \['b'\]; with stacked=True"):
        sum_grads({"a": torch.ones(2, 3), "b": torch.tensor(1.0)}, stacked=True)


def test_stacked_objective_count_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"has 3 objectives at key path \['b'\] but 2 at \['a'\]"):
        pcgrad({"a": torch.ones(2, 4), "b": torch.ones(3, 4)}, seed=0, stacked=True)


def test_stacked_without_tensors_is_rejected() -> None:
    with pytest.raises(ValueError, match="the stacked gradient has no tensor leaves"):
        mean_grads({"a": None}, stacked=True)


def test_stacked_zero_objectives_is_rejected() -> None:
    with pytest.raises(ValueError, match="leading objective axis has length 0"):
        sum_grads({"a": torch.ones(0, 4)}, stacked=True)


def test_stacked_checks_survive_caching() -> None:
    # Stacked validation is cached by leaf metadata: a repeated invalid tree must raise every time,
    # and an integer leaf must not pass because a float leaf of the same shape was accepted.
    for _ in range(2):
        with pytest.raises(ValueError, match=r"has 3 objectives at key path \['b'\]"):
            sum_grads({"a": torch.ones(2, 4), "b": torch.ones(3, 4)}, stacked=True)
    assert sum_grads({"w": torch.ones(2, 4)}, stacked=True).grad["w"].tolist() == [2.0] * 4
    with pytest.raises(TypeError, match=r"a tensor of dtype torch.int64 at key path \['w'\]"):
        sum_grads({"w": torch.ones(2, 4, dtype=torch.int64)}, stacked=True)
    with pytest.raises(TypeError, match=r"a float at key path \['w'\]"):
        sum_grads({"w": 1.5}, stacked=True)


def test_pcgrad_needs_seed_or_orders() -> None:
    with pytest.raises(ValueError, match="pcgrad needs explicit randomness: pass seed=<int>"):
        pcgrad([torch.ones(2), torch.ones(2)])


def test_pcgrad_rejects_seed_and_orders() -> None:
    with pytest.raises(ValueError, match="pcgrad got both seed and orders"):
        pcgrad([torch.ones(2), torch.ones(2)], seed=1, orders=pcgrad_orders(2, 1))


@pytest.mark.parametrize(
    ("seed", "error", "pattern"),
    [
        (True, TypeError, "seed=True is a bool; expected an int"),
        (1.5, TypeError, "seed=1.5 is a float; expected an int"),
        (-1, ValueError, "seed=-1 is out of range"),
        (2**64, ValueError, "seed=18446744073709551616 is out of range"),
    ],
)
def test_pcgrad_rejects_bad_seed(seed: object, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        pcgrad([torch.ones(2), torch.ones(2)], seed=seed)  # type: ignore[arg-type]


def test_pcgrad_orders_rejects_bad_count() -> None:
    with pytest.raises(ValueError, match="count=0 is invalid; expected the number of objectives"):
        pcgrad_orders(0, 1)


def test_pcgrad_rejects_orders_of_wrong_dtype() -> None:
    with pytest.raises(TypeError, match=r"orders is a tensor of dtype torch.int32; expected a torch.int64 tensor"):
        pcgrad([torch.ones(2), torch.ones(2)], orders=torch.tensor([[1], [0]], dtype=torch.int32))


def test_pcgrad_rejects_orders_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"orders is a list; expected a torch\.int64 tensor"):
        pcgrad([torch.ones(2), torch.ones(2)], orders=[[1], [0]])  # type: ignore[arg-type]


def test_pcgrad_rejects_orders_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"orders has shape \(2, 2\); expected \[n, n - 1\] = \[2, 1\]"):
        pcgrad([torch.ones(2), torch.ones(2)], orders=torch.tensor([[0, 1], [1, 0]]))


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([[0, 1], [0, 2], [0, 1]], r"orders row 0 is \[0, 1\]; expected a permutation of \[1, 2\]"),
        ([[1, 2], [2, 2], [0, 1]], r"orders row 1 is \[2, 2\]; expected a permutation of \[0, 2\]"),
        ([[1, 2], [0, 2], [0, 5]], r"orders row 2 is \[0, 5\]; expected a permutation of \[0, 1\]"),
    ],
    ids=["visits-itself", "duplicate", "out-of-range"],
)
def test_pcgrad_rejects_orders_that_are_not_permutations(rows: list[list[int]], pattern: str) -> None:
    grads = [torch.ones(2), torch.ones(2), torch.ones(2)]
    with pytest.raises(ValueError, match=pattern):
        pcgrad(grads, orders=torch.tensor(rows))


def test_pcgrad_rejects_bad_reduction() -> None:
    with pytest.raises(ValueError, match="reduction='max' is invalid; expected 'sum' or 'mean'"):
        pcgrad([torch.ones(2), torch.ones(2)], seed=0, reduction="max")


@pytest.mark.parametrize("eps", [-0.1, 1.0, float("nan"), True])
def test_pcgrad_rejects_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match=r"eps=.* is invalid; expected a number in \[0, 1\)"):
        pcgrad([torch.ones(2), torch.ones(2)], seed=0, eps=eps)


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        ([1.0], r"weights has shape \(1,\); expected a 1-D sequence or tensor with one weight per objective, length 2"),
        (torch.ones(2, 1), r"weights has shape \(2, 1\)"),
        ([1.0, -0.5], r"weights=\[1.0, -0.5\] contains -0.5; every weight must be finite and non-negative"),
        ([1.0, float("nan")], r"contains nan; every weight must be finite"),
        (torch.tensor([float("inf"), 1.0]), r"contains inf; every weight must be finite"),
        ([0.0, 0.0], r"weights=\[0.0, 0.0\] sum to 0, so they cannot be normalized"),
    ],
    ids=["short", "2-d", "negative", "nan", "inf", "zero-sum"],
)
def test_weighted_rejects_bad_weights(weights: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        weighted([torch.ones(2), torch.ones(2)], weights)


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [
        ("ab", "weights is a str; expected a sequence of numbers or a 1-D tensor"),
        ([1.0, "x"], "weights contains 'x'; expected real numbers"),
        ([True, 1.0], "weights contains True; expected real numbers"),
        (torch.tensor([True, False]), "weights is a tensor of dtype torch.bool"),
    ],
)
def test_weighted_rejects_bad_weight_types(weights: object, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        weighted([torch.ones(2), torch.ones(2)], weights)


def test_weighted_zero_sum_allowed_without_normalization() -> None:
    result = weighted([torch.ones(2), torch.ones(2)], [0.0, 0.0], normalize=False)
    torch.testing.assert_close(result.grad, torch.zeros(2))


def test_get_returns_each_aggregator() -> None:
    assert get("sum") is sum_grads
    assert get("mean") is mean_grads
    assert get("weighted") is weighted
    assert get("pcgrad") is pcgrad
    assert set(AGGREGATOR_NAMES) == {"sum", "mean", "weighted", "pcgrad"}


def test_get_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'pcgard'; expected one of sum, mean, weighted, pcgrad"):
        get("pcgard")


@each_aggregator
def test_none_leaf_counts_as_zeros(aggregate: Callable[..., Any]) -> None:
    with_none = [{"w": torch.tensor([1.0, -2.0]), "b": None}, {"w": torch.tensor([-1.0, 0.5]), "b": torch.ones(3)}]
    with_zeros = [{"w": with_none[0]["w"], "b": torch.zeros(3)}, with_none[1]]

    expected = aggregate(with_zeros)
    result = aggregate(with_none)

    torch.testing.assert_close(result.grad["w"], expected.grad["w"])
    torch.testing.assert_close(result.grad["b"], expected.grad["b"])
    torch.testing.assert_close(result.stats.cosine, expected.stats.cosine)


@each_aggregator
def test_leaf_none_everywhere_stays_none(aggregate: Callable[..., Any]) -> None:
    grads = [{"w": torch.ones(2), "frozen": None}, {"w": torch.ones(2), "frozen": None}]

    result = aggregate(grads)

    assert result.grad["frozen"] is None
    torch.testing.assert_close(result.grad["w"], aggregate([{"w": torch.ones(2)}, {"w": torch.ones(2)}]).grad["w"])


def test_stacked_none_leaf_stays_none() -> None:
    result = pcgrad({"w": torch.randn(3, 2), "frozen": None}, seed=0, stacked=True)
    assert result.grad["frozen"] is None
    assert result.grad["w"].shape == (2,)


@each_aggregator
def test_zero_element_leaves_are_valid(aggregate: Callable[..., Any]) -> None:
    grads = [
        {"w": torch.tensor([1.0, -1.0]), "empty": torch.ones(0, 3)},
        {"w": torch.tensor([-1.0, 0.0]), "empty": torch.ones(0, 3)},
    ]

    result = aggregate(grads)

    assert result.grad["empty"].shape == (0, 3)
    assert torch.isfinite(result.grad["w"]).all()


def test_only_zero_element_leaves_give_zero_stats() -> None:
    result = pcgrad([{"empty": torch.ones(0)}, {"empty": torch.ones(0)}], seed=0)

    assert result.grad["empty"].shape == (0,)
    torch.testing.assert_close(result.stats.norms, torch.zeros(2))
    torch.testing.assert_close(result.stats.cosine, torch.zeros(2, 2))
    assert not result.stats.precision_loss.item()


def test_root_tensor_gradients() -> None:
    # A pytree may be a bare tensor: the result is a bare tensor too.
    result = mean_grads([torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])])
    torch.testing.assert_close(result.grad, torch.tensor([2.0, 2.0]))


def test_tuple_and_namedtuple_structures_are_kept() -> None:
    from typing import NamedTuple

    class Pair(NamedTuple):
        first: torch.Tensor
        second: tuple[torch.Tensor, ...]

    grads = [Pair(torch.ones(2), (torch.ones(1),)), Pair(torch.ones(2), (torch.zeros(1),))]

    result = sum_grads(grads)

    assert isinstance(result.grad, Pair)
    assert isinstance(result.grad.second, tuple)
    torch.testing.assert_close(result.grad.second[0], torch.ones(1))
