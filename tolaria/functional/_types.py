"""Result types of the aggregators."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from tolaria.functional._pytree import PyTree

__all__ = ["Aggregate", "AggregationStats", "Solution"]


class AggregationStats(NamedTuple):
    """Diagnostics of one aggregation; every field is a tensor on the device of the first tensor leaf.

    Floating fields are float32, or float64 when any leaf is float64.
    """

    conflicts: Tensor
    """0-d int64: the number of objective pairs whose original gradients have a negative inner product."""
    conflict_ratio: Tensor
    """0-d float: ``conflicts`` divided by the ``n (n - 1) / 2`` pairs; 0 when ``n <= 1``."""
    cosine: Tensor
    """``[n, n]`` pairwise cosine similarities; 0 in every row and column of a zero gradient."""
    norms: Tensor
    """``[n]`` Euclidean norms of the original gradients (``inf`` where the norm exceeds the dtype's range)."""
    weights: Tensor
    """``[n]`` effective coefficients ``w`` with ``grad = sum_k w[k] g_k`` (``inf`` or 0 where not representable)."""
    precision_loss: Tensor
    """0-d bool: the Gram matrix left its dtype's range, so ``cosine``, ``conflicts`` and PCGrad's ``grad`` may be
    inexact. The ``grad`` of sum, mean and weighted does not depend on the Gram matrix and stays accurate."""


class Aggregate(NamedTuple):
    """The combined gradient and its diagnostics."""

    grad: PyTree
    """A pytree with the structure of one objective's gradient; each leaf keeps its dtype and device."""
    stats: AggregationStats


class Solution(NamedTuple):
    """What a solver computes from the Gram matrix: how to combine the stored rows, and the statistics."""

    row_weights: Tensor
    """``[n]`` coefficients on the stored (possibly rescaled) rows of the gradient matrix."""
    stats: AggregationStats
    on_host: bool = False
    """The host solver made it, so the gradient matrix contains plain eager tensors without autograd history."""
