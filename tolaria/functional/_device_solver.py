"""The ``[n, n]`` part of aggregation as tensor operations, for any device and under ``torch.func`` or compile.

Everything here works on the Gram matrix and per-objective vectors without reading a
value back to the host and without branching on tensor data, so it runs on
accelerators without synchronising and under ``torch.vmap`` and
``torch.compile(fullgraph=True)``. ``_host_solver`` computes the same results with
NumPy when the Gram matrix is a plain CPU tensor in eager mode.

PCGrad in coefficient space: every projected gradient is a linear combination of
the original ones, so write ``g_i^PC = sum_k C[i, k] g_k`` with ``C`` starting as the
identity. The inner product with an original gradient is then
``<g_i^PC, g_j> = G[j] . C[i]``, with ``G`` the Gram matrix, and the projection
``g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j`` only changes ``C[i, j]``. Each step costs
O(n) per objective, so the recursion is O(n^3) work on ``n x n`` values, done for all
objectives at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tolaria.functional._gram import GradientMatrix
from tolaria.functional._types import AggregationStats, Solution

__all__ = [
    "check_precision",
    "project_coefficients",
    "projection_targets",
    "solve_pcgrad",
    "solve_weighted",
    "statistics",
]


def check_precision(matrix: GradientMatrix, gram: Tensor) -> tuple[Tensor, Tensor]:
    """Return the Gram matrix with non-finite entries set to 0, and a 0-d bool tensor: may it be inexact?

    The flag is set when a squared norm (a diagonal entry) is not finite: it overflowed,
    or an input was not finite. By the Cauchy-Schwarz inequality the other entries are
    then finite too, except within rounding of the overflow threshold, which is flagged
    as well. Without rescaling the flag is also set when a squared norm is below
    ``underflow_floor`` (about ``d * 2**-129`` for float32), where underflow may have
    cost more than ``2**-20`` of it. That includes a squared norm of exactly 0: a zero
    gradient looks the same as one whose squares all underflowed (float32 entries below
    about ``2**-75``), so only gradients that are ``None`` in every leaf are known zeros.
    """
    clean = gram.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    diagonal = gram.diagonal()
    # NaN fails both comparisons, so a NaN squared norm is flagged too.
    in_range = (diagonal >= matrix.underflow_floor) & (diagonal <= matrix.overflow_ceiling)
    if matrix.absent:
        absent = torch.zeros(matrix.objectives, dtype=torch.bool, device=gram.device)
        absent[list(matrix.absent)] = True
        in_range = in_range | (absent & (diagonal == 0))
    return clean, ~in_range.all()


def projection_targets(matrix: GradientMatrix, gram: Tensor, eps: float) -> Tensor:
    """Return ``[n]`` bools: may objective ``j`` be projected onto (``||g_j|| > eps * max_k ||g_k||``)?"""
    diagonal = gram.diagonal()
    if eps == 0.0:
        return diagonal > 0
    # Compare in log2 space so that unscaled norms that would overflow or underflow still compare correctly.
    log_norms = 0.5 * torch.log2(diagonal.clamp(min=0.0))
    if matrix.exponents is not None:
        log_norms = log_norms - matrix.exponents
    return log_norms > log_norms.max() + math.log2(eps)


def project_coefficients(gram: Tensor, orders: Tensor, targets: Tensor) -> Tensor:
    """Run Algorithm 1 of PCGrad on the Gram matrix and return the coefficients of the projected gradients.

    Args:
        gram: ``[n, n]`` Gram matrix of the original gradients, finite.
        orders: int64 ``[n, n - 1]``; row ``i`` lists the objectives that ``i`` visits, in order.
        targets: bool ``[n]``; objective ``j`` is used as a projection target only where
            ``targets[j]`` is true (false for zero gradients).

    Returns:
        ``C`` of shape ``[n, n]`` and ``gram``'s dtype with ``g_i^PC = sum_k C[i, k] g_k``.
    """
    count = gram.shape[0]
    everyone = torch.arange(count, device=gram.device)
    visits = orders.to(gram.device).T  # [n - 1, n]: visits[t, i] is the objective that i visits at step t
    selectors = visits.unsqueeze(-1) == everyone  # one-hot [n - 1, n, n]
    rows = gram[visits]  # rows[t, i] = G[visits[t, i]]

    # A step never visits i itself (orders that were not checked, under torch.compile, may
    # ask for it), nor a target that is switched off: both get a zero inverse, which turns
    # the step into a no-op without data-dependent branching.
    allowed = targets[visits] & (visits != everyone)
    inverse = torch.where(allowed, gram.diagonal()[visits].reciprocal(), 0.0)

    coefficients = (everyone.unsqueeze(1) == everyone).to(gram.dtype)  # the identity
    for step in range(count - 1):
        inner = torch.linalg.vecdot(rows[step], coefficients)  # <g_i^PC, g_j> for every i
        # Only a negative inner product (a conflict) projects: clamp(max=0) zeroes the rest.
        amount = inner.clamp(max=0.0) * inverse[step]
        coefficients = torch.addcmul(coefficients, amount.unsqueeze(-1), selectors[step], value=-1.0)
    return coefficients


def _unscale(matrix: GradientMatrix, values: Tensor) -> Tensor:
    """Map per-objective ``values`` ([n]) from the scaled rows back to the original gradients: ``values * 2**-e``."""
    if matrix.exponents is None:
        return values
    return values * torch.exp2(-matrix.exponents)


def statistics(
    matrix: GradientMatrix, raw: Tensor, clean: Tensor, precision_loss: Tensor, weights: Tensor
) -> AggregationStats:
    """Compute the diagnostics from the raw and the cleaned (finite) Gram matrix of the stored rows."""
    count = matrix.objectives

    # Norms come from the raw diagonal, so that one that overflowed reads inf rather than 0.
    norms = _unscale(matrix, raw.diagonal().sqrt())

    # 1 / ||g_k||, and 0 for a zero gradient (rsqrt(0) = inf). Multiplying by one inverse
    # norm at a time, rather than by their outer product, keeps unscaled values in range.
    inverse_norms = clean.diagonal().rsqrt().nan_to_num(nan=0.0, posinf=0.0)
    cosine = (clean * inverse_norms.unsqueeze(1) * inverse_norms.unsqueeze(0)).clamp(-1.0, 1.0)

    conflicts = (clean < 0).triu(diagonal=1).sum()
    # With n <= 1 there are no pairs and no conflicts, and the ratio is 0.
    ratio = conflicts.to(clean.dtype) / max(count * (count - 1) // 2, 1)
    return AggregationStats(conflicts, ratio, cosine, norms, weights, precision_loss)


def solve_weighted(matrix: GradientMatrix, raw: Tensor, weights: Tensor) -> Solution:
    """Combine the objectives with fixed ``weights`` ([n], on the Gram matrix's device and dtype)."""
    clean, precision_loss = check_precision(matrix, raw)
    row_weights = _unscale(matrix, weights)
    return Solution(row_weights, statistics(matrix, raw, clean, precision_loss, weights))


def solve_pcgrad(matrix: GradientMatrix, raw: Tensor, orders: Tensor, *, eps: float, mean: bool) -> Solution:
    """Combine the objectives with PCGrad; ``orders`` is int64 ``[n, n - 1]``."""
    clean, precision_loss = check_precision(matrix, raw)
    coefficients = project_coefficients(clean, orders, projection_targets(matrix, clean, eps))
    if matrix.exponents is None:
        # Only a Gram matrix flagged in precision_loss can make a coefficient overflow; keep the result finite then.
        coefficients = coefficients.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    if mean:
        coefficients = coefficients / matrix.objectives

    # Row i of the recursion ran on scaled rows, so g_i^PC = 2**-e[i] sum_k C[i, k] (2**e[k] g_k):
    # the coefficient of stored row k is sum_i 2**-e[i] C[i, k], and that of g_k is 2**e[k] times it.
    if matrix.exponents is None:
        row_weights = coefficients.sum(dim=0)
        effective = row_weights
    else:
        inverse_scales = torch.exp2(-matrix.exponents)
        row_weights = inverse_scales @ coefficients
        effective = row_weights / inverse_scales
    return Solution(row_weights, statistics(matrix, raw, clean, precision_loss, effective))
