"""PCGrad: hand-computed 2-D and 3-D cases, the loop reference as an oracle, orders and n = 1."""

from __future__ import annotations

import torch

from tolaria.functional.aggregation import pcgrad, pcgrad_orders
from tolaria.testing import pcgrad_reference


def _vectors(*rows: tuple[float, ...], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [torch.tensor(row, dtype=dtype) for row in rows]


def _orders(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


TWO_ORDERS = _orders([1], [0])


def test_pcgrad_two_conflicting_gradients() -> None:
    # <g1, g2> = -1: g1 + 1/2 g2 = (0.5, 0.5) and g2 + g1 = (0, 1).
    result = pcgrad(_vectors((1.0, 0.0), (-1.0, 1.0)), orders=TWO_ORDERS)

    torch.testing.assert_close(result.grad, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(result.stats.weights, torch.tensor([2.0, 1.5], dtype=torch.float64))
    assert result.stats.conflicts.item() == 1
    assert result.stats.conflict_ratio.item() == 1.0
    torch.testing.assert_close(result.stats.norms, torch.tensor([1.0, 2.0**0.5], dtype=torch.float64))
    torch.testing.assert_close(result.stats.cosine[0, 1].item(), -(0.5**0.5))
    assert not result.stats.precision_loss.item()


def test_pcgrad_two_agreeing_gradients_sum() -> None:
    result = pcgrad(_vectors((1.0, 2.0), (3.0, 1.0)), orders=TWO_ORDERS)

    torch.testing.assert_close(result.grad, torch.tensor([4.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(result.stats.weights, torch.ones(2, dtype=torch.float64))
    assert result.stats.conflicts.item() == 0
    assert result.stats.conflict_ratio.item() == 0.0


def test_pcgrad_orthogonal_gradients_sum() -> None:
    # An inner product of exactly 0 is no conflict.
    result = pcgrad(_vectors((1.0, 0.0), (0.0, 2.0)), orders=TWO_ORDERS)

    torch.testing.assert_close(result.grad, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert result.stats.conflicts.item() == 0
    assert result.stats.cosine[0, 1].item() == 0.0


def test_pcgrad_identical_gradients_sum() -> None:
    result = pcgrad(_vectors((1.0, 1.0), (1.0, 1.0)), orders=TWO_ORDERS)

    torch.testing.assert_close(result.grad, torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(result.stats.cosine, torch.ones(2, 2, dtype=torch.float64))


def test_pcgrad_opposite_gradients_cancel() -> None:
    # Each gradient is projected onto the normal plane of the other: g1 + g2 = 0 and g2 + g1 = 0.
    result = pcgrad(_vectors((1.0, 0.0), (-1.0, 0.0)), orders=TWO_ORDERS)

    torch.testing.assert_close(result.grad, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(result.stats.weights, torch.full((2,), 2.0, dtype=torch.float64))


def test_pcgrad_zero_gradient_is_skipped() -> None:
    result = pcgrad(_vectors((1.0, 1.0), (0.0, 0.0)), orders=TWO_ORDERS, rescale=True)

    torch.testing.assert_close(result.grad, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(result.stats.norms, torch.tensor([2.0**0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(result.stats.cosine, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert result.stats.conflicts.item() == 0
    assert not result.stats.precision_loss.item()


def test_pcgrad_three_dimensions_by_hand() -> None:
    # g1 = (2, 0, 0), g2 = (-1, 1, 0), g3 = (0, -1, 1): <g1, g2> = -2, <g1, g3> = 0, <g2, g3> = -1.
    # i = 1 visits 2 then 3: (2,0,0) + (-1,1,0) = (1,1,0); then + 1/2 g3 = (1, 0.5, 0.5).
    # i = 2 visits 1 then 3: (-1,1,0) + 1/2 g1 = (0,1,0); then + 1/2 g3 = (0, 0.5, 0.5).
    # i = 3 visits 1 (no conflict) then 2: (0,-1,1) + 1/2 g2 = (-0.5, -0.5, 1).
    grads = _vectors((2.0, 0.0, 0.0), (-1.0, 1.0, 0.0), (0.0, -1.0, 1.0))

    result = pcgrad(grads, orders=_orders([1, 2], [0, 2], [0, 1]))

    torch.testing.assert_close(result.grad, torch.tensor([0.5, 0.5, 2.0], dtype=torch.float64))
    assert result.stats.conflicts.item() == 2
    torch.testing.assert_close(result.stats.conflict_ratio.item(), 2.0 / 3.0)


def test_pcgrad_three_dimensions_order_matters() -> None:
    # i = 3 now visits 2 first: (-0.5, -0.5, 1), which conflicts with g1: + 1/4 g1 = (0, -0.5, 1).
    grads = _vectors((2.0, 0.0, 0.0), (-1.0, 1.0, 0.0), (0.0, -1.0, 1.0))

    result = pcgrad(grads, orders=_orders([1, 2], [0, 2], [1, 0]))

    torch.testing.assert_close(result.grad, torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))


def test_pcgrad_mean_reduction_divides_by_n() -> None:
    grads = _vectors((2.0, 0.0, 0.0), (-1.0, 1.0, 0.0), (0.0, -1.0, 1.0))
    orders = _orders([1, 2], [0, 2], [0, 1])

    summed = pcgrad(grads, orders=orders)
    mean = pcgrad(grads, orders=orders, reduction="mean")

    torch.testing.assert_close(mean.grad, summed.grad / 3)
    torch.testing.assert_close(mean.stats.weights, summed.stats.weights / 3)


def test_pcgrad_matches_reference_on_random_cases() -> None:
    generator = torch.Generator().manual_seed(1234)
    for case in range(300):
        count = int(torch.randint(2, 9, (), generator=generator))
        width = int(torch.randint(1, 17, (), generator=generator))
        grads = list(torch.randn(count, width, generator=generator, dtype=torch.float64))
        if case % 5 == 0:
            grads[case % count] = torch.zeros(width, dtype=torch.float64)
        if case % 7 == 0:
            grads[0] = -grads[-1] * 0.5  # force an exactly antiparallel pair
        orders = pcgrad_orders(count, case)
        reduction = "mean" if case % 2 else "sum"

        expected = pcgrad_reference(grads, orders, reduction=reduction)
        result = pcgrad(grads, orders=orders, reduction=reduction)

        torch.testing.assert_close(result.grad, expected, rtol=1e-10, atol=1e-12, msg=f"case {case}")
        combined = (result.stats.weights.unsqueeze(1) * torch.stack(grads)).sum(dim=0)
        torch.testing.assert_close(combined, expected, rtol=1e-10, atol=1e-12, msg=f"weights of case {case}")


def test_pcgrad_matches_reference_for_fixed_orders() -> None:
    # Forty seeded orders of a 4-objective problem with many conflicts, against the oracle.
    generator = torch.Generator().manual_seed(7)
    grads = list(torch.randn(4, 6, generator=generator, dtype=torch.float64))
    grads[1] = -grads[0] + 0.1 * grads[1]
    for seed in range(40):
        orders = pcgrad_orders(4, seed)
        torch.testing.assert_close(
            pcgrad(grads, orders=orders).grad, pcgrad_reference(grads, orders), rtol=1e-10, atol=1e-12
        )


def test_pcgrad_reference_agrees_in_float32() -> None:
    generator = torch.Generator().manual_seed(99)
    for case in range(50):
        grads = list(torch.randn(5, 300, generator=generator))
        orders = pcgrad_orders(5, case)

        result = pcgrad(grads, orders=orders)

        assert result.grad.dtype == torch.float32
        torch.testing.assert_close(result.grad, pcgrad_reference(grads, orders), rtol=1e-4, atol=1e-4)


def test_pcgrad_tree_and_stacked_forms_agree() -> None:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 3, 2, generator=generator, dtype=torch.float64)
    bias = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    scale = torch.randn(4, generator=generator, dtype=torch.float64)
    trees = [{"layer": {"weight": weight[k], "bias": bias[k]}, "scale": scale[k]} for k in range(4)]
    stacked = {"layer": {"weight": weight, "bias": bias}, "scale": scale}
    flat = [torch.cat([bias[k], weight[k].reshape(-1), scale[k].reshape(1)]) for k in range(4)]
    orders = pcgrad_orders(4, 11)

    from_trees = pcgrad(trees, orders=orders)
    from_stacked = pcgrad(stacked, orders=orders, stacked=True)
    expected = pcgrad_reference(flat, orders)

    for result in (from_trees, from_stacked):
        torch.testing.assert_close(result.grad["layer"]["bias"], expected[:2])
        torch.testing.assert_close(result.grad["layer"]["weight"], expected[2:8].reshape(3, 2))
        torch.testing.assert_close(result.grad["scale"], expected[8])
    torch.testing.assert_close(from_trees.stats.cosine, from_stacked.stats.cosine)


def test_pcgrad_seed_draws_reproducible_orders() -> None:
    grads = list(torch.randn(5, 8, dtype=torch.float64))
    state = torch.get_rng_state()

    first = pcgrad(grads, seed=42)
    second = pcgrad(grads, seed=42)
    explicit = pcgrad(grads, orders=pcgrad_orders(5, 42))

    assert torch.equal(torch.get_rng_state(), state), "pcgrad must not touch the global RNG"
    assert torch.equal(first.grad, second.grad)
    assert torch.equal(first.grad, explicit.grad)


def test_pcgrad_orders_are_permutations_of_others() -> None:
    for count in (1, 2, 3, 8):
        orders = pcgrad_orders(count, 2024)
        assert orders.shape == (count, count - 1)
        assert orders.dtype == torch.int64
        for row_index, row in enumerate(orders.tolist()):
            assert sorted(row) == [k for k in range(count) if k != row_index]


def test_pcgrad_orders_differ_between_seeds_and_rows() -> None:
    draws = {tuple(map(tuple, pcgrad_orders(6, seed).tolist())) for seed in range(20)}
    assert len(draws) == 20
    rows = pcgrad_orders(6, 0).tolist()
    shifted = [[k - (k > i) for k in row] for i, row in enumerate(rows)]
    assert len({tuple(row) for row in shifted}) > 1, "each objective draws its own order"


def test_pcgrad_orders_on_requested_device(device: torch.device) -> None:
    assert pcgrad_orders(3, 0, device=device).device.type == device.type


def test_pcgrad_single_objective_returns_input() -> None:
    gradient = {"weight": torch.randn(3, 2), "bias": None}

    result = pcgrad([gradient], seed=0)

    assert result.grad["weight"] is gradient["weight"]
    assert result.grad["bias"] is None
    torch.testing.assert_close(result.stats.norms, gradient["weight"].norm().reshape(1))
    torch.testing.assert_close(result.stats.weights, torch.ones(1))
    assert result.stats.conflicts.item() == 0
    assert result.stats.conflict_ratio.item() == 0.0


def test_pcgrad_single_objective_stacked_returns_views() -> None:
    stacked = {"weight": torch.randn(1, 3, 2)}

    result = pcgrad(stacked, orders=torch.zeros(1, 0, dtype=torch.int64), stacked=True)

    assert torch.equal(result.grad["weight"], stacked["weight"][0])
    assert result.grad["weight"].data_ptr() == stacked["weight"].data_ptr()


def test_pcgrad_eps_skips_small_targets() -> None:
    # g2 is 1e-3 of g1's length: eps = 1e-2 skips it as a target, eps = 0 projects onto it.
    grads = _vectors((1.0, 0.0), (-1e-3, 0.0))

    exact = pcgrad(grads, orders=TWO_ORDERS)
    skipped = pcgrad(grads, orders=TWO_ORDERS, eps=1e-2)

    torch.testing.assert_close(exact.grad, torch.zeros(2, dtype=torch.float64))
    # g1 stays; g2 is still projected onto g1's normal plane, which removes all of it.
    torch.testing.assert_close(skipped.grad, torch.tensor([1.0, 0.0], dtype=torch.float64))
