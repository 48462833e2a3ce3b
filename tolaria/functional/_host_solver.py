"""The ``[n, n]`` part of aggregation in plain Python floats, for a CPU Gram matrix in eager mode.

A CPU tensor's values are in host memory, so reading the ``n x n`` Gram matrix
costs no device synchronisation. For the few objectives of multi-task training the
``n x n`` work is a few hundred floating-point operations, so the fixed cost of
dispatching several dozen tiny tensor operations (a few microseconds each) would
dominate it. Python floats (float64) do the same work several times faster. ``_device_solver`` computes the same
quantities with tensor operations; ``eligible`` chooses between the two.
"""

from __future__ import annotations

import array
import itertools
import math
from collections.abc import Sequence

import torch

from tolaria.functional._checks import outside_transforms, without_autograd
from tolaria.functional._gram import GradientMatrix
from tolaria.functional._types import AggregationStats, Solution

__all__ = ["MAX_OBJECTIVES", "eligible", "solve_pcgrad", "solve_weighted"]

MAX_OBJECTIVES = 16
"""Above this many objectives the O(n^3) Python recursion costs more than the tensor operations."""

Matrix = list[list[float]]

_ARRAY_CODES = {torch.float32: "f", torch.float64: "d"}
"""``array.array`` type codes of the Gram matrix dtypes."""


def eligible(matrix: GradientMatrix) -> bool:
    """Return whether the ``[n, n]`` step for ``matrix`` can run here, on a Gram matrix of Python floats.

    That needs a Gram matrix on the CPU, plain tensors in eager mode (outside
    ``torch.compile`` and ``torch.func`` transforms), no autograd history to keep,
    and at most ``MAX_OBJECTIVES`` objectives.
    """
    # Inside a torch.func transform the blocks are (or may be) wrapped tensors, whose values cannot be read.
    if matrix.home.type != "cpu" or matrix.objectives > MAX_OBJECTIVES or not outside_transforms():
        return False
    rows = (row for column in matrix.columns for row in column.rows)
    return without_autograd(itertools.chain((block.matrix for block in matrix.blocks), rows))


def _check_precision(matrix: GradientMatrix, gram: Matrix) -> tuple[Matrix, bool]:
    """Return the Gram matrix with non-finite entries set to 0 and whether it may be inexact.

    The rule is ``_device_solver.check_precision``'s: a squared norm outside
    ``[underflow_floor, overflow_ceiling]`` (or NaN) is flagged, except an exact 0 for an
    objective that is ``None`` in every leaf.
    """
    loss = False
    for k, row in enumerate(gram):
        value = row[k]
        in_range = matrix.underflow_floor <= value <= matrix.overflow_ceiling
        if not in_range and not (value == 0.0 and k in matrix.absent):
            loss = True
    # A finite total means that no entry is inf or NaN, so the usual matrix needs no copy.
    if math.isfinite(sum(map(sum, gram))):
        return gram, loss
    return [[value if math.isfinite(value) else 0.0 for value in row] for row in gram], loss


def _log2_norms(matrix: GradientMatrix, gram: Matrix) -> list[float]:
    """Return ``log2 ||g_k||`` of the original gradients (``-inf`` for a zero one)."""
    exponents = matrix.exponents.tolist() if matrix.exponents is not None else [0.0] * len(gram)
    return [0.5 * math.log2(row[k]) - exponents[k] if row[k] > 0 else -math.inf for k, row in enumerate(gram)]


def _projection_targets(matrix: GradientMatrix, gram: Matrix, eps: float) -> list[bool]:
    if eps == 0.0:
        return [row[k] > 0 for k, row in enumerate(gram)]
    log_norms = _log2_norms(matrix, gram)
    threshold = max(log_norms) + math.log2(eps)
    return [value > threshold for value in log_norms]


def _project_coefficients(gram: Matrix, orders: Sequence[Sequence[int]], targets: list[bool]) -> Matrix:
    """Run Algorithm 1 of PCGrad in coefficient space: row ``i`` contains ``g_i^PC = sum_k C[i][k] g_k``."""
    count = len(gram)
    coefficients = [[1.0 if k == i else 0.0 for k in range(count)] for i in range(count)]
    for i, row in enumerate(coefficients):
        # products[m] = <g_i^PC, g_m> = sum_k C[i][k] G[k][m], kept up to date as C[i] changes,
        # so that a visit without a conflict costs one lookup.
        products = list(gram[i])
        for j in orders[i]:
            inner = products[j]
            if inner < 0.0 and targets[j]:
                amount = inner / gram[j][j]
                row[j] -= amount
                products = [product - amount * value for product, value in zip(products, gram[j], strict=True)]
    return coefficients


