"""Combine per-objective gradients into one: PCGrad, weighted sum, mean and sum, over pytrees.

Every aggregator takes the gradients in one of two forms:

* a sequence of ``n`` gradient pytrees with identical structure, one per objective.
  The leaves are copied once into an ``[n, d]`` matrix, with one ``torch.cat`` per
  device and dtype. On the host path, large float32 and float64 leaves are used
  in place instead (see ``docs/aggregation.md``).
* With ``stacked=True``, one pytree whose leaves carry a leading objective axis,
  shape ``[n, *parameter_shape]``, as ``torch.func.jacrev`` or ``torch.vmap`` produce.
  The tree is never split into ``n`` trees: each large leaf is used in place as an
  ``[n, numel]`` view, and only leaves below 4096 elements per objective are copied.

A ``None`` leaf in some objectives stands for zeros (a parameter that objective does
not use); a leaf that is ``None`` in every objective stays ``None`` in the result.
Each aggregator returns an ``Aggregate(grad, stats)``: ``grad`` has the structure of
one gradient pytree and each leaf keeps its dtype and device, and ``stats`` holds
tensors on the device of the first tensor leaf.

The functions are pure. They never mutate their inputs and never touch a global
RNG. The ``[n, d]`` work (the Gram matrix and the final combination) is always done
with tensor operations on the gradients' devices. The ``[n, n]`` work in between
runs on Python floats when the Gram matrix is on the CPU and the gradients are plain
tensors in eager mode (there reading it costs no device synchronisation, and it is
several times faster than dispatching dozens of tiny tensor operations); everywhere else (accelerators,
``torch.vmap`` and other ``torch.func`` transforms, ``torch.compile``, inputs with
autograd history) it runs as tensor operations that never read a value back to the
host and never branch on tensor data, so the functions work under ``torch.vmap`` and
``torch.compile(fullgraph=True)``. The argument checks read metadata, plus the values
of ``orders`` and ``weights`` in eager mode. Under ``torch.compile`` pass PCGrad's
``orders`` (from ``pcgrad_orders``, called outside the compiled function) rather
than a ``seed``.

Precision: float16 and bfloat16 leaves are always rescaled per objective by a power
of two and combined in float32. float32 and float64 leaves are used as they are
unless ``rescale=True``; ``stats.precision_loss`` reports when a squared norm left
the dtype's range. See ``docs/aggregation.md`` for the maths and the tolerances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import optree
import torch
from torch import Tensor

from tolaria.functional import _device_solver, _gram, _host_solver
from tolaria.functional._checks import (
    can_read_values,
    check_eps,
    check_orders,
    check_reduction,
    check_seed,
    to_weight_tensor,
)
from tolaria.functional._gram import GradientMatrix
from tolaria.functional._orders import draw_orders, pcgrad_orders
from tolaria.functional._pytree import (
    RavelSpec,
    flatten_sequence,
    flatten_stacked,
    ravel_pytree,
    unravel_pytree,
)
from tolaria.functional._types import Aggregate, AggregationStats, Solution

__all__ = [
    "AGGREGATOR_NAMES",
    "Aggregate",
    "AggregationStats",
    "Aggregator",
    "RavelSpec",
    "get",
    "mean_grads",
    "pcgrad",
    "pcgrad_orders",
    "ravel_pytree",
    "sum_grads",
    "unravel_pytree",
    "weighted",
]

Aggregator = Callable[..., Aggregate]
"""An aggregation function: ``aggregator(grads, *, stacked=False, **options) -> Aggregate``."""


class _Prepared(NamedTuple):
    treespec: optree.PyTreeSpec
    matrix: GradientMatrix
    single: list[Tensor | None]
    """The leaves of the only objective when ``n = 1`` (views for a stacked tree), else empty."""


def _prepare(grads: object, *, stacked: bool, rescale: bool) -> _Prepared:
    """Validate ``grads`` in either form and build its gradient matrix."""
    if stacked:
        flat = flatten_stacked(grads)
        matrix = _gram.from_stacked(flat.leaves, flat.objectives, rescale=rescale, metas=flat.metas)
        single: list[Tensor | None] = []
        if flat.objectives == 1:
            single = [None if leaf is None else leaf[0] for leaf in flat.leaves]
        return _Prepared(flat.treespec, matrix, single)
    treespec, columns = flatten_sequence(grads)
    matrix = _gram.from_columns(columns, len(columns[0]), rescale=rescale)
    single = [column[0] for column in columns] if matrix.objectives == 1 else []
    return _Prepared(treespec, matrix, single)


def _aggregate(prepared: _Prepared, solution: Solution) -> Aggregate:
    leaves = _gram.combine_rows(prepared.matrix, solution.row_weights, plain=solution.on_host)
    return Aggregate(optree.tree_unflatten(prepared.treespec, leaves), solution.stats)


def _solve_fixed(matrix: GradientMatrix, weights: Tensor | Sequence[float]) -> Solution:
    """Solve for fixed weights (a tensor, or floats) with the host solver where it can run, else on the device."""
    # Weights with autograd history (learned weights) stay tensors, so the result keeps their graph.
    readable = not isinstance(weights, Tensor) or (can_read_values(weights) and not weights.requires_grad)
    if readable and _host_solver.eligible(matrix):
        values = weights.tolist() if isinstance(weights, Tensor) else list(weights)
        return _host_solver.solve_weighted(matrix, _gram.host_gram(matrix), values)
    raw = _gram.gram_matrix(matrix)
    if isinstance(weights, Tensor):
        tensor = weights.to(raw.device, raw.dtype)
    else:
        tensor = torch.tensor(weights, dtype=raw.dtype, device=raw.device)
    return _device_solver.solve_weighted(matrix, raw, tensor)


def sum_grads(grads: object, *, rescale: bool = False, stacked: bool = False) -> Aggregate:
    """Sum the objectives' gradients: ``grad = sum_k g_k``.

    Args:
        grads: ``n`` gradient pytrees, or one stacked pytree with ``stacked=True``.
        rescale: rescale float32/float64 rows by powers of two before the Gram matrix,
            so that the statistics stay exact for extreme norms (two extra reads of the
            gradients and a scaled copy).
        stacked: ``grads`` is one pytree with leaves of shape ``[n, *parameter_shape]``.

    Raises:
        TypeError, ValueError: see ``pcgrad``.
    """
    prepared = _prepare(grads, stacked=stacked, rescale=rescale)
    count = prepared.matrix.objectives
    return _aggregate(prepared, _solve_fixed(prepared.matrix, [1.0] * count))


def mean_grads(grads: object, *, rescale: bool = False, stacked: bool = False) -> Aggregate:
    """Average the objectives' gradients: ``grad = (1 / n) sum_k g_k``. Arguments as for ``sum_grads``."""
    prepared = _prepare(grads, stacked=stacked, rescale=rescale)
    count = prepared.matrix.objectives
    return _aggregate(prepared, _solve_fixed(prepared.matrix, [1.0 / count] * count))


