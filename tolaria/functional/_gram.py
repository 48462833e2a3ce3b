"""The ``[n, d]`` gradient matrix behind every aggregator: its blocks, Gram matrix and final combination.

Row ``k`` of the matrix is objective ``k``'s gradient, raveled. The matrix is kept
as a list of column blocks, so that it never has to exist as one tensor:

* A sequence of gradient pytrees is copied once, with one ``torch.cat`` per
  (device, dtype) group, into ``[n, width]`` blocks. A one-objective sequence and a
  stacked pytree need no copy: each large leaf, reshaped to ``[n, numel]``, is its
  own block, and only the small leaves are copied into a shared block.
* The Gram matrix is the sum of the blocks' ``B @ B.T``, in column chunks on the
  CPU: one tensor from ``gram_matrix``, or Python floats from ``host_gram``. A
  combination ``u @ M`` is done block by block and split back into leaves.

Precision. Without rescaling, blocks keep their dtype and the products run in it
(float32 or float64), which is the fastest path. When a squared norm
leaves the dtype's range the Gram matrix has an ``inf`` or loses its low bits, and
the solvers' precision check reports it. With rescaling (always for float16 and bfloat16
leaves), row ``k`` is multiplied by ``2**e[k]`` so that its largest magnitude lies in
``[1, 2)`` and the blocks are stored in float32 (float64 if any leaf is float64).
Multiplying by a power of two is exact, squared norms then lie in ``[1, 4 d]`` (down
to ``2**-46`` for a float32 row whose largest entry is subnormal), and every result
is mapped back exactly by ``2**-e[k]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tolaria.functional import _columns
from tolaria.functional._columns import Column
from tolaria.functional._pytree import LeafSlot, StackedMeta

__all__ = [
    "HALF_DTYPES",
    "Block",
    "GradientMatrix",
    "combine_rows",
    "from_columns",
    "from_stacked",
    "gram_matrix",
    "host_gram",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""Leaf dtypes that are always rescaled and combined in float32."""

WIDE_BLOCK_NUMEL = 32768
"""CPU blocks at least this wide get their Gram entries from matrix-vector products (see ``host_gram``)."""

TRIANGLE_MAX_OBJECTIVES = 3
"""Above this many objectives ``torch.mm`` beats ``n`` matrix-vector products for the Gram matrix."""

GRAM_CHUNK_NUMEL = 1 << 18
"""Column chunk of the products in ``host_gram``, which bounds their rounding error."""

SHARED_BUFFER_NUMEL = 1 << 18
"""From this many elements per objective, plain eager results share one buffer per group (see ``combine_rows``)."""

SHARED_BUFFER_MAX_BYTES = 16 << 20
"""Largest shared result buffer: half of the 32 MiB ceiling of glibc's dynamic mmap threshold (see ``combine_rows``)."""

SMALL_LEAF_NUMEL = 4096
"""Stacked leaves with fewer elements per objective are copied into a shared block rather than used in place."""

_UNDERFLOW_MARGIN = 2.0**20
"""A squared norm within this factor of ``d`` subnormal units may have lost more than 2**-20 of its value."""


class Block(NamedTuple):
    """A column block ``[n, width]`` of the gradient matrix and the leaves stored in it."""

    matrix: Tensor
    slots: tuple[LeafSlot, ...]
    """The leaves in this block; ``LeafSlot.offset`` is the first column of the leaf."""


class GradientMatrix(NamedTuple):
    """The ``[n, d]`` matrix of raveled gradients, kept as column blocks."""

    blocks: tuple[Block, ...]
    objectives: int
    """Number of objectives ``n``."""
    leaf_count: int
    """Number of flattened leaves, ``None`` leaves included."""
    numel: int
    """Number of gradient elements per objective ``d``."""
    home: torch.device
    """Device of the ``[n, n]`` Gram matrix and of the coefficients: the first tensor leaf's device."""
    gram_dtype: torch.dtype
    """float64 if any leaf is float64, else float32."""
    exponents: Tensor | None
    """``[n]`` floats on ``home``: row ``k`` was multiplied by ``2**exponents[k]``; ``None`` when not rescaled."""
    underflow_floor: float
    """A diagonal Gram entry below this may have lost precision to underflow (0 when rescaled)."""
    overflow_ceiling: float
    """A diagonal Gram entry above this may have overflowed, here or in an off-diagonal entry."""
    absent: tuple[int, ...] = ()
    """Objectives whose every leaf is ``None``: known zero gradients, whatever the precision."""
    columns: tuple[Column, ...] = ()
    """Leaves of a gradient sequence used in place rather than copied into a block (see ``_columns``)."""


