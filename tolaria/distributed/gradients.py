"""Averaging of stacked per-objective gradients across ranks, in few bucketed all-reduces.

Every rank must average its per-objective gradients before aggregating them, and
aggregate with the same seed, so all ranks apply the same update. Aggregating
first and averaging the results is wrong for non-linear aggregators such as PCGrad.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import optree
import torch
import torch.distributed as dist

from tolaria.distributed.context import DistributedContext
from tolaria.distributed.errors import collective_guard, require_live_group

__all__ = ["DEFAULT_BUCKET_BYTES", "average_gradients", "average_stacked_gradients"]

TreeT = TypeVar("TreeT")

# Same default bucket size as DistributedDataParallel (25 MiB).
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024

# tolaria registers its pytree node types in this optree namespace.
_NAMESPACE = "tolaria"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class _Bucket:
    """Leaves reduced together in one flat buffer of one dtype on one device."""

    indices: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclasses.dataclass(frozen=True)
class _Options:
    """Keyword arguments shared by the two public averaging functions."""

    bucket_bytes: int
    upcast_low_precision: bool
    check_layout: bool
    step: int | None


def average_stacked_gradients(
    stacked_tree: TreeT,
    ctx: DistributedContext,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    upcast_low_precision: bool = True,
    check_layout: bool = False,
    step: int | None = None,
) -> TreeT:
    """Average a pytree of stacked per-objective gradients over all ranks.

    Each leaf is a floating-point tensor of shape ``[n, ...]`` whose leading axis
    indexes the objective; ``n`` is the same for every leaf. ``None`` leaves stay
    ``None``. Leaves are packed in order into flat buffers of at most ``bucket_bytes``
    (a larger leaf gets a buffer of its own), separately per device and reduction dtype.
    Each buffer takes one ``all_reduce``, and all of them are in flight at once. The
    result has the input's structure, shapes and dtypes, and shares no memory with it.

    float32 and float64 leaves are summed and then divided by the world size, which for
    two ranks gives the correctly rounded mean. float16 and bfloat16 leaves are reduced
    in float32 and cast back when ``upcast_low_precision`` is true (the default), so the
    sum cannot overflow and is rounded to the leaf dtype once, at twice their traffic. With
    ``upcast_low_precision=False`` they are divided by the world size first and summed
    in their own dtype, as ``DistributedDataParallel`` does.

    With one rank (no process group, or a group of size 1), the input itself is
    returned: no copy and no collective.

    Every rank must pass the same structure, shapes and dtypes. A mismatch makes gloo
    raise or time out, or silently mixes leaves when the bucket sizes happen to agree.
    ``check_layout=True`` rules that out with one more collective (an ``all_gather`` of
    an 8-byte layout fingerprint) and raises ``ValueError`` on every rank.

    Args:
        stacked_tree: pytree (optree, ``tolaria`` namespace) of ``[n, ...]`` float tensors or ``None``.
        ctx: the distributed context.
        bucket_bytes: maximum size in bytes of one reduction buffer; positive.
        upcast_low_precision: reduce float16 and bfloat16 leaves in float32.
        check_layout: verify that every rank passed the same layout first.
        step: training step, quoted in errors.

    Raises:
        TypeError: a leaf is not a tensor, or not floating point.
        ValueError: ``bucket_bytes`` is not positive, a leaf has no leading axis, the leading
            sizes differ, a leaf is not on a CUDA device under NCCL, or (with ``check_layout``)
            the ranks' layouts differ.
        RankFailure: the all-reduce failed because another rank died or failed.
        DistributedTimeout: the all-reduce did not complete within the timeout.
    """
    options = _Options(bucket_bytes, upcast_low_precision, check_layout, step)
    return _average(stacked_tree, ctx, "stacked_tree", options, stacked=True)


def average_gradients(
    tree: TreeT,
    ctx: DistributedContext,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    upcast_low_precision: bool = True,
    check_layout: bool = False,
    step: int | None = None,
) -> TreeT:
    """Average a pytree of floating-point gradient tensors of any shapes over all ranks.

    The same as ``average_stacked_gradients`` (buckets, dtypes, ``None`` leaves, one-rank
    shortcut, errors) without the leading objective axis. Use it for gradients that
    belong to one objective, or to average stacked and unstacked gradients in one set
    of buckets: ``average_gradients({"shared": stacked, "exclusive": plain}, ctx)``.
    """
    options = _Options(bucket_bytes, upcast_low_precision, check_layout, step)
    return _average(tree, ctx, "tree", options, stacked=False)


def _average(tree: TreeT, ctx: DistributedContext, name: str, options: _Options, *, stacked: bool) -> TreeT:
    if options.bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {options.bucket_bytes}")
    leaves: list[Any]
    leaves, treespec = optree.tree_flatten(cast(Any, tree), namespace=_NAMESPACE)
    _validate_leaves(tree, leaves, name, stacked=stacked)
    if not ctx.is_distributed or not leaves:
        return tree

    _check_devices(tree, leaves, name, ctx)
    require_live_group(ctx, f"averaging {name}")
    if options.check_layout:
        _check_layout_matches(leaves, treespec, name, ctx, step=options.step)
    buckets = _plan_buckets(leaves, options.bucket_bytes, upcast_low_precision=options.upcast_low_precision)
    averaged = _reduce_buckets(leaves, buckets, ctx, step=options.step)
    return cast(TreeT, optree.tree_unflatten(treespec, averaged))


def _validate_leaves(tree: Any, leaves: Sequence[Any], name: str, *, stacked: bool) -> None:
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{name} leaf at {_leaf_path(tree, index)} must be a torch.Tensor or None, got {type(leaf).__name__}"
            )
        if not leaf.is_floating_point():
            raise TypeError(f"{name} leaf at {_leaf_path(tree, index)} must be floating point, got dtype {leaf.dtype}")
    if stacked:
        _validate_objective_axis(tree, leaves)


def _validate_objective_axis(tree: Any, leaves: Sequence[torch.Tensor]) -> None:
    leading: int | None = None
    for index, leaf in enumerate(leaves):
        if leaf.dim() == 0:
            raise ValueError(
                f"stacked_tree leaf at {_leaf_path(tree, index)} has shape [] but needs a leading objective "
                "axis [n, ...]"
            )
        if leading is None:
            leading = leaf.shape[0]
        elif leaf.shape[0] != leading:
            raise ValueError(
                f"stacked_tree leaf at {_leaf_path(tree, index)} has leading size {leaf.shape[0]} "
                f"(shape {list(leaf.shape)}) but earlier leaves have {leading}; every leaf needs the "
                "same number of objectives n on axis 0"
            )


def _check_devices(tree: Any, leaves: Sequence[torch.Tensor], name: str, ctx: DistributedContext) -> None:
    # NCCL reduces CUDA tensors only. Checked here, because its error would look like a peer failure.
    if ctx.backend != "nccl":
        return
    for index, leaf in enumerate(leaves):
        if leaf.device.type != "cuda":
            raise ValueError(
                f"{name} leaf at {_leaf_path(tree, index)} is on {leaf.device}, but the nccl backend "
                f"reduces CUDA tensors only; move the gradients to {ctx.device}"
            )


def _leaf_path(tree: Any, index: int) -> str:
    paths = optree.tree_paths(tree, namespace=_NAMESPACE)
    return "root" + "".join(f"[{key!r}]" for key in paths[index])


def _reduction_dtype(dtype: torch.dtype, *, upcast_low_precision: bool) -> torch.dtype:
    if upcast_low_precision and dtype in _LOW_PRECISION:
        return torch.float32
    return dtype


def _plan_buckets(leaves: Sequence[torch.Tensor], bucket_bytes: int, *, upcast_low_precision: bool) -> list[_Bucket]:
    """Group leaves by (device, reduction dtype) in input order, then cut each group at ``bucket_bytes``."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, leaf in enumerate(leaves):
        dtype = _reduction_dtype(leaf.dtype, upcast_low_precision=upcast_low_precision)
        groups.setdefault((leaf.device, dtype), []).append(index)

    buckets: list[_Bucket] = []
    for (device, dtype), indices in groups.items():
        item_size = torch.empty((), dtype=dtype).element_size()
        current: list[int] = []
        current_bytes = 0
        for index in indices:
            size = leaves[index].numel() * item_size
            if current and current_bytes + size > bucket_bytes:
                buckets.append(_Bucket(tuple(current), dtype, device))
                current, current_bytes = [], 0
            current.append(index)
            current_bytes += size
        buckets.append(_Bucket(tuple(current), dtype, device))
    return buckets


