"""Flatten and validate gradient pytrees, and ravel a pytree into one flat tensor.

Gradients arrive in two forms. A *sequence* contains ``n`` pytrees of identical
structure, one per objective. A *stacked* pytree is one tree whose leaves carry a
leading objective axis of length ``n``, as ``torch.func.jacrev`` and ``torch.vmap``
produce. Both are flattened with optree under the ``tolaria`` namespace and with
``None`` treated as a leaf, so a parameter that one objective does not use keeps
its place in the structure.

Every check here reads metadata only (types, shapes, dtypes, devices), so it costs
no device synchronisation and runs unchanged under ``torch.vmap`` and
``torch.compile``. The checks of a stacked tree are cached by that metadata, since a
training loop passes trees of one structure at every step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

import optree
import torch
from torch import Tensor

__all__ = [
    "NAMESPACE",
    "LeafSlot",
    "PyTree",
    "RavelSpec",
    "StackedLeaves",
    "StackedMeta",
    "flatten_sequence",
    "flatten_stacked",
    "format_key_path",
    "ravel_pytree",
    "unravel_pytree",
]

PyTree = Any
"""A pytree: nested dicts, lists, tuples and namedtuples (or nodes registered under ``NAMESPACE``)."""

NAMESPACE = "tolaria"
"""The optree namespace whose registered custom nodes are recognised when flattening."""


class LeafSlot(NamedTuple):
    """Position of one tensor leaf in a flat vector, with the metadata needed to rebuild the leaf."""

    position: int
    """Position of the leaf among the flattened leaves (``None`` leaves included)."""
    offset: int
    """First element of the leaf in the flat vector."""
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        """Number of elements of the leaf."""
        return self.shape.numel()


class RavelSpec(NamedTuple):
    """How to turn a flat vector from ``ravel_pytree`` back into its pytree."""

    treespec: optree.PyTreeSpec
    slots: tuple[LeafSlot | None, ...]
    """One entry per flattened leaf: a ``LeafSlot`` for a tensor, ``None`` for a ``None`` leaf."""
    numel: int
    """Length of the flat vector."""


StackedMeta = tuple[torch.Size, torch.dtype, torch.device]
"""Shape (with the leading objective axis), dtype and device of one stacked leaf."""


class StackedLeaves(NamedTuple):
    """A validated stacked gradient pytree."""

    treespec: optree.PyTreeSpec
    leaves: list[Tensor | None]
    """Leaves with their leading objective axis, ``None`` where the tree has ``None``."""
    objectives: int
    """The length ``n`` of the leading objective axis."""
    metas: tuple[StackedMeta | None, ...]
    """The metadata of each leaf, ``None`` for a ``None`` leaf."""


def format_key_path(path: Sequence[Any]) -> str:
    """Format an optree key path as subscripts, for example ``['encoder'][0]``."""
    if not path:
        return "<root>"
    return "".join(f"[{key!r}]" for key in path)


def _flatten_with_paths(tree: PyTree) -> tuple[list[tuple[Any, ...]], list[Any], optree.PyTreeSpec]:
    paths, leaves, treespec = optree.tree_flatten_with_path(tree, none_is_leaf=True, namespace=NAMESPACE)
    return paths, leaves, treespec


def _describe_leaf(leaf: object) -> str:
    if isinstance(leaf, Tensor):
        return f"a tensor of dtype {leaf.dtype}"
    return f"a {type(leaf).__name__}"


def _check_floating_leaf(leaf: object, path: Sequence[Any], owner: str) -> None:
    """Raise ``TypeError`` unless ``leaf`` is ``None`` or a real floating-point tensor."""
    if leaf is None:
        return
    if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
        raise TypeError(
            f"{owner} has {_describe_leaf(leaf)} at key path {format_key_path(path)}; "
            "expected a floating-point torch.Tensor (float16, bfloat16, float32 or float64) or None"
        )


def _structure_difference(
    reference_paths: list[tuple[Any, ...]], other_paths: list[tuple[Any, ...]], other: int
) -> str:
    """Describe the first key path that is in one structure but not the other."""
    other_set = set(other_paths)
    for path in reference_paths:
        if path not in other_set:
            return f"key path {format_key_path(path)} is in gradient 0 but missing from gradient {other}"
    reference_set = set(reference_paths)
    for path in other_paths:
        if path not in reference_set:
            return f"key path {format_key_path(path)} is in gradient {other} but missing from gradient 0"
    return "the key paths are the same but the container types differ"


def _check_same_structure(
    reference: tuple[list[tuple[Any, ...]], optree.PyTreeSpec],
    other: tuple[list[tuple[Any, ...]], optree.PyTreeSpec],
    index: int,
) -> None:
    """Raise ``ValueError`` naming a key path if gradient ``index`` differs in structure from gradient 0."""
    if other[1] == reference[1]:
        return
    difference = _structure_difference(reference[0], other[0], index)
    raise ValueError(
        f"gradient {index} has a different pytree structure from gradient 0: {difference}. "
        f"Structure of gradient 0: {reference[1]}. Structure of gradient {index}: {other[1]}. "
        "Every objective's gradient must have the structure of the parameters (use None for an unused parameter)"
    )


def _check_leaf_agrees(column: list[Any], path: Sequence[Any]) -> None:
    """Raise ``ValueError`` if the tensors at one key path differ in shape, dtype or device across objectives."""
    present = [(index, leaf) for index, leaf in enumerate(column) if leaf is not None]
    if not present:
        return
    first_index, first = present[0]
    for index, leaf in present[1:]:
        for attribute in ("shape", "dtype", "device"):
            expected = getattr(first, attribute)
            found = getattr(leaf, attribute)
            if found != expected:
                raise ValueError(
                    f"the leaf at key path {format_key_path(path)} has {attribute} {found} in gradient {index} "
                    f"but {attribute} {expected} in gradient {first_index}; every objective's gradient of one "
                    f"parameter must share its {attribute}"
                )


def _check_sequence(grads: object) -> Sequence[PyTree]:
    """Return ``grads`` if it is a non-empty sequence of pytrees, else raise ``TypeError`` or ``ValueError``."""
    if isinstance(grads, Tensor):
        raise TypeError(
            f"grads is a single tensor of shape {tuple(grads.shape)}; pass a sequence with one gradient pytree "
            "per objective, or pass stacked=True for a pytree whose leaves carry a leading objective axis"
        )
    if not isinstance(grads, Sequence) or isinstance(grads, (str, bytes)):
        raise TypeError(
            f"grads is a {type(grads).__name__}; expected a sequence (list or tuple) with one gradient pytree "
            "per objective"
        )
    if len(grads) == 0:
        raise ValueError("no gradients to aggregate: grads is empty; pass one gradient pytree per objective")
    return grads


def _column(
    flattened: list[tuple[list[tuple[Any, ...]], list[Any], optree.PyTreeSpec]], position: int, path: Any
) -> list[Tensor | None]:
    """Return one leaf position across objectives, after checking its types, shapes, dtypes and devices."""
    column = [leaves[position] for _, leaves, _ in flattened]
    for index, leaf in enumerate(column):
        _check_floating_leaf(leaf, path, f"gradient {index}")
    _check_leaf_agrees(column, path)
    return column


def flatten_sequence(grads: object) -> tuple[optree.PyTreeSpec, list[list[Tensor | None]]]:
    """Flatten and validate ``n`` gradient pytrees of identical structure.

    Returns the common treespec and the leaves as ``columns[leaf][objective]``.

    Raises:
        TypeError: ``grads`` is a tensor or not a sequence, or a leaf is neither ``None``
            nor a floating-point tensor.
        ValueError: ``grads`` is empty, two trees differ in structure, one leaf differs in
            shape, dtype or device across objectives, or every leaf is ``None``.
    """
    flattened = [_flatten_with_paths(tree) for tree in _check_sequence(grads)]
    reference_paths, _, treespec = flattened[0]
    for index, (paths, _, spec) in enumerate(flattened[1:], start=1):
        _check_same_structure((reference_paths, treespec), (paths, spec), index)

    columns = [_column(flattened, position, path) for position, path in enumerate(reference_paths)]
    if all(leaf is None for column in columns for leaf in column):
        raise ValueError(
            f"no gradients to aggregate: every leaf of every gradient is None (structure {treespec}); "
            "at least one objective must have a tensor gradient"
        )
    return treespec, columns


_NOT_A_TENSOR = object()
"""Placeholder in the metadata of a stacked leaf that is neither ``None`` nor a tensor."""


def flatten_stacked(tree: PyTree) -> StackedLeaves:
    """Flatten and validate one stacked gradient pytree whose leaves have shape ``[n, *parameter_shape]``.

    Raises:
        TypeError: a leaf is neither ``None`` nor a floating-point tensor.
        ValueError: a leaf is 0-d, the leaves disagree on ``n``, or no leaf is a tensor.
    """
    # The key paths are only needed for error messages, so the common, valid case flattens without them.
    leaves, treespec = optree.tree_flatten(tree, none_is_leaf=True, namespace=NAMESPACE)
    metas = tuple(
        None if leaf is None else (leaf.shape, leaf.dtype, leaf.device) if isinstance(leaf, Tensor) else _NOT_A_TENSOR
        for leaf in leaves
    )
    count = _stacked_objectives(metas)
    if count < 0:
        _raise_invalid_stacked(tree)
    if count == 0:
        raise ValueError("no gradients to aggregate: the stacked gradient's leading objective axis has length 0")
    return StackedLeaves(treespec, leaves, count, metas)  # type: ignore[arg-type]  # no _NOT_A_TENSOR is left


@functools.lru_cache(maxsize=256)
def _stacked_objectives(metas: tuple[object, ...]) -> int:
    """Return ``n`` for valid stacked metadata, or -1 for an invalid leaf or disagreeing leading axes.

    The result depends on the metadata alone, which a training loop repeats at every
    step, so it is cached: a repeated structure is validated with one lookup.
    """
    counts = set()
    for meta in metas:
        if meta is None:
            continue
        if not isinstance(meta, tuple) or not meta[1].is_floating_point or len(meta[0]) == 0:
            return -1
        counts.add(meta[0][0])
    return counts.pop() if len(counts) == 1 else -1


def _raise_invalid_stacked(tree: PyTree) -> NoReturn:
    """Raise the error that describes the first invalid leaf of a stacked tree, with its key path."""
    paths, leaves, treespec = _flatten_with_paths(tree)
    count: int | None = None
    count_path: Sequence[Any] = ()
    for path, leaf in zip(paths, leaves, strict=True):
        _check_floating_leaf(leaf, path, "the stacked gradient")
        if leaf is None:
            continue
        if leaf.dim() == 0:
            raise ValueError(
                f"the stacked gradient has a 0-d tensor at key path {format_key_path(path)}; with stacked=True "
                "every tensor leaf needs a leading objective axis, shape [n, *parameter_shape]"
            )
        if count is None:
            count, count_path = leaf.shape[0], path
        elif leaf.shape[0] != count:
            raise ValueError(
                f"the stacked gradient has {leaf.shape[0]} objectives at key path {format_key_path(path)} but "
                f"{count} at {format_key_path(count_path)}; every leaf's leading axis must have the same length n"
            )
    raise ValueError(
        "no gradients to aggregate: the stacked gradient has no tensor leaves "
        f"(structure {treespec}); pass a pytree whose leaves have shape [n, *parameter_shape]"
    )


def ravel_pytree(tree: PyTree) -> tuple[Tensor, RavelSpec]:
    """Concatenate the tensor leaves of ``tree`` into one flat 1-D tensor.

    The flat tensor has the promoted dtype of the leaves (``torch.result_type`` rules,
    so mixed float16 and float32 leaves give float32) and their common device. ``None``
    leaves are kept in the spec and take no room. ``unravel_pytree(flat, spec)``
    restores the tree, each leaf with its own shape and dtype.

    Raises:
        TypeError: a leaf is neither ``None`` nor a floating-point tensor.
        ValueError: the tree has no tensor leaf, or its leaves sit on different devices.
    """
    paths, leaves, treespec = _flatten_with_paths(tree)
    slots: list[LeafSlot | None] = []
    offset = 0
    first: tuple[Sequence[Any], torch.device] | None = None
    for index, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
        _check_floating_leaf(leaf, path, "the pytree")
        if leaf is None:
            slots.append(None)
            continue
        if first is None:
            first = (path, leaf.device)
        elif leaf.device != first[1]:
            raise ValueError(
                f"the leaf at key path {format_key_path(path)} is on {leaf.device} but the leaf at "
                f"{format_key_path(first[0])} is on {first[1]}; ravel_pytree needs every leaf on one device"
            )
        slots.append(LeafSlot(index, offset, leaf.shape, leaf.dtype, leaf.device))
        offset += leaf.numel()
    tensors = [leaf.reshape(-1) for leaf in leaves if leaf is not None]
    if not tensors:
        raise ValueError(f"the pytree has no tensor leaves (structure {treespec}); there is nothing to ravel")
    return torch.cat(tensors), RavelSpec(treespec, tuple(slots), offset)


def unravel_pytree(flat: Tensor, spec: RavelSpec) -> PyTree:
    """Rebuild the pytree that ``ravel_pytree`` flattened into ``flat`` (a 1-D tensor of ``spec.numel`` elements).

    Leaves whose dtype equals ``flat``'s are views into ``flat``; the others are cast copies.

    Raises:
        ValueError: ``flat`` is not 1-D or has the wrong length.
    """
    if flat.dim() != 1 or flat.shape[0] != spec.numel:
        raise ValueError(
            f"flat has shape {tuple(flat.shape)}; expected a 1-D tensor of {spec.numel} elements from ravel_pytree"
        )
    leaves = [_unravel_leaf(flat, slot) for slot in spec.slots]
    return optree.tree_unflatten(spec.treespec, leaves)


def _unravel_leaf(flat: Tensor, slot: LeafSlot | None) -> Tensor | None:
    if slot is None:
        return None
    return flat.narrow(0, slot.offset, slot.numel).view(slot.shape).to(slot.dtype)
