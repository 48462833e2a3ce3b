"""Properties of the aggregators and of ravel/unravel over generated gradient pytrees."""

from __future__ import annotations

from typing import Any
from unittest import mock

import optree
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tolaria.functional import _columns
from tolaria.functional.aggregation import (
    mean_grads,
    pcgrad,
    pcgrad_orders,
    ravel_pytree,
    sum_grads,
    unravel_pytree,
    weighted,
)
from tolaria.testing import (
    LeafSpec,
    float_dtypes,
    gradient_sets,
    leaf_shapes,
    pcgrad_reference,
    pytrees,
    tree_templates,
)

FLOAT64_TREES = tree_templates(st.builds(LeafSpec, leaf_shapes(), st.just(torch.float64)))
SEEDS = st.integers(min_value=0, max_value=2**32)
NONNEGATIVE = st.floats(min_value=0.0, max_value=8.0, allow_subnormal=False, width=16)


def _flat(tree: Any) -> torch.Tensor:
    """Ravel one gradient pytree to float64, with None leaves as nothing (they are zeros of no length here)."""
    leaves = [leaf.double().reshape(-1) for leaf in optree.tree_leaves(tree)]
    return torch.cat(leaves) if leaves else torch.zeros(0, dtype=torch.float64)


def _has_tensor(grads: list[Any]) -> bool:
    return any(leaf is not None for tree in grads for leaf in optree.tree_leaves(tree))


def _assert_trees_close(first: Any, second: Any, tolerance: float) -> None:
    first_leaves, first_spec = optree.tree_flatten(first, none_is_leaf=True)
    second_leaves, second_spec = optree.tree_flatten(second, none_is_leaf=True)
    assert first_spec == second_spec
    for left, right in zip(first_leaves, second_leaves, strict=True):
        if left is None or right is None:
            assert left is None
            assert right is None
            continue
        torch.testing.assert_close(left, right, rtol=tolerance, atol=tolerance)


@given(gradient_sets(st.integers(2, 5), FLOAT64_TREES), SEEDS)
def test_pcgrad_matches_loop_reference(grads: list[Any], seed: int) -> None:
    orders = pcgrad_orders(len(grads), seed)
    expected = pcgrad_reference([_flat(tree) for tree in grads], orders)

    result = pcgrad(grads, orders=orders)

    torch.testing.assert_close(_flat(result.grad), expected, rtol=1e-9, atol=1e-9)


@given(gradient_sets(st.integers(2, 5), FLOAT64_TREES), SEEDS)
def test_leaves_in_place_match_loop_reference(grads: list[Any], seed: int) -> None:
    # With the size thresholds at one element, every non-empty leaf of these small trees is used in place.
    orders = pcgrad_orders(len(grads), seed)
    expected = pcgrad_reference([_flat(tree) for tree in grads], orders)

    with mock.patch.object(_columns, "MIN_NUMEL", 1), mock.patch.object(_columns, "NUMEL_PER_OBJECTIVE", 0):
        result = pcgrad(grads, orders=orders)

    torch.testing.assert_close(_flat(result.grad), expected, rtol=1e-9, atol=1e-9)


@given(gradient_sets(st.integers(1, 5), elements=NONNEGATIVE), SEEDS)
def test_pcgrad_without_conflicts_equals_sum(grads: list[Any], seed: int) -> None:
    # With non-negative entries every inner product is >= 0, so no pair conflicts.
    result = pcgrad(grads, seed=seed)
    summed = sum_grads(grads)

    assert result.stats.conflicts.item() == 0
    _assert_trees_close(result.grad, summed.grad, tolerance=0.0)


@given(gradient_sets(2, FLOAT64_TREES), SEEDS)
def test_pcgrad_two_objectives_agree_with_both(grads: list[Any], seed: int) -> None:
    result = _flat(pcgrad(grads, seed=seed).grad)

    for original in (_flat(tree) for tree in grads):
        # <g, g_k> >= 0 up to rounding, relative to the sizes involved.
        slack = 1e-9 * float(result.norm() * original.norm()) + 1e-12
        assert float(torch.dot(result, original)) >= -slack


@given(gradient_sets(st.integers(2, 5), FLOAT64_TREES), SEEDS, st.floats(min_value=1e-3, max_value=1e3))
def test_pcgrad_positive_scaling_scales_result(grads: list[Any], seed: int, factor: float) -> None:
    scaled = [optree.tree_map(lambda leaf: leaf * factor, tree) for tree in grads]

    base = _flat(pcgrad(grads, seed=seed).grad)
    result = _flat(pcgrad(scaled, seed=seed).grad)

    torch.testing.assert_close(result, base * factor, rtol=1e-8, atol=1e-9 * factor)