def weighted(
    grads: object, weights: object, *, normalize: bool = True, rescale: bool = False, stacked: bool = False
) -> Aggregate:
    """Combine the objectives' gradients with fixed weights: ``grad = sum_k w[k] g_k``.

    Args:
        grads: ``n`` gradient pytrees, or one stacked pytree with ``stacked=True``.
        weights: ``n`` non-negative finite numbers, as a sequence or a 1-D tensor on any
            device; they are moved to each leaf's device. A CPU tensor or a sequence avoids
            a device synchronisation for the value check.
        normalize: divide the weights by their sum, so ``grad`` is a weighted mean.
        rescale, stacked: as for ``sum_grads``.

    float16 and bfloat16 leaves are accumulated in float32 and cast back.

    Raises:
        TypeError: ``weights`` is not a sequence of numbers or a real tensor.
        ValueError: ``weights`` has the wrong length or shape, a non-finite or negative
            value, or (with ``normalize=True``) a zero sum; and see ``pcgrad``.
    """
    prepared = _prepare(grads, stacked=stacked, rescale=rescale)
    matrix = prepared.matrix
    tensor = to_weight_tensor(weights, matrix.objectives, normalize=normalize)
    if normalize:
        tensor = tensor / tensor.sum()
    return _aggregate(prepared, _solve_fixed(matrix, tensor))


def _check_randomness(seed: int | None, orders: Tensor | None, count: int) -> int | Tensor:
    """Return the checked ``orders`` tensor, or the checked ``seed`` to draw them from."""
    if orders is not None:
        if seed is not None:
            raise ValueError("pcgrad got both seed and orders; pass only one of them")
        return check_orders(orders, count)
    if seed is None:
        raise ValueError(
            "pcgrad needs explicit randomness: pass seed=<int> to draw the visit orders, or orders=<int64 tensor "
            f"[n, n - 1] = [{count}, {count - 1}]>; the global RNG is never used"
        )
    return check_seed(seed)


