"""Inputs shared by the rank worker and the tests that check its results.

Each function is a pure function of the rank, so the test process can rebuild
every rank's input and compute the expected cross-rank result itself.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch

PCGRAD_EXAMPLE = {
    0: [[1.0, 0.0], [-1.0, 1.0]],
    1: [[1.0, 0.0], [1.0, 1.0]],
}

# Tiny buckets so that the small test tree needs several all-reduces per dtype.
SMALL_BUCKET_BYTES = 64

ROLLBACK_CASES: dict[str, dict[int, list[int]]] = {
    "overlap": {0: [10, 20, 30], 1: [20, 30, 40]},
    "disjoint": {0: [10, 20], 1: [30]},
    "one_empty": {0: [], 1: [5]},
    "both_empty": {0: [], 1: []},
    "unsorted_repeats": {0: [5, 5, 3], 1: [3, 5]},
}

LEVEL_CASES: dict[str, dict[int, int]] = {
    "rank1_higher": {0: 1, 1: 3},
    "rank0_higher": {0: 4, 1: 0},
    "equal": {0: 2, 1: 2},
}


class EmergencyLevel(enum.IntEnum):
    """Ordered severities, as a controller would send them."""

    NORMAL = 0
    CAUTIOUS = 1
    ROLLBACK = 2
    HALT = 3


@dataclasses.dataclass(frozen=True)
class ControlCommand:
    """A controller decision that rank 0 broadcasts."""

    action: str
    step: int
    lr_scale: float
    targets: tuple[str, ...] = ()


def stacked_gradients(rank: int) -> dict[str, Any]:
    """Build a nested tree of [n=3, ...] gradients of several dtypes with None leaves."""
    generator = torch.Generator().manual_seed(1000 + rank)

    def normal(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return {
        "encoder": {
            "weight": normal(3, 4, 5),
            "bias": normal(3, 5),
            "frozen": None,
        },
        "heads": [
            normal(3, 7, dtype=torch.float64),
            None,
            (normal(3, 2, 2, dtype=torch.float16), normal(3, 6, dtype=torch.bfloat16)),
        ],
        "empty": torch.zeros(3, 0),
        "scale": normal(3, 1),
    }


def unstacked_gradients(rank: int) -> dict[str, Any]:
    """Build gradients of parameters that only one objective uses: no objective axis, a 0-d leaf."""
    generator = torch.Generator().manual_seed(2000 + rank)
    return {
        "temperature": torch.randn((), generator=generator),
        "head": torch.randn(4, 3, generator=generator),
        "unused": None,
    }


def mismatched_gradients(rank: int) -> dict[str, Any]:
    """Return the stacked tree, with one leaf of a different shape on rank 1."""
    tree = stacked_gradients(rank)
    if rank == 1:
        tree["scale"] = torch.ones(3, 2)
    return tree