@given(gradient_sets(st.integers(2, 5), FLOAT64_TREES), SEEDS, st.randoms(use_true_random=False))
def test_pcgrad_permuting_objectives_and_orders_changes_nothing(grads: list[Any], seed: int, rng: Any) -> None:
    count = len(grads)
    orders = pcgrad_orders(count, seed)
    permutation = list(range(count))
    rng.shuffle(permutation)  # new objective a is old objective permutation[a]
    inverse = {old: new for new, old in enumerate(permutation)}
    permuted_grads = [grads[old] for old in permutation]
    permuted_orders = torch.tensor([[inverse[j] for j in orders[old].tolist()] for old in permutation])

    result = pcgrad(grads, orders=orders)
    permuted = pcgrad(permuted_grads, orders=permuted_orders)

    _assert_trees_close(permuted.grad, result.grad, tolerance=1e-9)
    torch.testing.assert_close(permuted.stats.weights, result.stats.weights[permutation], rtol=1e-9, atol=1e-9)


@given(gradient_sets(st.integers(1, 5), FLOAT64_TREES), st.floats(min_value=1e-3, max_value=1e3))
def test_weighted_with_equal_weights_equals_mean(grads: list[Any], value: float) -> None:
    result = weighted(grads, [value] * len(grads))
    mean = mean_grads(grads)

    _assert_trees_close(result.grad, mean.grad, tolerance=1e-12)


@given(
    gradient_sets(3, FLOAT64_TREES),
    st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=3, max_size=3),
    st.floats(min_value=1e-3, max_value=1e3),
)
def test_weighted_normalized_is_scale_invariant(grads: list[Any], weights: list[float], factor: float) -> None:
    assume(sum(weights) > 1e-3)

    base = weighted(grads, weights)
    scaled = weighted(grads, [weight * factor for weight in weights])

    _assert_trees_close(scaled.grad, base.grad, tolerance=1e-10)
    torch.testing.assert_close(scaled.stats.weights, base.stats.weights, rtol=1e-10, atol=1e-12)


@given(pytrees(none_leaves=True))
def test_ravel_unravel_round_trip(tree: Any) -> None:
    assume(any(leaf is not None for leaf in optree.tree_leaves(tree)))

    flat, spec = ravel_pytree(tree)
    restored = unravel_pytree(flat, spec)

    assert flat.dim() == 1
    assert flat.numel() == sum(leaf.numel() for leaf in optree.tree_leaves(tree))
    original_leaves, original_spec = optree.tree_flatten(tree, none_is_leaf=True)
    restored_leaves, restored_spec = optree.tree_flatten(restored, none_is_leaf=True)
    assert restored_spec == original_spec
    for original, back in zip(original_leaves, restored_leaves, strict=True):
        if original is None:
            assert back is None
            continue
        assert back.dtype == original.dtype
        assert back.shape == original.shape
        assert torch.equal(back, original)


@given(
    gradient_sets(st.integers(1, 4), none_leaves=True), SEEDS, st.sampled_from(["pcgrad", "weighted", "sum", "mean"])
)
def test_aggregators_preserve_structure_and_dtypes(grads: list[Any], seed: int, name: str) -> None:
    assume(_has_tensor(grads))
    count = len(grads)
    if name == "pcgrad":
        result = pcgrad(grads, seed=seed)
    elif name == "weighted":
        result = weighted(grads, [1.0 + k for k in range(count)])
    else:
        result = (sum_grads if name == "sum" else mean_grads)(grads)

    _, spec = optree.tree_flatten(grads[0], none_is_leaf=True)
    result_leaves, result_spec = optree.tree_flatten(result.grad, none_is_leaf=True)
    assert result_spec == spec
    columns = zip(*(optree.tree_leaves(tree, none_is_leaf=True) for tree in grads), strict=True)
    for leaf, column in zip(result_leaves, columns, strict=True):
        present = [entry for entry in column if entry is not None]
        if not present:
            assert leaf is None
            continue
        assert leaf.dtype == present[0].dtype
        assert leaf.shape == present[0].shape
        assert torch.isfinite(leaf).all()


@given(st.integers(1, 4), float_dtypes(), SEEDS, st.data())
def test_stacked_form_matches_sequence_form(count: int, dtype: torch.dtype, seed: int, data: st.DataObject) -> None:
    template = tree_templates(st.builds(LeafSpec, leaf_shapes(), st.just(dtype)))
    grads = data.draw(gradient_sets(count, template))
    stacked = optree.tree_map(lambda *leaves: torch.stack(leaves), grads[0], *grads[1:])

    from_stacked = pcgrad(stacked, seed=seed, stacked=True)
    from_sequence = pcgrad(grads, seed=seed)

    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    _assert_trees_close(from_stacked.grad, from_sequence.grad, tolerance)
    torch.testing.assert_close(from_stacked.stats.norms, from_sequence.stats.norms, rtol=1e-5, atol=1e-6)