def _pack(leaves: Sequence[torch.Tensor], bucket: _Bucket, world_size: int) -> torch.Tensor:
    total = sum(leaves[index].numel() for index in bucket.indices)
    buffer = torch.empty(total, dtype=bucket.dtype, device=bucket.device)
    offset = 0
    for index in bucket.indices:
        leaf = leaves[index]
        # copy_ converts the dtype in the same pass, so upcast leaves are copied once.
        buffer[offset : offset + leaf.numel()].copy_(leaf.reshape(-1))
        offset += leaf.numel()
    if bucket.dtype in _LOW_PRECISION:
        # Dividing before the sum keeps a half-precision sum within range.
        buffer.div_(world_size)
    return buffer


def _unpack(
    buffer: torch.Tensor, leaves: Sequence[torch.Tensor], bucket: _Bucket, world_size: int, out: list[Any]
) -> None:
    if bucket.dtype not in _LOW_PRECISION:
        buffer.div_(world_size)
    sizes = [leaves[index].numel() for index in bucket.indices]
    for index, flat in zip(bucket.indices, torch.split(buffer, sizes), strict=True):
        leaf = leaves[index]
        out[index] = flat.view(leaf.shape).to(leaf.dtype)


def _reduce_buckets(
    leaves: Sequence[torch.Tensor], buckets: Sequence[_Bucket], ctx: DistributedContext, *, step: int | None
) -> list[Any]:
    buffers = [_pack(leaves, bucket, ctx.world_size) for bucket in buckets]
    with collective_guard(f"all_reduce of {len(buffers)} gradient bucket(s)", ctx, step=step):
        works = [dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True) for buffer in buffers]
        for work in works:
            work.wait()

    averaged: list[Any] = [None] * len(leaves)
    for buffer, bucket in zip(buffers, buckets, strict=True):
        _unpack(buffer, leaves, bucket, ctx.world_size, averaged)
    return averaged


def _layout_fingerprint(leaves: Sequence[torch.Tensor], treespec: Any) -> int:
    layout = repr((str(treespec), [(tuple(leaf.shape), str(leaf.dtype), leaf.device.type) for leaf in leaves]))
    digest = hashlib.blake2b(layout.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _check_layout_matches(
    leaves: Sequence[torch.Tensor], treespec: Any, name: str, ctx: DistributedContext, *, step: int | None
) -> None:
    local = torch.tensor([_layout_fingerprint(leaves, treespec)], dtype=torch.int64, device=ctx.device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    with collective_guard("all_gather of the gradient layout fingerprint", ctx, step=step):
        dist.all_gather(gathered, local)

    fingerprints = [int(tensor.item()) for tensor in gathered]
    different = [rank for rank, value in enumerate(fingerprints) if value != fingerprints[0]]
    if different:
        raise ValueError(
            f"{name} layout differs between ranks: ranks {different} do not match rank 0 in "
            "structure, shapes, dtypes or device types; every rank must pass the same gradient layout"
        )