def _range_limits(dtypes: set[torch.dtype], numel: int) -> tuple[float, float]:
    """Return the squared-norm range in which an unrescaled Gram matrix of these dtypes is accurate."""
    narrowest = torch.finfo(torch.float32 if torch.float32 in dtypes else torch.float64)
    # Each of the d products in a squared norm can lose up to one subnormal unit of the narrowest dtype.
    floor = numel * narrowest.smallest_normal * narrowest.eps * _UNDERFLOW_MARGIN
    # Below max / 4 no partial sum of an off-diagonal entry can overflow (Cauchy-Schwarz, with margin for rounding).
    return floor, narrowest.max / 4


def _zeros_for(slot: LeafSlot) -> Tensor:
    return torch.zeros(slot.numel, dtype=slot.dtype, device=slot.device)


LeafMeta = tuple[torch.Size, torch.dtype, torch.device]
"""Shape, dtype and device of one parameter's gradient."""

_GroupKey = tuple[torch.device, torch.dtype]


def _group(metas: Sequence[LeafMeta | None]) -> list[list[tuple[int, LeafMeta]]]:
    """Group the tensor leaves (``None`` metadata marks a leaf without tensors) by (device, dtype)."""
    groups: dict[_GroupKey, list[tuple[int, LeafMeta]]] = {}
    for position, meta in enumerate(metas):
        if meta is not None:
            groups.setdefault((meta[2], meta[1]), []).append((position, meta))
    return list(groups.values())


def _slots(members: Sequence[tuple[int, LeafMeta]]) -> tuple[LeafSlot, ...]:
    """Lay the leaves side by side: ``LeafSlot.offset`` is each leaf's first column in the block."""
    slots = []
    offset = 0
    for position, (shape, dtype, device) in members:
        slots.append(LeafSlot(position, offset, shape, dtype, device))
        offset += shape.numel()
    return tuple(slots)


def _width(slots: Sequence[LeafSlot]) -> int:
    return sum(slot.numel for slot in slots)


def _assemble(columns: Sequence[Sequence[Tensor | None]], slots: Sequence[LeafSlot], count: int) -> Tensor:
    """Copy one group's leaves into a ``[n, width]`` matrix with a single ``torch.cat``."""
    # Objective-major order (all leaves of objective 0, then objective 1, ...) makes the
    # concatenation a row-major [n, width] matrix, so one kernel does the whole copy.
    pieces: list[Tensor] = []
    for k in range(count):
        for slot in slots:
            leaf = columns[slot.position][k]
            pieces.append(_zeros_for(slot) if leaf is None else leaf.reshape(-1))
    return torch.cat(pieces).view(count, _width(slots))


def _finish(
    blocks: list[Block], count: int, leaf_count: int, rescale: bool, columns: tuple[Column, ...] = ()
) -> GradientMatrix:
    slots = [slot for block in blocks for slot in block.slots] + [column.slot for column in columns]
    dtypes = {slot.dtype for slot in slots}
    numel = _width(slots)
    home = slots[0].device
    gram_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    if not (rescale or any(dtype in HALF_DTYPES for dtype in dtypes)):
        floor, ceiling = _range_limits(dtypes, numel)
        return GradientMatrix(
            tuple(blocks), count, leaf_count, numel, home, gram_dtype, None, floor, ceiling, columns=columns
        )
    # Columns are only made for unscaled float32 and float64 leaves, so a rescaled matrix has none.
    exponents = _scale_exponents(blocks, count, home, gram_dtype)
    scaled = tuple(_scale_block(block, exponents, gram_dtype) for block in blocks)
    ceiling = torch.finfo(gram_dtype).max / 4
    return GradientMatrix(scaled, count, leaf_count, numel, home, gram_dtype, exponents, 0.0, ceiling)


