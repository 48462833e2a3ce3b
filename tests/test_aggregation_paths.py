"""The two solvers of the n x n step (Python floats on the host, tensor operations elsewhere) agree."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch

from tolaria.functional import _gram, _host_solver
from tolaria.functional._gram import GradientMatrix
from tolaria.functional.aggregation import Aggregate, mean_grads, pcgrad, pcgrad_orders, sum_grads, weighted
from tolaria.testing import pcgrad_reference


@pytest.fixture
def device_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every aggregation through the tensor solver, as on an accelerator or under torch.func."""
    monkeypatch.setattr(_host_solver, "eligible", lambda raw: False)


def _both(run: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Aggregate, Aggregate]:
    host = run()
    with monkeypatch.context() as patch:
        patch.setattr(_host_solver, "eligible", lambda raw: False)
        device = run()
    return host, device


def _assert_same(host: Aggregate, device: Aggregate, tolerance: float) -> None:
    for left, right in zip(optree.tree_leaves(host.grad), optree.tree_leaves(device.grad), strict=True):
        assert left.dtype == right.dtype
        torch.testing.assert_close(left, right, rtol=tolerance, atol=tolerance)
    for name in ("conflict_ratio", "cosine", "norms", "weights"):
        torch.testing.assert_close(
            getattr(host.stats, name), getattr(device.stats, name), rtol=tolerance, atol=tolerance
        )
    assert host.stats.conflicts.item() == device.stats.conflicts.item()
    assert host.stats.conflicts.dtype == device.stats.conflicts.dtype == torch.int64
    assert host.stats.precision_loss.item() == device.stats.precision_loss.item()


def _matrix(stacked: torch.Tensor) -> GradientMatrix:
    return _gram.from_stacked([stacked], stacked.shape[0], rescale=False)


def test_eligible_for_plain_cpu_gradients() -> None:
    assert _host_solver.eligible(_matrix(torch.ones(3, 5)))


def test_not_eligible_with_autograd_history() -> None:
    assert not _host_solver.eligible(_matrix(torch.ones(3, 5, requires_grad=True)))


def test_eligible_under_no_grad() -> None:
    # Under no_grad nothing would be recorded anyway, so the faster host path loses nothing.
    with torch.no_grad():
        assert _host_solver.eligible(_matrix(torch.ones(3, 5, requires_grad=True)))


def test_not_eligible_for_many_objectives() -> None:
    count = _host_solver.MAX_OBJECTIVES + 1
    assert not _host_solver.eligible(_matrix(torch.ones(count, 5)))


def test_not_eligible_off_cpu() -> None:
    assert not _host_solver.eligible(_matrix(torch.empty(2, 5, device="meta")))


def test_not_eligible_under_vmap() -> None:
    seen = []

    def probe(stacked: torch.Tensor) -> torch.Tensor:
        seen.append(_host_solver.eligible(_matrix(stacked)))
        return stacked.sum()

    torch.vmap(probe)(torch.ones(4, 2, 5))
    assert seen == [False]


def test_solvers_agree_on_random_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(2)
    for case in range(60):
        count = 2 + case % 7
        grads = list(torch.randn(count, 3 + case % 11, generator=generator, dtype=torch.float64))
        if case % 4 == 0:
            grads[case % count] = torch.zeros_like(grads[0])
        if case % 3 == 0:
            grads[0] = -grads[1]
        reduction = "mean" if case % 2 else "sum"
        eps = 0.1 if case % 5 == 0 else 0.0
        rescale = case % 6 == 0
        orders = pcgrad_orders(count, case)

        host, device = _both(
            lambda: pcgrad(grads, orders=orders, reduction=reduction, eps=eps, rescale=rescale),  # noqa: B023
            monkeypatch,
        )

        _assert_same(host, device, tolerance=1e-10)


@pytest.mark.parametrize("rescale", [False, True])
def test_solvers_agree_on_fixed_weights(rescale: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(3)
    grads = [{"w": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator)} for _ in range(4)]

    for run in (
        lambda: sum_grads(grads, rescale=rescale),
        lambda: mean_grads(grads, rescale=rescale),
        lambda: weighted(grads, torch.tensor([0.5, 1.0, 2.0, 0.0]), rescale=rescale),
    ):
        host, device = _both(run, monkeypatch)
        _assert_same(host, device, tolerance=1e-5)