def _solve_pcgrad(matrix: GradientMatrix, randomness: int | Tensor, *, eps: float, mean: bool) -> Solution:
    count = matrix.objectives
    readable = not isinstance(randomness, Tensor) or can_read_values(randomness)
    if readable and _host_solver.eligible(matrix):
        orders = randomness.tolist() if isinstance(randomness, Tensor) else draw_orders(count, randomness)
        return _host_solver.solve_pcgrad(matrix, _gram.host_gram(matrix), orders, eps=eps, mean=mean)
    raw = _gram.gram_matrix(matrix)
    if isinstance(randomness, Tensor):
        device_orders = randomness
    else:
        device_orders = pcgrad_orders(count, randomness, device=raw.device)
    return _device_solver.solve_pcgrad(matrix, raw, device_orders, eps=eps, mean=mean)


def pcgrad(
    grads: object,
    *,
    seed: int | None = None,
    orders: Tensor | None = None,
    reduction: str = "sum",
    eps: float = 0.0,
    rescale: bool = False,
    stacked: bool = False,
) -> Aggregate:
    """Combine the objectives' gradients with PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

    For each objective ``i``, the other objectives ``j`` are visited in the order
    ``orders[i]``. Whenever ``<g_i^PC, g_j> < 0`` with ``g_j`` the original gradient,
    ``g_i^PC`` is projected onto the normal plane of ``g_j``:
    ``g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j``. The result is ``sum_i g_i^PC``
    (``reduction="mean"`` divides by ``n``). The work is one ``[n, n]`` Gram matrix, an
    O(n^3) recursion on ``n x n`` coefficients and one ``(1 x n) @ [n, d]`` combination.
    With ``n = 1`` the gradient is returned unchanged: for a sequence the result's
    leaves are the input tensors themselves, for a stacked tree they are views.

    Args:
        grads: ``n`` gradient pytrees, or one stacked pytree with ``stacked=True``.
        seed: an int in ``[0, 2**64 - 1]`` from which a local generator draws the visit
            orders (see ``pcgrad_orders``).
        orders: int64 ``[n, n - 1]``, row ``i`` a permutation of every objective but ``i``.
            Exactly one of ``seed`` and ``orders`` must be given.
        reduction: ``"sum"`` or ``"mean"``.
        eps: ``g_j`` is skipped as a projection target when ``||g_j|| <= eps * max_k ||g_k||``.
            The default 0 skips only exact zero gradients, as Algorithm 1 does.
        rescale: rescale float32/float64 rows by powers of two before the Gram matrix, so
            that squared norms outside the dtype's range stay exact (two extra reads of
            the gradients and a scaled copy). float16 and bfloat16 rows are always rescaled.
        stacked: ``grads`` is one pytree with leaves of shape ``[n, *parameter_shape]``.

    Raises:
        TypeError: ``grads`` is not a sequence (or is a single tensor), a leaf is neither
            ``None`` nor a floating-point tensor, ``seed`` is not an int or ``orders`` is not
            an int64 tensor.
        ValueError: ``grads`` is empty or has no tensor leaf, the trees differ in structure,
            one leaf differs in shape, dtype or device across objectives, neither or both of
            ``seed`` and ``orders`` are given, ``orders`` has the wrong shape or a row that is
            not a permutation of the other objectives, or ``reduction`` or ``eps`` is invalid.
    """
    check_reduction(reduction)
    eps = check_eps(eps)
    prepared = _prepare(grads, stacked=stacked, rescale=rescale)
    matrix = prepared.matrix
    randomness = _check_randomness(seed, orders, matrix.objectives)

    if matrix.objectives == 1:
        stats = _solve_fixed(matrix, [1.0]).stats
        return Aggregate(optree.tree_unflatten(prepared.treespec, prepared.single), stats)
    return _aggregate(prepared, _solve_pcgrad(matrix, randomness, eps=eps, mean=reduction == "mean"))


AGGREGATOR_NAMES = ("sum", "mean", "weighted", "pcgrad")
"""The names that ``get`` accepts."""

_AGGREGATORS: dict[str, Aggregator] = {
    "sum": sum_grads,
    "mean": mean_grads,
    "weighted": weighted,
    "pcgrad": pcgrad,
}


def get(name: str) -> Aggregator:
    """Return the aggregation function called ``name``: ``"sum"``, ``"mean"``, ``"weighted"`` or ``"pcgrad"``.

    Raises:
        ValueError: ``name`` is not one of those.
    """
    aggregator = _AGGREGATORS.get(name) if isinstance(name, str) else None
    if aggregator is None:
        raise ValueError(f"unknown aggregator {name!r}; expected one of {', '.join(AGGREGATOR_NAMES)}")
    return aggregator