def _column_meta(column: Sequence[Tensor | None]) -> LeafMeta | None:
    leaf = next((tensor for tensor in column if tensor is not None), None)
    return None if leaf is None else (leaf.shape, leaf.dtype, leaf.device)


def from_columns(columns: Sequence[Sequence[Tensor | None]], count: int, *, rescale: bool) -> GradientMatrix:
    """Build the matrix from validated sequence leaves ``columns[leaf][objective]``.

    A ``None`` entry stands for zeros of the leaf's shape. One ``torch.cat`` per
    (device, dtype) group copies the leaves, except the large leaves that the host
    path can use in place (see ``_columns``) and ``n = 1``, which is handled as a
    stacked tree of views.
    """
    if count == 1:
        stacked = [None if column[0] is None else column[0].unsqueeze(0) for column in columns]
        return from_stacked(stacked, 1, rescale=rescale)
    in_place = _columns.select(columns, count, rescale=rescale)
    skipped = {column.slot.position for column in in_place}
    metas = [None if position in skipped else _column_meta(column) for position, column in enumerate(columns)]
    blocks = []
    for members in _group(metas):
        slots = _slots(members)
        blocks.append(Block(_assemble(columns, slots, count), slots))
    matrix = _finish(blocks, count, len(columns), rescale, in_place)
    absent = tuple(k for k in range(count) if all(column[k] is None for column in columns))
    return matrix._replace(absent=absent) if absent else matrix


def from_stacked(
    leaves: Sequence[Tensor | None],
    count: int,
    *,
    rescale: bool,
    metas: tuple[StackedMeta | None, ...] | None = None,
) -> GradientMatrix:
    """Build the matrix from validated stacked leaves of shape ``[n, *parameter_shape]``.

    Without rescaling a leaf of ``SMALL_LEAF_NUMEL`` or more elements per objective is a
    block of its own, reshaped to ``[n, numel]`` (a view for contiguous leaves), so the
    large leaves are never copied. The small leaves of each (device, dtype) group are
    copied into one block, which keeps the number of matrix products low for models
    with many biases and norm scales. Rescaling copies each group into one block.

    ``metas`` are the leaves' ``(shape, dtype, device)`` from ``flatten_stacked``; they
    are read from the leaves when not given.
    """
    if metas is None:
        metas = tuple(None if leaf is None else (leaf.shape, leaf.dtype, leaf.device) for leaf in leaves)
    layout = _stacked_layout(metas, rescale)
    blocks = []
    for slots, in_place in zip(layout.blocks, layout.in_place, strict=True):
        if in_place:
            rows = _stacked_rows(leaves[slots[0].position], count, slots[0].numel)
        else:
            rows = torch.cat([_stacked_rows(leaves[slot.position], count, slot.numel) for slot in slots], dim=1)
        blocks.append(Block(rows, slots))
    if layout.copy_all:
        return _finish(blocks, count, len(leaves), rescale)
    return GradientMatrix(
        tuple(blocks), count, len(leaves), layout.numel, layout.home, layout.gram_dtype, None, *layout.limits
    )


class _Layout(NamedTuple):
    """Placement of the leaves of a stacked tree in blocks, which depends only on the leaves' metadata."""

    blocks: tuple[tuple[LeafSlot, ...], ...]
    """The slots of each block."""
    in_place: tuple[bool, ...]
    """Per block, whether it is one large leaf used as an ``[n, numel]`` view rather than a copy."""
    copy_all: bool
    numel: int
    home: torch.device
    gram_dtype: torch.dtype
    limits: tuple[float, float]
    """``(underflow_floor, overflow_ceiling)`` of an unrescaled Gram matrix."""


@functools.lru_cache(maxsize=256)
def _stacked_layout(metas: tuple[StackedMeta | None, ...], rescale: bool) -> _Layout:
    """Return the block layout of stacked leaves with these metadata, cached because training repeats one structure."""
    groups = _group([None if meta is None else (meta[0][1:], meta[1], meta[2]) for meta in metas])
    dtypes = {members[0][1][1] for members in groups}
    copy_all = rescale or any(dtype in HALF_DTYPES for dtype in dtypes)
    blocks: list[tuple[LeafSlot, ...]] = []
    in_place: list[bool] = []
    for members in groups:
        small = []
        for position, (shape, dtype, device) in members:
            if copy_all or shape.numel() < SMALL_LEAF_NUMEL:
                small.append((position, (shape, dtype, device)))
            else:
                blocks.append((LeafSlot(position, 0, shape, dtype, device),))
                in_place.append(True)
        if small:
            blocks.append(_slots(small))
            in_place.append(False)
    numel = sum(_width(slots) for slots in blocks)
    gram_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    return _Layout(
        tuple(blocks),
        tuple(in_place),
        copy_all,
        numel,
        blocks[0][0].device,
        gram_dtype,
        _range_limits(dtypes, numel),
    )


