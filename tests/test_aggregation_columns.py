"""Large leaves of a gradient sequence used in place on the host path, without the copy into blocks."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch

from tolaria.functional import _columns, _gram, _host_solver
from tolaria.functional.aggregation import pcgrad, pcgrad_orders, sum_grads, weighted
from tolaria.testing import pcgrad_reference

LARGE = 2 * _columns.NUMEL_PER_OBJECTIVE + 5
"""Two leaves of this size per objective are just enough to be used in place with up to four objectives."""


def _sequence(count: int, seed: int, dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """``count`` trees with two large leaves (one a 2-D kernel), a small bias and a frozen leaf."""
    generator = torch.Generator().manual_seed(seed)
    trees = []
    for _ in range(count):
        trees.append(
            {
                "kernel": torch.randn(LARGE, 1, generator=generator, dtype=dtype),
                "wide": torch.randn(LARGE, generator=generator, dtype=dtype),
                "bias": torch.randn(7, generator=generator, dtype=dtype),
                "frozen": None,
            }
        )
    # Objective 1 conflicts with objective 0, so PCGrad projects.
    for name in ("kernel", "wide", "bias"):
        trees[1][name] = -0.7 * trees[0][name] + 0.3 * trees[1][name]
    return trees


def _columns_of(trees: list[dict[str, Any]]) -> list[list[torch.Tensor | None]]:
    leaves = [optree.tree_leaves(tree, none_is_leaf=True) for tree in trees]
    return [list(column) for column in zip(*leaves, strict=True)]


def _flat(tree: Any) -> torch.Tensor:
    return torch.cat([leaf.reshape(-1).double() for leaf in optree.tree_leaves(tree)])


def test_large_leaves_are_used_in_place() -> None:
    trees = _sequence(2, 1)

    matrix = _gram.from_columns(_columns_of(trees), 2, rescale=False)

    # optree sorts dict keys: bias, frozen, kernel, wide.
    assert [column.slot.position for column in matrix.columns] == [2, 3]
    assert [slot.position for block in matrix.blocks for slot in block.slots] == [0]
    assert matrix.numel == 2 * LARGE + 7
    assert matrix.columns[1].rows[0].data_ptr() == trees[0]["wide"].data_ptr()


@pytest.mark.parametrize("count", [2, 3, 4])
def test_in_place_pcgrad_matches_reference(count: int) -> None:
    trees = _sequence(count, count, dtype=torch.float64)
    before = [optree.tree_map(torch.clone, tree) for tree in trees]
    orders = pcgrad_orders(count, 5)

    result = pcgrad(trees, orders=orders)

    expected = pcgrad_reference([_flat(tree) for tree in trees], orders)
    torch.testing.assert_close(_flat(result.grad), expected, rtol=1e-10, atol=1e-10)
    assert result.grad["frozen"] is None
    assert result.grad["kernel"].shape == (LARGE, 1)
    for tree, original in zip(trees, before, strict=True):
        for name, leaf in original.items():
            if leaf is not None:
                torch.testing.assert_close(tree[name], leaf, rtol=0.0, atol=0.0)


def test_in_place_matches_copied_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    trees = _sequence(3, 6)
    orders = pcgrad_orders(3, 7)

    in_place = pcgrad(trees, orders=orders)
    monkeypatch.setattr(_columns, "MAX_OBJECTIVES", 0)
    copied = pcgrad(trees, orders=orders)

    for name in ("kernel", "wide", "bias"):
        torch.testing.assert_close(in_place.grad[name], copied.grad[name], rtol=1e-4, atol=1e-4)
    for name in ("cosine", "norms", "weights"):
        torch.testing.assert_close(getattr(in_place.stats, name), getattr(copied.stats, name), rtol=1e-5, atol=1e-6)
    assert in_place.stats.conflicts.item() == copied.stats.conflicts.item()


def test_in_place_results_are_new_tensors() -> None:
    trees = _sequence(2, 8)

    result = sum_grads(trees)

    inputs = {leaf.untyped_storage().data_ptr() for tree in trees for leaf in optree.tree_leaves(tree)}
    for name in ("kernel", "wide", "bias"):
        assert result.grad[name].untyped_storage().data_ptr() not in inputs
    torch.testing.assert_close(result.grad["wide"], trees[0]["wide"] + trees[1]["wide"])


def test_mixed_dtypes_in_place() -> None:
    trees = _sequence(2, 9)
    for tree in trees:
        tree["wide"] = tree["wide"].double()

    matrix = _gram.from_columns(_columns_of(trees), 2, rescale=False)
    result = weighted(trees, [0.25, 0.75])

    assert len(matrix.columns) == 2
    assert matrix.gram_dtype == torch.float64
    assert result.grad["wide"].dtype == torch.float64
    assert result.grad["kernel"].dtype == torch.float32
    torch.testing.assert_close(result.grad["wide"], 0.25 * trees[0]["wide"] + 0.75 * trees[1]["wide"])


def test_non_contiguous_leaves_in_place() -> None:
    trees = _sequence(2, 10)
    generator = torch.Generator().manual_seed(10)
    for tree in trees:
        tree["kernel"] = torch.randn(2, LARGE, generator=generator).T

    result = sum_grads(trees)

    assert not trees[0]["kernel"].is_contiguous()
    assert result.grad["kernel"].shape == (LARGE, 2)
    torch.testing.assert_close(result.grad["kernel"], trees[0]["kernel"] + trees[1]["kernel"])


def _selected(trees: list[dict[str, Any]], *, rescale: bool = False) -> int:
    return len(_columns.select(_columns_of(trees), len(trees), rescale=rescale))


def test_copied_when_too_small() -> None:
    # With two objectives the leaves in place must hold 2 * NUMEL_PER_OBJECTIVE elements together.
    trees = _sequence(2, 11)
    needed = 2 * _columns.NUMEL_PER_OBJECTIVE
    for tree in trees:
        tree["wide"] = tree["wide"][: _columns.MIN_NUMEL - 1].clone()
        tree["kernel"] = tree["kernel"][: needed - 1].clone()

    assert _selected(trees) == 0
    for tree in trees:
        tree["kernel"] = torch.cat([tree["kernel"], torch.ones(1, 1)])
    assert _selected(trees) == 1


def test_copied_for_many_objectives() -> None:
    assert _selected(_sequence(_columns.MAX_OBJECTIVES + 1, 12)) == 0


def test_in_place_within_host_limit() -> None:
    assert _columns.MAX_OBJECTIVES <= _host_solver.MAX_OBJECTIVES


def test_many_objectives_need_large_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Eight objectives need 8 * NUMEL_PER_OBJECTIVE elements per objective, or a copy above LARGE_COPY_BYTES.
    trees = _sequence(8, 21)
    copy_bytes = 8 * 2 * LARGE * 4

    assert _selected(trees) == 0
    monkeypatch.setattr(_columns, "LARGE_COPY_BYTES", copy_bytes - 1)
    assert _selected(trees) == 2


def test_copied_with_rescale() -> None:
    assert _selected(_sequence(2, 13), rescale=True) == 0


def test_copied_for_half_precision() -> None:
    assert _selected(_sequence(2, 14, dtype=torch.bfloat16)) == 0


def test_copied_with_autograd_history() -> None:
    trees = _sequence(2, 15)
    trees[1]["bias"].requires_grad_()

    assert _selected(trees) == 0
    with torch.no_grad():
        assert _selected(trees) == 2


def test_partly_missing_leaf_is_copied() -> None:
    trees = _sequence(2, 16)
    trees[1]["kernel"] = None
    trees[0]["wide"] = torch.cat([trees[0]["wide"], trees[0]["wide"]])
    trees[1]["wide"] = torch.cat([trees[1]["wide"], trees[1]["wide"]])

    matrix = _gram.from_columns(_columns_of(trees), 2, rescale=False)
    result = sum_grads(trees)

    assert [column.slot.position for column in matrix.columns] == [3]
    torch.testing.assert_close(result.grad["kernel"], trees[0]["kernel"])


def test_not_in_place_under_vmap() -> None:
    seen = []

    def probe(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        seen.append(_selected([{"w": first}, {"w": second}]))
        return first.sum()

    batch = torch.ones(2, 4 * _columns.NUMEL_PER_OBJECTIVE)
    torch.vmap(probe)(batch, batch)
    assert seen == [0]


def test_learned_weights_keep_graph_in_place() -> None:
    # Weights with autograd history send the n x n step to the tensor solver, which stacks the columns.
    trees = _sequence(2, 17)
    weights = torch.tensor([0.25, 0.75], requires_grad=True)

    result = weighted(trees, weights, normalize=False)
    result.grad["wide"].sum().backward()

    expected = 0.25 * trees[0]["wide"] + 0.75 * trees[1]["wide"]
    torch.testing.assert_close(result.grad["wide"].detach(), expected)
    assert weights.grad is not None
    expected_grad = torch.stack([trees[0]["wide"].sum(), trees[1]["wide"].sum()])
    torch.testing.assert_close(weights.grad, expected_grad, rtol=1e-4, atol=1e-3)


def test_tensor_solver_on_columns_matches_host(monkeypatch: pytest.MonkeyPatch) -> None:
    trees = _sequence(3, 18)
    orders = pcgrad_orders(3, 19)

    host = pcgrad(trees, orders=orders)
    monkeypatch.setattr(_host_solver, "eligible", lambda matrix: False)
    device = pcgrad(trees, orders=orders)

    for name in ("kernel", "wide", "bias"):
        torch.testing.assert_close(host.grad[name], device.grad[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(host.stats.cosine, device.stats.cosine, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("count", [2, 4])
def test_column_products_accurate(count: int) -> None:
    generator = torch.Generator().manual_seed(20)
    rows = torch.randn(count, 5 * _gram.GRAM_CHUNK_NUMEL + 17, generator=generator)
    rows[1] = -0.7 * rows[0] + 0.3 * rows[1]
    matrix = _gram.from_columns([list(rows)], count, rescale=False)

    gram = torch.tensor(_gram.host_gram(matrix), dtype=torch.float64)

    assert len(matrix.columns) == 1
    exact = rows.double() @ rows.double().T
    norms = exact.diagonal().sqrt()
    assert ((gram - exact).abs() / torch.outer(norms, norms)).max().item() < 2e-6
    torch.testing.assert_close(gram, gram.T, rtol=0.0, atol=0.0)