def _scales(matrix: GradientMatrix) -> list[float] | None:
    """Return ``2**-e[k]``, which maps a per-row value of the scaled matrix back to the original gradient.

    ``None`` when the rows were not rescaled (every factor is 1).
    """
    if matrix.exponents is None:
        return None
    return [2.0 ** (-exponent) for exponent in matrix.exponents.tolist()]


def _cosine(clean: Matrix) -> list[float]:
    """Return the cosine similarities, row-major, with 0 in the rows and columns of zero gradients."""
    inverse_norms = [1.0 / math.sqrt(row[k]) if row[k] > 0 else 0.0 for k, row in enumerate(clean)]
    return [
        min(1.0, max(-1.0, value * inverse_norms[i] * inverse_norms[j]))
        for i, row in enumerate(clean)
        for j, value in enumerate(row)
    ]


def _norms(gram: Matrix, scales: list[float] | None) -> list[float]:
    """Return the norms of the original gradients from the diagonal of the (scaled) Gram matrix."""
    # A NaN squared norm (non-finite input) gives a NaN norm; sqrt would reject a negative one, which cannot occur.
    norms = [math.sqrt(row[k]) if row[k] >= 0 else math.nan for k, row in enumerate(gram)]
    return norms if scales is None else [norm * scale for norm, scale in zip(norms, scales, strict=True)]


def _solution(
    matrix: GradientMatrix,
    gram: Matrix,
    clean: Matrix,
    loss: bool,
    weights: list[float],
    row_weights: list[float],
    scales: list[float] | None,
) -> Solution:
    """Compute the statistics and pack everything into tensors of the Gram matrix's dtype."""
    count = matrix.objectives
    conflicts = sum(1 for i, row in enumerate(clean) for value in row[i + 1 :] if value < 0)
    ratio = conflicts / max(count * (count - 1) // 2, 1)  # 0 when n <= 1: no pairs, no conflicts

    # One tensor contains every float and the statistics are views of it: one copy instead of five.
    # torch.frombuffer over an array.array skips the per-element type inference of torch.tensor.
    values = array.array(
        _ARRAY_CODES[matrix.gram_dtype], [ratio, *_cosine(clean), *_norms(gram, scales), *weights, *row_weights]
    )
    packed = torch.frombuffer(values, dtype=matrix.gram_dtype)
    square = count * count
    ratio_view, cosine, norm_view, weight_view, row_view = packed.split_with_sizes([1, square, count, count, count])
    stats = AggregationStats(
        conflicts=torch.scalar_tensor(conflicts, dtype=torch.int64),
        conflict_ratio=ratio_view.view(()),
        cosine=cosine.view(count, count),
        norms=norm_view,
        weights=weight_view,
        precision_loss=torch.scalar_tensor(loss, dtype=torch.bool),
    )
    return Solution(row_view, stats, on_host=True)


def solve_weighted(matrix: GradientMatrix, gram: Matrix, weights: Sequence[float]) -> Solution:
    """Combine the objectives with fixed ``weights`` (``n`` floats), given ``gram`` from ``_gram.host_gram``."""
    clean, loss = _check_precision(matrix, gram)
    scales = _scales(matrix)
    weights = list(weights)
    row_weights = weights if scales is None else [weight * scale for weight, scale in zip(weights, scales, strict=True)]
    return _solution(matrix, gram, clean, loss, weights, row_weights, scales)


def solve_pcgrad(
    matrix: GradientMatrix, gram: Matrix, orders: Sequence[Sequence[int]], *, eps: float, mean: bool
) -> Solution:
    """Combine the objectives with PCGrad, given ``gram`` from ``_gram.host_gram`` and checked ``orders``."""
    clean, loss = _check_precision(matrix, gram)
    coefficients = _project_coefficients(clean, orders, _projection_targets(matrix, clean, eps))

    # Row i of the recursion ran on scaled rows, so g_i^PC = 2**-e[i] sum_k C[i][k] (2**e[k] g_k):
    # the coefficient of stored row k is sum_i 2**-e[i] C[i][k], and that of g_k is 2**e[k] times it.
    # A coefficient can only overflow in a Gram matrix that precision_loss flags; it is then set to 0.
    count = matrix.objectives
    factor = 1.0 / count if mean else 1.0
    scales = _scales(matrix)
    if scales is None:
        row_weights = [factor * sum(row[k] for row in coefficients) for k in range(count)]
        weights = row_weights
    else:
        row_weights = [factor * sum(scales[i] * coefficients[i][k] for i in range(count)) for k in range(count)]
        weights = [weight / scale for weight, scale in zip(row_weights, scales, strict=True)]
    row_weights = [weight if math.isfinite(weight) else 0.0 for weight in row_weights]
    weights = [weight if math.isfinite(weight) else 0.0 for weight in weights]
    return _solution(matrix, gram, clean, loss, weights, row_weights, scales)