@pytest.mark.parametrize(
    ("dtype", "scale", "rescale"),
    [
        (torch.float16, 300.0, False),
        (torch.bfloat16, 1e30, False),
        (torch.float32, 1e25, False),
        (torch.float32, 1e-25, False),
        (torch.float32, 1e25, True),
        (torch.float32, 1e-40, True),
    ],
)
def test_solvers_agree_on_extreme_scales(
    dtype: torch.dtype, scale: float, rescale: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    rows[1] = -rows[0] + 0.2 * rows[1]
    grads = [(row * scale).to(dtype) for row in rows]

    host, device = _both(lambda: pcgrad(grads, orders=pcgrad_orders(3, 1), rescale=rescale), monkeypatch)

    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    assert host.stats.precision_loss.item() == device.stats.precision_loss.item()
    for result in (host, device):
        assert torch.isfinite(result.grad).all()
    if not host.stats.precision_loss.item():
        torch.testing.assert_close(host.grad.double(), device.grad.double(), rtol=tolerance, atol=0.0)


def test_solvers_agree_on_absent_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    grads = [{"w": torch.tensor([1.0, -1.0])}, {"w": None}, {"w": torch.tensor([-1.0, 0.0])}]

    host, device = _both(lambda: pcgrad(grads, seed=5), monkeypatch)

    _assert_same(host, device, tolerance=1e-6)
    assert not host.stats.precision_loss.item()


def test_solvers_agree_on_non_finite_input(monkeypatch: pytest.MonkeyPatch) -> None:
    grads = [torch.tensor([1.0, float("inf")]), torch.tensor([-1.0, 0.0])]

    host, device = _both(lambda: pcgrad(grads, seed=0), monkeypatch)

    assert host.stats.precision_loss.item()
    assert device.stats.precision_loss.item()
    assert not torch.isfinite(host.grad).all()
    assert not torch.isfinite(device.grad).all()


@pytest.mark.usefixtures("device_solver")
def test_device_solver_matches_reference() -> None:
    generator = torch.Generator().manual_seed(6)
    for case in range(30):
        count = 2 + case % 6
        grads = list(torch.randn(count, 9, generator=generator, dtype=torch.float64))
        orders = pcgrad_orders(count, case)
        torch.testing.assert_close(pcgrad(grads, orders=orders).grad, pcgrad_reference(grads, orders))


def test_many_objectives_use_tensor_solver_and_match_reference() -> None:
    count = _host_solver.MAX_OBJECTIVES + 4
    grads = list(torch.randn(count, 30, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    orders = pcgrad_orders(count, 8)

    result = pcgrad(grads, orders=orders)

    torch.testing.assert_close(result.grad, pcgrad_reference(grads, orders))


def test_pcgrad_is_differentiable_through_tensor_solver() -> None:
    # Inputs with autograd history keep the computation in tensor operations, so the graph survives.
    generator = torch.Generator().manual_seed(9)
    grads = [torch.randn(5, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(3)]
    grads[1].data = -grads[0].data + 0.1 * grads[1].data
    orders = pcgrad_orders(3, 0)

    result = pcgrad(grads, orders=orders)
    result.grad.square().sum().backward()

    expected = pcgrad_reference([gradient.detach() for gradient in grads], orders)
    torch.testing.assert_close(result.grad.detach(), expected)
    for gradient in grads:
        assert gradient.grad is not None
        assert torch.isfinite(gradient.grad).all()


def test_weighted_keeps_graph_of_learned_weights() -> None:
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])]
    weights = torch.tensor([0.25, 0.75], requires_grad=True)

    result = weighted(grads, weights, normalize=False)
    result.grad.sum().backward()

    torch.testing.assert_close(result.grad.detach(), torch.tensor([2.5, -0.25]))
    assert weights.grad is not None
    torch.testing.assert_close(weights.grad, torch.tensor([3.0, 2.0]))


def _wide_tree(count: int, generator: torch.Generator) -> dict[str, Any]:
    """A stacked tree with wide blocks (Gram entries from matrix-vector products) and small ones, in two dtypes.

    It is large enough for the host path to write each dtype group's results into one shared buffer.
    """
    wide = _gram.WIDE_BLOCK_NUMEL
    tree: dict[str, Any] = {
        "wide": torch.randn(count, _gram.SHARED_BUFFER_NUMEL + 3, generator=generator, dtype=torch.float64),
        "kernel": torch.randn(count, wide // 4, 4, generator=generator, dtype=torch.float64),
        "bias": torch.randn(count, 7, generator=generator, dtype=torch.float64),
        "unused": None,
        "half_width": torch.randn(count, wide, generator=generator),
    }
    if count > 1:
        tree["wide"][1] = -0.8 * tree["wide"][0] + 0.2 * tree["wide"][1]
    return tree


def _flat(tree: Any) -> torch.Tensor:
    return torch.cat([leaf.reshape(-1).double() for leaf in optree.tree_leaves(tree)])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_wide_blocks_match_reference(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _wide_tree(count, torch.Generator().manual_seed(count))
    before = optree.tree_map(torch.clone, tree)
    orders = pcgrad_orders(count, 11)

    host, device = _both(lambda: pcgrad(tree, orders=orders, stacked=True), monkeypatch)

    rows = [_flat(optree.tree_map(lambda leaf, k=k: leaf[k], tree)) for k in range(count)]
    torch.testing.assert_close(_flat(host.grad), pcgrad_reference(rows, orders), rtol=1e-5, atol=1e-5)
    _assert_same(host, device, tolerance=1e-5)
    assert host.grad["unused"] is None
    assert host.grad["kernel"].shape == (_gram.WIDE_BLOCK_NUMEL // 4, 4)
    assert host.grad["half_width"].dtype == torch.float32
    for name, leaf in before.items():
        if leaf is not None:
            torch.testing.assert_close(tree[name], leaf, rtol=0.0, atol=0.0)


def test_wide_overflow_flagged_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(12)
    stacked = torch.randn(2, _gram.WIDE_BLOCK_NUMEL, generator=generator) * 1e20
    stacked[1] = -stacked[0] + 0.5 * stacked[1]
    tree = {"wide": stacked, "other": torch.randn(2, _gram.WIDE_BLOCK_NUMEL, generator=generator)}

    host, device = _both(lambda: pcgrad(tree, seed=3, stacked=True), monkeypatch)

    assert host.stats.precision_loss.item()
    assert device.stats.precision_loss.item()
    assert torch.isfinite(host.grad["wide"]).all()


def test_results_of_one_dtype_share_one_buffer() -> None:
    tree = _wide_tree(3, torch.Generator().manual_seed(13))

    result = pcgrad(tree, seed=4, stacked=True)

    double_leaves = [result.grad[name] for name in ("wide", "kernel", "bias")]
    storages = {leaf.untyped_storage().data_ptr() for leaf in double_leaves}
    assert len(storages) == 1
    inputs = {leaf.untyped_storage().data_ptr() for leaf in optree.tree_leaves(tree)}
    assert storages.isdisjoint(inputs)
    assert result.grad["half_width"].untyped_storage().data_ptr() not in storages | inputs


def test_no_grad_host_path_matches_reference() -> None:
    generator = torch.Generator().manual_seed(14)
    rows = torch.randn(3, _gram.WIDE_BLOCK_NUMEL, generator=generator, dtype=torch.float64)
    rows[2] = -rows[1]
    grads = [row.clone().requires_grad_() for row in rows]
    orders = pcgrad_orders(3, 2)

    with torch.no_grad():
        result = pcgrad(grads, orders=orders)

    assert not result.grad.requires_grad
    torch.testing.assert_close(result.grad, pcgrad_reference(list(rows), orders))


@pytest.mark.parametrize("count", [2, 5, 20])
def test_tensor_gram_accurate_on_wide_cpu_block(count: int) -> None:
    # The tensor path (autograd, torch.func, torch.compile, more than 16 objectives) also works in column chunks
    # on the CPU. One torch.mm over this width was 3.8e-5 off at n = 2 and 1e-4 at n = 5.
    generator = torch.Generator().manual_seed(15)
    rows = torch.randn(count, 5 * _gram.GRAM_CHUNK_NUMEL + 17, generator=generator)
    rows[1] = -0.7 * rows[0] + 0.3 * rows[1]
    matrix = _gram.from_stacked([rows], count, rescale=False)

    gram = _gram.gram_matrix(matrix).double()

    exact = rows.double() @ rows.double().T
    norms = exact.diagonal().sqrt()
    assert ((gram - exact).abs() / torch.outer(norms, norms)).max().item() < 2e-5


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_host_gram_accurate_on_wide_block(count: int) -> None:
    # Five column chunks wide: each chunk rounds like a short product and the chunks are summed, so the error
    # stays near that of one chunk. One torch.mm over the whole width was 4e-5 to 1e-4 off here.
    generator = torch.Generator().manual_seed(15)
    rows = torch.randn(count, 5 * _gram.GRAM_CHUNK_NUMEL + 17, generator=generator)
    if count > 1:
        rows[1] = -0.7 * rows[0] + 0.3 * rows[1]
    matrix = _gram.from_stacked([rows], count, rescale=False)

    gram = torch.tensor(_gram.host_gram(matrix), dtype=torch.float64)

    exact = rows.double() @ rows.double().T
    norms = exact.diagonal().sqrt()
    # Errors are measured against ||g_i|| ||g_k||, the scale of the cosine similarities they feed.
    assert ((gram - exact).abs() / torch.outer(norms, norms)).max().item() < 2e-5
    torch.testing.assert_close(gram, gram.T, rtol=0.0, atol=0.0)
