"""PCGrad visit orders drawn from an explicit seed."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from tolaria.functional._checks import check_seed

__all__ = ["draw_orders", "pcgrad_orders"]


def draw_orders(count: int, seed: int) -> list[list[int]]:
    """Return the orders of ``pcgrad_orders`` as ``n`` lists of ``n - 1`` ints."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r} is invalid; expected the number of objectives, an int >= 1")
    seed = check_seed(seed)
    if count <= 2:  # A permutation of at most one objective leaves nothing to draw.
        return [[other for other in range(count) if other != objective] for objective in range(count)]
    generator = random.Random(seed)
    orders = []
    for objective in range(count):
        # Sorting n - 1 independent uniform draws gives a uniformly random permutation; two
        # draws (53-bit floats) tie with probability below n**2 / 2**53.
        keys = [generator.random() for _ in range(count - 1)]
        permutation = sorted(range(count - 1), key=keys.__getitem__)
        # Positions at or past the row's own objective shift up by one, which skips it.
        orders.append([position + (position >= objective) for position in permutation])
    return orders


def pcgrad_orders(count: int, seed: int, *, device: torch.device | str | None = None) -> Tensor:
    """Draw PCGrad visit orders from ``seed``: row ``i`` is a random permutation of every objective except ``i``.

    A local ``random.Random`` seeded with ``seed`` draws the permutations on the host,
    so the global Python, NumPy and torch RNGs are neither read nor advanced, and one
    seed gives the same orders on every device. Python guarantees that ``random()``
    yields the same sequence for the same int seed in every version, so a resumed run
    draws the same orders. Under ``torch.compile`` call this outside the compiled
    function and pass the orders in.

    Args:
        count: number of objectives ``n >= 1``.
        seed: an int in ``[0, 2**64 - 1]``.
        device: where the result is placed (default CPU).

    Returns:
        An int64 tensor ``[n, n - 1]``.

    Raises:
        TypeError, ValueError: ``count`` or ``seed`` is not a valid integer.
    """
    orders = torch.tensor(draw_orders(count, seed), dtype=torch.int64, device=device)
    return orders.reshape(count, count - 1)
