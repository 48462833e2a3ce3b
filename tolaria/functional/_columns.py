"""Large leaves of a gradient sequence used in place, without copying them into the ``[n, d]`` matrix.

For the sequence form, ``_gram.from_columns`` copies the ``n`` trees into ``[n, width]``
blocks. On the CPU that copy can cost more than the rest of the aggregation: at
``n = 2`` and ``d = 1e6`` float32 it reads and writes 8 MB per call, about half a
millisecond. So when the host solver will run, each leaf of at least ``MIN_NUMEL``
elements can stay where it is, as a ``Column`` of ``n`` flat views:

* Its Gram entries are ``torch.dot`` products of the views, ``n (n + 1) / 2`` per
  column chunk, all read back with one ``torch.stack`` and summed in float64.
* Its share of the combination is ``n`` foreach operations (``torch._foreach_mul``,
  then ``torch._foreach_add_``, the kernels that ``torch.optim`` uses), each over every
  column at once.

The products read each view ``n`` times, mostly from the CPU caches, and cost a
dispatch each, while the copy reads and writes each element once. So the copy wins
for small gradients and many objectives, and ``select`` keeps the leaves in place only
where they are large enough (see ``NUMEL_PER_OBJECTIVE`` and ``LARGE_COPY_BYTES``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tolaria.functional._checks import outside_transforms, without_autograd
from tolaria.functional._pytree import LeafSlot

__all__ = [
    "LARGE_COPY_BYTES",
    "MAX_OBJECTIVES",
    "MIN_NUMEL",
    "NUMEL_PER_OBJECTIVE",
    "Column",
    "add_products",
    "combine",
    "select",
    "stacked_rows",
]

MAX_OBJECTIVES = 16
"""Maximum number of objectives for leaves used in place: the host solver's limit."""

MIN_NUMEL = 4096
"""Minimum size of a leaf used in place. Smaller leaves cost more in dispatch than their copy."""

NUMEL_PER_OBJECTIVE = 1 << 16
"""Per-objective share of the size rule: the leaves used in place hold ``n`` times this many elements or more.

The dot products per chunk grow as ``n**2`` and the copy as ``n``. This was measured on
two CPU cores with torch 2.13 (float32, four leaves). The copy and the leaves in place
took the same time at about 1e5 elements per objective for two objectives, 2e5 for
four and 3e5 for eight. Beyond that the leaves in place were faster.
"""

LARGE_COPY_BYTES = 32 << 20
"""Copy size above which the leaves are used in place, whatever the size rule says.

glibc maps a block above 32 MiB afresh at every allocation (``DEFAULT_MMAP_THRESHOLD_MAX``
on 64-bit systems), so such a copy also pays a page fault per 4 KiB page. With sixteen
objectives the copy was 15% faster at 5e5 elements per objective (a 30.5 MiB block),
and the leaves in place were 2.3x faster at 7e5 (43 MiB).
"""

_DTYPES = (torch.float32, torch.float64)


class Column(NamedTuple):
    """One leaf of a gradient sequence, used in place."""

    rows: tuple[Tensor, ...]
    """``n`` 1-D tensors of ``slot.numel`` elements: objective ``k``'s gradient of this leaf, flattened."""
    slot: LeafSlot


def _usable(columns: Sequence[Sequence[Tensor | None]], count: int, rescale: bool) -> bool:
    """Return whether the host solver will take these leaves as they are: plain CPU float32/float64 tensors."""
    if count > MAX_OBJECTIVES or rescale or not outside_transforms():
        return False
    present = [leaf for column in columns for leaf in column if leaf is not None]
    if any(leaf.device.type != "cpu" or leaf.dtype not in _DTYPES for leaf in present):
        return False
    return without_autograd(present)


def select(columns: Sequence[Sequence[Tensor | None]], count: int, *, rescale: bool) -> tuple[Column, ...]:
    """Return the leaves of validated sequence ``columns[leaf][objective]`` that can be used in place.

    These are the leaves of ``MIN_NUMEL`` or more elements that no objective leaves
    ``None``. The result is empty when those leaves are too small together: fewer than
    ``n * NUMEL_PER_OBJECTIVE`` elements per objective, and a copy of at most
    ``LARGE_COPY_BYTES``. It is also empty when the host solver would not run. That is
    the case for a leaf on an accelerator, in float16 or bfloat16, or with autograd
    history while gradients are recorded. It is also the case with ``rescale`` set,
    with more than ``MAX_OBJECTIVES`` objectives, and under ``torch.compile`` or a
    ``torch.func`` transform.
    """
    if not _usable(columns, count, rescale):
        return ()
    positions = []
    numel = 0
    nbytes = 0
    for position, column in enumerate(columns):
        first = column[0]
        if first is not None and first.numel() >= MIN_NUMEL and all(leaf is not None for leaf in column):
            positions.append(position)
            numel += first.numel()
            nbytes += first.numel() * first.element_size()
    if numel < count * NUMEL_PER_OBJECTIVE and count * nbytes <= LARGE_COPY_BYTES:
        return ()
    selected = []
    for position in positions:
        leaves = [leaf for leaf in columns[position] if leaf is not None]
        first = leaves[0]
        rows = tuple(leaf.reshape(-1) for leaf in leaves)
        selected.append(Column(rows, LeafSlot(position, 0, first.shape, first.dtype, first.device)))
    return tuple(selected)


def add_products(total: list[list[float]], columns: Sequence[Column], chunk_numel: int) -> None:
    """Add every column's ``G[i, k] = <g_i, g_k>`` to ``total``, in chunks of ``chunk_numel`` elements."""
    count = len(total)
    pairs = [(i, k) for i in range(count) for k in range(i + 1)]
    products: list[Tensor] = []
    for column in columns:
        numel = column.slot.numel
        for start in range(0, numel, chunk_numel):
            width = min(chunk_numel, numel - start)
            rows = column.rows if width == numel else [row.narrow(0, start, width) for row in column.rows]
            products.extend(torch.dot(rows[i], rows[k]) for i, k in pairs)

    # One read-back for every product. Each chunk's product is rounded in its dtype, and Python sums them in float64.
    for index, value in enumerate(torch.stack(products).tolist()):
        i, k = pairs[index % len(pairs)]
        total[i][k] += value
        if k != i:
            total[k][i] += value


def combine(columns: Sequence[Column], weights: Sequence[float], leaves: list[Tensor | None]) -> None:
    """Set ``leaves[position]`` to ``sum_k weights[k] g_k`` for every column, with the leaf's shape and dtype."""
    results = torch._foreach_mul([column.rows[0] for column in columns], weights[0])
    for k in range(1, len(weights)):
        torch._foreach_add_(results, [column.rows[k] for column in columns], alpha=weights[k])
    for column, flat in zip(columns, results, strict=True):
        leaves[column.slot.position] = flat.view(column.slot.shape)


def stacked_rows(column: Column) -> Tensor:
    """Return the column as an ``[n, numel]`` copy, for the tensor path (weights with autograd history)."""
    return torch.stack(column.rows)