def _stacked_rows(leaf: Tensor | None, count: int, numel: int) -> Tensor:
    if leaf is None:  # never: blocks are made for tensor leaves only
        raise AssertionError("a block was requested for a None leaf")
    return leaf if leaf.dim() == 2 else leaf.reshape(count, numel)


def _scale_exponents(blocks: list[Block], count: int, home: torch.device, dtype: torch.dtype) -> Tensor:
    """Return ``[n]`` exponents ``e`` such that ``2**e[k]`` brings row ``k``'s largest magnitude into ``[1, 2)``."""
    # amax and amin are two fast passes; vector_norm(ord=inf) and aminmax were 5-50x slower on
    # the CPU with torch 2.13. The maximum propagates NaN, so a non-finite row stays visible.
    maxima = [
        torch.maximum(block.matrix.amax(dim=1), -block.matrix.amin(dim=1)).to(home, dtype)
        for block in blocks
        if block.matrix.shape[1] > 0
    ]
    if not maxima:
        return torch.zeros(count, dtype=dtype, device=home)
    largest = torch.stack(maxima).amax(dim=0)

    # The exponents are clamped so that 2**e and 2**-e are both representable: for
    # float32, e in [-127, 126]. The clamp never bites for finite inputs, whose largest
    # magnitude then lies in [2**-149, 2**128): at e = 126 it is still at least 2**-23,
    # whose square is a normal number.
    info = torch.finfo(dtype)
    lowest = -math.floor(math.log2(info.max))
    highest = -math.floor(math.log2(info.smallest_normal))
    exponents = torch.where(largest > 0, -torch.floor(torch.log2(largest)), 0.0)
    return exponents.clamp(lowest, highest)


def _scale_block(block: Block, exponents: Tensor, dtype: torch.dtype) -> Block:
    # Every block of a rescaled matrix is a copy made here (never a view of an input), so
    # it is scaled in place, which saves allocating and faulting in a second buffer. The
    # cast makes float16 and bfloat16 blocks float32 (float32 ones float64 in a float64
    # tree), and torch.exp2 of an integer-valued float is exact.
    factors = torch.exp2(exponents).to(block.matrix.device).unsqueeze(1)
    return Block(block.matrix.to(dtype).mul_(factors), block.slots)


def gram_matrix(matrix: GradientMatrix) -> Tensor:
    """Return the Gram matrix ``M @ M.T`` ([n, n], ``gram_dtype``, on ``home``) of the stored rows.

    On the CPU, rows wider than ``GRAM_CHUNK_NUMEL`` are cut into column chunks of that
    width whose products are accumulated with ``addmm``, which bounds the rounding error
    as in ``host_gram``.
    """
    # NOTE: accelerator blocks stay one product each. Their BLAS libraries reduce
    # differently, and the error of such thin products has not been measured there.
    row_blocks = [block.matrix for block in matrix.blocks]
    row_blocks += [_columns.stacked_rows(column) for column in matrix.columns]
    parts: list[Tensor] = []
    for rows in row_blocks:
        if rows.device.type == "cpu":
            parts.extend(_column_chunks(rows))
        else:
            parts.append(rows)
    return _sum_of_products(parts, matrix)


def _sum_of_products(parts: Sequence[Tensor], matrix: GradientMatrix) -> Tensor:
    """Return ``sum_p P @ P.T`` over column blocks ``P`` ([n, n], ``gram_dtype``, on ``home``)."""
    total: Tensor | None = None
    for rows in parts:
        if total is not None and rows.device == total.device and rows.dtype == total.dtype:
            total = torch.addmm(total, rows, rows.T)  # accumulate in place of a separate add
            continue
        part = rows @ rows.T
        if part.device != matrix.home or part.dtype != matrix.gram_dtype:
            part = part.to(matrix.home, matrix.gram_dtype)
        total = part if total is None else total + part
    if total is None:
        return torch.zeros(matrix.objectives, matrix.objectives, dtype=matrix.gram_dtype, device=matrix.home)
    return total


