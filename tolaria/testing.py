"""Test helpers for code that handles gradient pytrees: hypothesis strategies and a reference PCGrad.

The strategies build small pytrees (nested dicts, lists and tuples) of CPU tensors
of chosen shapes and dtypes, and sets of ``n`` such trees with one structure, as the
aggregators in ``tolaria.functional.aggregation`` take them. Use them to
property-test your own gradient code::

    from hypothesis import given
    from tolaria.testing import gradient_sets

    @given(gradient_sets(n=3))
    def test_my_aggregator_keeps_structure(grads): ...

``pcgrad_reference`` is Algorithm 1 of PCGrad written as a plain loop over flat
vectors, slow and easy to check by eye, for differential tests.

This module imports ``hypothesis``, which is in the ``test`` extra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import optree
import torch
from hypothesis import strategies as st
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "LeafSpec",
    "float_dtypes",
    "gradient_sets",
    "leaf_shapes",
    "pcgrad_reference",
    "pytrees",
    "stacked_gradients",
    "tensors",
    "tree_templates",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The floating dtypes that gradients may have."""

_KEYS = ("bias", "weight", "scale", "embedding", "head")

_DEFAULT_ELEMENTS = st.floats(
    min_value=-8.0, max_value=8.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=16
)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Shape and dtype of one tensor leaf in a tree template (an optree leaf, not a node)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def float_dtypes(dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> st.SearchStrategy[torch.dtype]:
    """Draw one of ``dtypes`` (default: float16, bfloat16, float32 and float64)."""
    return st.sampled_from(tuple(dtypes))


def leaf_shapes(
    *, max_dims: int = 3, max_side: int = 3, allow_empty: bool = True
) -> st.SearchStrategy[tuple[int, ...]]:
    """Draw a tensor shape with up to ``max_dims`` dimensions (0-d included) of up to ``max_side`` each.

    With ``allow_empty`` a side may be 0, which gives a zero-element tensor.
    """
    side = st.integers(min_value=0 if allow_empty else 1, max_value=max_side)
    return st.lists(side, min_size=0, max_size=max_dims).map(tuple)


def tensors(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    elements: st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[Tensor]:
    """Draw a CPU tensor of ``shape`` and ``dtype`` whose values come from ``elements``.

    The default elements are finite float16-representable numbers in ``[-8, 8]``; the
    values are rounded to ``dtype`` (bfloat16 keeps fewer mantissa bits than float16).
    """
    numel = 1
    for side in shape:
        numel *= side
    values = st.lists(_DEFAULT_ELEMENTS if elements is None else elements, min_size=numel, max_size=numel)
    return values.map(lambda drawn: torch.tensor(drawn, dtype=torch.float64).reshape(shape).to(dtype))


def tree_templates(leaves: st.SearchStrategy[LeafSpec] | None = None, *, max_leaves: int = 4) -> st.SearchStrategy[Any]:
    """Draw a pytree of ``LeafSpec`` leaves nested in dicts, lists and tuples, with up to ``max_leaves`` leaves."""
    base = st.builds(LeafSpec, leaf_shapes(), float_dtypes()) if leaves is None else leaves

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.dictionaries(st.sampled_from(_KEYS), children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
        )

    return st.recursive(base, extend, max_leaves=max_leaves)


def _template_leaves(template: Any) -> tuple[list[LeafSpec], optree.PyTreeSpec]:
    specs, treespec = optree.tree_flatten(template)
    return specs, treespec


@st.composite
def pytrees(
    draw: st.DrawFn,
    template: st.SearchStrategy[Any] | None = None,
    *,
    elements: st.SearchStrategy[float] | None = None,
    none_leaves: bool = False,
) -> Any:
    """Draw one pytree of CPU tensors shaped by a ``tree_templates`` template.

    With ``none_leaves`` some leaves are ``None`` in place of a tensor.
    """
    specs, treespec = _template_leaves(draw(tree_templates() if template is None else template))
    leaves: list[Tensor | None] = []
    for spec in specs:
        if none_leaves and draw(st.booleans()):
            leaves.append(None)
        else:
            leaves.append(draw(tensors(spec.shape, spec.dtype, elements=elements)))
    return optree.tree_unflatten(treespec, leaves)


def _count(draw: st.DrawFn, n: int | st.SearchStrategy[int]) -> int:
    return n if isinstance(n, int) else draw(n)


@st.composite
def gradient_sets(
    draw: st.DrawFn,
    n: int | st.SearchStrategy[int] = st.integers(min_value=1, max_value=4),  # noqa: B008
    template: st.SearchStrategy[Any] | None = None,
    *,
    elements: st.SearchStrategy[float] | None = None,
    none_leaves: bool = False,
) -> list[Any]:
    """Draw ``n`` gradient pytrees with one structure, leaf shapes and dtypes, as the aggregators take them.

    Args:
        n: the number of objectives, or a strategy for it (default 1 to 4).
        template: a strategy for the tree template (default ``tree_templates()``).
        elements: a strategy for the tensor values (default finite numbers in ``[-8, 8]``).
        none_leaves: let a leaf be ``None`` in some objectives (a parameter that the
            objective does not use) or in all of them.
    """
    count = _count(draw, n)
    specs, treespec = _template_leaves(draw(tree_templates() if template is None else template))
    trees: list[list[Tensor | None]] = [[] for _ in range(count)]
    for spec in specs:
        for objective in range(count):
            if none_leaves and draw(st.booleans()):
                trees[objective].append(None)
            else:
                trees[objective].append(draw(tensors(spec.shape, spec.dtype, elements=elements)))
    return [optree.tree_unflatten(treespec, leaves) for leaves in trees]


@st.composite
def stacked_gradients(
    draw: st.DrawFn,
    n: int | st.SearchStrategy[int] = st.integers(min_value=1, max_value=4),  # noqa: B008
    template: st.SearchStrategy[Any] | None = None,
    *,
    elements: st.SearchStrategy[float] | None = None,
) -> Any:
    """Draw one stacked gradient pytree: every leaf has shape ``[n, *shape]``, as ``torch.func.jacrev`` returns."""
    count = _count(draw, n)
    specs, treespec = _template_leaves(draw(tree_templates() if template is None else template))
    leaves = [draw(tensors((count, *spec.shape), spec.dtype, elements=elements)) for spec in specs]
    return optree.tree_unflatten(treespec, leaves)


def pcgrad_reference(grads: Sequence[Tensor], orders: Tensor, *, reduction: str = "sum") -> Tensor:
    """Compute PCGrad by Algorithm 1 of Yu et al. (2020), as a plain loop over 1-D gradients.

    For each objective ``i``, visit ``orders[i]`` in turn. Whenever the projected
    gradient conflicts with an original gradient ``g_j`` (a negative inner product),
    remove its component along ``g_j``. Return the sum (or mean) of the projected
    gradients, in the dtype of ``grads``.

    Args:
        grads: ``n`` 1-D tensors of one length, dtype and device.
        orders: int64 ``[n, n - 1]``; row ``i`` is the order in which ``i`` visits the others.
        reduction: ``"sum"`` or ``"mean"``.
    """
    projected = []
    for i, gradient in enumerate(grads):
        current = gradient.clone()
        for j in orders[i].tolist():
            other = grads[j]
            inner = torch.dot(current, other)
            if inner < 0:
                current = current - inner / torch.dot(other, other) * other
        projected.append(current)
    total = torch.stack(projected).sum(dim=0)
    return total / len(grads) if reduction == "mean" else total
