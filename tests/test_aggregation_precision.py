"""Aggregation precision: half-precision inputs, extreme float32 norms, rescaling and mixed-dtype trees."""

from __future__ import annotations

import pytest
import torch

from tolaria.functional.aggregation import mean_grads, pcgrad, pcgrad_orders, sum_grads, weighted
from tolaria.testing import pcgrad_reference


def _gradients(count: int, width: int, scale: float, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, width, generator=generator, dtype=torch.float64)
    rows[1] = -rows[0] + 0.3 * rows[1]  # make sure some pairs conflict
    return [(row * scale).to(dtype) for row in rows]


def _relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return float((result.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize(
    ("dtype", "scale", "tolerance"),
    [
        # float16: squared norms of ~300-sized entries overflow float16 (max 65504) ...
        (torch.float16, 300.0, 2e-3),
        # ... and squares of 1e-4-sized entries underflow it (smallest subnormal 6e-8).
        (torch.float16, 1e-4, 2e-3),
        # bfloat16 has float32's range: its squares overflow and underflow float32 too.
        (torch.bfloat16, 1e30, 1.6e-2),
        (torch.bfloat16, 1e-30, 1.6e-2),
    ],
)
def test_half_precision_pcgrad_is_exact(dtype: torch.dtype, scale: float, tolerance: float) -> None:
    grads = _gradients(4, 500, scale, dtype, seed=3)
    orders = pcgrad_orders(4, 8)
    # The oracle runs in float64 on the very same (rounded) half-precision values.
    expected = pcgrad_reference([gradient.double() for gradient in grads], orders)

    result = pcgrad(grads, orders=orders)

    assert result.grad.dtype == dtype
    assert torch.isfinite(result.grad).all()
    # The tolerance is a few units of the output dtype's rounding (eps is 1e-3 for float16, 8e-3 for bfloat16).
    assert _relative_error(result.grad, expected) < tolerance
    assert not result.stats.precision_loss.item()
    assert result.stats.norms.dtype == torch.float32
    torch.testing.assert_close(
        result.stats.norms.double(), torch.stack([gradient.double().norm() for gradient in grads]), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(("dtype", "base"), [(torch.float16, 2048.0), (torch.bfloat16, 256.0)])
def test_half_precision_weighted_accumulates_in_float32(dtype: torch.dtype, base: float) -> None:
    # The spacing of representable numbers at `base` is 2, so base + 1 + 1 accumulated in the
    # half dtype rounds back to base after each addition, while float32 reaches base + 2.
    grads = [torch.full((4,), base, dtype=dtype), torch.ones(4, dtype=dtype), torch.ones(4, dtype=dtype)]

    result = weighted(grads, [1.0, 1.0, 1.0], normalize=False)

    expected = torch.full((4,), base + 2.0).to(dtype)
    assert result.grad.dtype == dtype
    torch.testing.assert_close(result.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1e25, 1e-25])
def test_float32_extreme_norms_are_flagged(scale: float) -> None:
    # Squared norms of 1e25 overflow float32 and those of 1e-25 underflow it.
    grads = _gradients(3, 200, scale, torch.float32, seed=4)

    result = pcgrad(grads, orders=pcgrad_orders(3, 0))

    assert result.stats.precision_loss.item()
    assert torch.isfinite(result.grad).all()


@pytest.mark.parametrize("scale", [1e25, 1e-25, 1e-40])
def test_float32_extreme_norms_are_exact_with_rescale(scale: float) -> None:
    grads = _gradients(3, 200, scale, torch.float32, seed=4)
    orders = pcgrad_orders(3, 0)
    expected = pcgrad_reference([gradient.double() for gradient in grads], orders)

    result = pcgrad(grads, orders=orders, rescale=True)

    assert not result.stats.precision_loss.item()
    assert _relative_error(result.grad, expected) < 1e-5
    torch.testing.assert_close(
        result.stats.norms.double(), torch.stack([gradient.double().norm() for gradient in grads]), rtol=1e-5, atol=0
    )


def test_float32_normal_range_is_not_flagged() -> None:
    grads = _gradients(5, 1000, 1.0, torch.float32, seed=5)
    orders = pcgrad_orders(5, 1)

    fast = pcgrad(grads, orders=orders)
    rescaled = pcgrad(grads, orders=orders, rescale=True)

    assert not fast.stats.precision_loss.item()
    torch.testing.assert_close(fast.grad, rescaled.grad, rtol=1e-5, atol=1e-5)


def test_float32_mixed_magnitudes_with_rescale() -> None:
    # Objectives 1e20 apart: each is rescaled on its own, so the small one still steers the projections.
    small = torch.tensor([1e-15, 0.0, 1e-15])
    large = torch.tensor([-1e5, 2e5, 0.0])
    orders = pcgrad_orders(2, 0)
    expected = pcgrad_reference([small.double(), large.double()], orders)

    result = pcgrad([small, large], orders=orders, rescale=True)

    torch.testing.assert_close(result.grad.double(), expected, rtol=1e-6, atol=0)


def test_float32_zero_gradient_flag_depends_on_rescale() -> None:
    # Without rescaling an exact zero looks like a gradient whose squares all underflowed.
    grads = [torch.tensor([1.0, -2.0]), torch.zeros(2)]

    fast = pcgrad(grads, seed=0)
    rescaled = pcgrad(grads, seed=0, rescale=True)
    absent = pcgrad([{"w": grads[0]}, {"w": None}], seed=0)

    torch.testing.assert_close(fast.grad, grads[0])
    assert fast.stats.precision_loss.item()
    torch.testing.assert_close(rescaled.grad, grads[0])
    assert not rescaled.stats.precision_loss.item()
    assert not absent.stats.precision_loss.item(), "an objective that is None throughout is a known zero"


def test_sum_is_accurate_when_gram_overflows() -> None:
    grads = [torch.full((10,), 1e30), torch.full((10,), -5e29)]

    result = sum_grads(grads)

    assert result.stats.precision_loss.item()
    torch.testing.assert_close(result.grad, torch.full((10,), 5e29))
    assert torch.isinf(result.stats.norms).all(), "norms beyond float32's range read inf, not 0"


def test_non_finite_input_propagates() -> None:
    grads = [torch.tensor([1.0, float("nan")]), torch.tensor([-1.0, 0.0])]

    result = pcgrad(grads, seed=0)

    assert result.stats.precision_loss.item()
    assert torch.isnan(result.grad).any()


def test_mixed_dtype_tree_keeps_leaf_dtypes() -> None:
    generator = torch.Generator().manual_seed(6)
    grads = [
        {
            "fp32": torch.randn(4, generator=generator),
            "bf16": torch.randn(3, generator=generator).to(torch.bfloat16),
            "fp16": torch.randn(2, 2, generator=generator).to(torch.float16),
        }
        for _ in range(3)
    ]
    flat = [
        torch.cat([tree["bf16"].double(), tree["fp16"].double().reshape(-1), tree["fp32"].double()]) for tree in grads
    ]
    orders = pcgrad_orders(3, 2)
    expected = pcgrad_reference(flat, orders)

    result = pcgrad(grads, orders=orders)

    assert result.grad["fp32"].dtype == torch.float32
    assert result.grad["bf16"].dtype == torch.bfloat16
    assert result.grad["fp16"].dtype == torch.float16
    assert result.stats.cosine.dtype == torch.float32
    torch.testing.assert_close(result.grad["fp32"].double(), expected[7:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.grad["bf16"].double(), expected[:3], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(result.grad["fp16"].double(), expected[3:7].reshape(2, 2), rtol=2e-3, atol=2e-3)


def test_float64_leaf_makes_statistics_float64() -> None:
    grads = [{"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float64)} for _ in range(2)]

    for rescale in (False, True):
        result = mean_grads(grads, rescale=rescale)

        assert result.stats.norms.dtype == torch.float64
        assert result.grad["a"].dtype == torch.float32
        assert result.grad["b"].dtype == torch.float64
        torch.testing.assert_close(result.grad["a"], torch.ones(2))


def test_stacked_half_precision_matches_sequence() -> None:
    generator = torch.Generator().manual_seed(8)
    stacked = {"w": (torch.randn(3, 50, generator=generator) * 400).to(torch.float16)}
    orders = pcgrad_orders(3, 4)

    from_stacked = pcgrad(stacked, orders=orders, stacked=True)
    from_sequence = pcgrad([{"w": row} for row in stacked["w"]], orders=orders)

    assert from_stacked.grad["w"].dtype == torch.float16
    torch.testing.assert_close(from_stacked.grad["w"], from_sequence.grad["w"])