def host_gram(matrix: GradientMatrix) -> list[list[float]]:
    """Return the Gram matrix ``M @ M.T`` as ``n`` rows of ``n`` Python floats.

    For the host solver: the blocks are plain tensors in eager mode, and reading a
    CPU result costs no device synchronisation.

    Blocks wider than ``GRAM_CHUNK_NUMEL`` are cut into column chunks of that width.
    BLAS products of such thin shapes accumulate almost sequentially in the rows'
    dtype, so in float32 their relative error grows with the length. Measured with
    torch 2.13, ``torch.mm`` was 2.4e-5 off at 1e6 elements and 2.6e-4 at 5e6. Chunks
    keep the error near 1e-5 whatever the width, because each chunk rounds like a
    short product and adding up the chunks costs one rounding per chunk.

    With at most ``TRIANGLE_MAX_OBJECTIVES`` objectives, a CPU chunk at least
    ``WIDE_BLOCK_NUMEL`` columns wide is done as ``n`` matrix-vector products, row
    ``i`` giving the entries ``G[i, :i + 1]``, read back and summed in float64. For such
    shapes ``torch.mm`` runs well below memory bandwidth on the CPU (about twice
    slower than the products for ``n = 2``), so streaming the rows ``n`` times is
    cheaper. The other chunks are accumulated with ``addmm`` and read back once.
    """
    count = matrix.objectives
    total = [[0.0] * count for _ in range(count)]
    rest = []
    for block in matrix.blocks:
        for chunk in _column_chunks(block.matrix):
            if count <= TRIANGLE_MAX_OBJECTIVES and chunk.shape[1] >= WIDE_BLOCK_NUMEL and chunk.device.type == "cpu":
                _add_triangle(total, chunk)
            else:
                rest.append(chunk)
    if rest:
        # The upper triangle is mirrored: torch.mm does not promise bitwise-equal G[i, k] and G[k, i].
        for i, row in enumerate(_sum_of_products(rest, matrix).tolist()):
            for k in range(i, count):
                total[i][k] += row[k]
                if k != i:
                    total[k][i] += row[k]
    if matrix.columns:
        _columns.add_products(total, matrix.columns, GRAM_CHUNK_NUMEL)
    return total


def _column_chunks(rows: Tensor) -> Sequence[Tensor]:
    """Return ``rows`` ([n, width]) cut into column chunks of at most ``GRAM_CHUNK_NUMEL`` (views)."""
    width = rows.shape[1]
    if width <= GRAM_CHUNK_NUMEL:
        return [rows]
    full, tail = divmod(width, GRAM_CHUNK_NUMEL)
    return rows.split_with_sizes([GRAM_CHUNK_NUMEL] * full + ([tail] if tail else []), dim=1)


def _add_triangle(total: list[list[float]], rows: Tensor) -> None:
    """Add ``rows @ rows.T`` to ``total``, one matrix-vector product per row."""
    # The last row goes first, as a product with every row, and row 0 last. With torch 2.13,
    # a two-row float32 gradient of 1e6 columns in four leaves took 0.42 ms in this order and
    # 0.49 ms with row 0 first, probably because the later products find their rows in the caches.
    vectors = rows.unbind(0)
    last = len(vectors) - 1
    for i in range(last, 0, -1):
        for k, value in enumerate(torch.mv(rows if i == last else rows[: i + 1], vectors[i]).tolist()):
            total[i][k] += value
            if k != i:
                total[k][i] += value
    total[0][0] += torch.dot(vectors[0], vectors[0]).item()


def combine_rows(matrix: GradientMatrix, coefficients: Tensor, *, plain: bool = False) -> list[Tensor | None]:
    """Return the leaves of ``coefficients @ M`` for coefficients ``[n]`` on the stored (possibly scaled) rows.

    Each block is combined in its own dtype and on its own device; each leaf gets back
    its shape and dtype. Leaves that are ``None`` in every objective stay ``None``.
    Leaves with their block's dtype are views into one result vector per block. With
    ``plain=True`` and at least ``SHARED_BUFFER_NUMEL`` elements per objective, the
    blocks of one (device, dtype) group share a few result vectors instead (see
    ``_combine_into_buffers``). Below that size the ``out=`` products cost more in
    dispatch than the shared allocation saves.

    Args:
        matrix: the gradient matrix.
        coefficients: ``[n]``, any floating dtype.
        plain: the caller checked that the blocks and ``coefficients`` are plain eager
            tensors without autograd history (what ``_host_solver.eligible`` checks),
            so the products may write into preallocated buffers with ``out=``.
    """
    leaves: list[Tensor | None] = [None] * matrix.leaf_count
    if plain and len(matrix.blocks) > 1 and matrix.numel >= SHARED_BUFFER_NUMEL:
        _combine_into_buffers(matrix, coefficients, leaves)
    else:
        local = coefficients
        for block in matrix.blocks:
            rows = block.matrix
            if local.device != rows.device or local.dtype != rows.dtype:
                local = coefficients.to(rows.device, rows.dtype)
            _place(leaves, block, local @ rows)
    if not matrix.columns:
        return leaves
    if plain:
        _columns.combine(matrix.columns, coefficients.tolist(), leaves)
        return leaves
    # Tensor coefficients that may carry autograd history: combine stacked copies, as for blocks.
    for column in matrix.columns:
        rows = _columns.stacked_rows(column)
        leaves[column.slot.position] = (coefficients.to(rows.dtype) @ rows).view(column.slot.shape)
    return leaves


def _combine_into_buffers(matrix: GradientMatrix, coefficients: Tensor, leaves: list[Tensor | None]) -> None:
    """Combine the blocks of each (device, dtype) group into a few shared, freshly allocated vectors.

    A few large allocations cost less than one per block on the CPU with glibc. A
    freed multi-megabyte result can be handed back to the operating system, and the
    next call then pays a page fault per 4 KiB page, which cost more than the matrix
    product itself in measurements with torch 2.13. glibc serves a request from reused
    heap memory once it has freed a mapped chunk of that size, but only up to 32 MiB on
    64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``), and maps larger ones afresh every
    time. So a shared buffer contains at most ``SHARED_BUFFER_MAX_BYTES``, and a larger
    block gets a buffer of its own.

    The blocks are combined last first: ``host_gram`` read them first to last, so the
    last ones are the likeliest to still be in the CPU caches.
    """
    groups: dict[_GroupKey, list[Block]] = {}
    for block in matrix.blocks:
        groups.setdefault((block.matrix.device, block.matrix.dtype), []).append(block)

    for (device, dtype), blocks in groups.items():
        vector = coefficients.to(device, dtype)
        for run in _buffer_runs(blocks, dtype.itemsize):
            widths = [block.matrix.shape[1] for block in run]
            outputs = torch.empty(sum(widths), dtype=dtype, device=device).split_with_sizes(widths)
            for block, flat in zip(reversed(run), reversed(outputs), strict=True):
                torch.mv(block.matrix.T, vector, out=flat)
                _place(leaves, block, flat)


def _buffer_runs(blocks: list[Block], itemsize: int) -> list[list[Block]]:
    """Cut ``blocks`` into consecutive runs whose results fit in ``SHARED_BUFFER_MAX_BYTES`` (or one block each)."""
    runs: list[list[Block]] = []
    room = 0
    for block in blocks:
        size = block.matrix.shape[1] * itemsize
        if runs and size <= room:
            runs[-1].append(block)
            room -= size
        else:
            runs.append([block])
            room = SHARED_BUFFER_MAX_BYTES - size
    return runs


def _place(leaves: list[Tensor | None], block: Block, flat: Tensor) -> None:
    """Split one block's combined vector ``flat`` into its leaves, with their shapes and dtypes."""
    for slot in block.slots:
        leaf = flat if len(block.slots) == 1 else flat.narrow(0, slot.offset, slot.numel)
        if leaf.shape != slot.shape:
            leaf = leaf.view(slot.shape)
        leaves[slot.position] = leaf if leaf.dtype == slot.dtype else leaf.to(slot.dtype)
