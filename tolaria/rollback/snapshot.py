"""In-memory snapshots of the training state, copied into preallocated host buffers.

A snapshot contains the model's parameters and buffers, the optimizer's per-parameter
state and param-group hyperparameters, the LR scheduler and gradient scaler
states, the RNG states and the trainer's ``extra`` values. Tensors are copied with
``copy_`` into a ``HostBuffer``; small Python values are deep-copied. Nothing is
pickled. Later in-place updates of the live objects never reach the snapshot, and
restoring it copies every tensor back in place, so parameters and optimizer state
keep their identity and end up bit-identical to the captured values.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from tolaria.checkpoint.rng import capture_rng_state, restore_rng_state
from tolaria.functional.rollback import nbytes
from tolaria.rollback.buffers import BufferPool, HostBuffer, Layout, plan_layout

__all__ = ["CapturePlan", "OptimizerRecord", "SnapshotMismatch", "StateSnapshot", "capture", "plan_capture", "restore"]


class SnapshotMismatch(ValueError):
    """The live model or optimizer no longer has the structure the snapshot was taken from."""


class _StateEntry(NamedTuple):
    """One key of a parameter's optimizer state: a buffer slot for tensors, else a Python value."""

    key: str
    slot: int | None
    value: Any


class OptimizerRecord(NamedTuple):
    """The optimizer part of a snapshot.

    Attributes:
        group_shapes: shapes of each param group's parameters, to detect a changed optimizer.
        states: per parameter in param-group order, its state entries, or ``None`` without state.
        hyperparameters: each param group's settings except ``params`` (deep copies).
    """

    group_shapes: tuple[tuple[torch.Size, ...], ...]
    states: tuple[tuple[_StateEntry, ...] | None, ...]
    hyperparameters: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class StateSnapshot:
    """A captured training state (see the module doc). Only the rollback manager reads it.

    Attributes:
        step: training step it was taken at.
        buffer: the host buffer holding every tensor, model tensors first.
        model_names: qualified names of the model's parameters then buffers, in slot order.
        optimizer: optimizer record, or ``None`` when no optimizer was given.
        scheduler_state: deep copy of the LR scheduler's ``state_dict()``, or ``None``.
        scaler_state: deep copy of the gradient scaler's ``state_dict()``, or ``None``.
        rng: RNG states from ``tolaria.checkpoint.capture_rng_state``.
        extra: deep copy of the trainer's values (counters, data position).
        size_bytes: buffer size plus the tensors in ``rng`` and ``extra``.
    """

    step: int
    buffer: HostBuffer
    model_names: tuple[str, ...]
    optimizer: OptimizerRecord | None
    scheduler_state: dict[str, Any] | None
    scaler_state: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any]
    size_bytes: int


def _model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=True)
    yield from model.named_buffers(remove_duplicate=True)


def _state_entries(state: Mapping[str, Any] | None, tensors: list[torch.Tensor]) -> tuple[_StateEntry, ...] | None:
    """Describe one parameter's optimizer state, appending its tensors to ``tensors``."""
    if state is None:
        return None
    entries = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            entries.append(_StateEntry(key, len(tensors), None))
            tensors.append(value.detach())
        else:
            entries.append(_StateEntry(key, None, copy.deepcopy(value)))
    return tuple(entries)


def _optimizer_record(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> OptimizerRecord:
    """Describe the optimizer's state, appending its tensors to ``tensors`` as new slots."""
    states = tuple(
        _state_entries(optimizer.state.get(parameter), tensors)
        for group in optimizer.param_groups
        for parameter in group["params"]
    )
    shapes = tuple(tuple(parameter.shape for parameter in group["params"]) for group in optimizer.param_groups)
    hyperparameters = tuple(
        copy.deepcopy({key: value for key, value in group.items() if key != "params"})
        for group in optimizer.param_groups
    )
    return OptimizerRecord(shapes, states, hyperparameters)


def _collect(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[list[torch.Tensor], tuple[str, ...], OptimizerRecord | None]:
    """Gather the live tensors in slot order, model first, and the optimizer structure around them."""
    names, tensors = [], []
    for name, tensor in _model_tensors(model):
        names.append(name)
        tensors.append(tensor.detach())
    record = None if optimizer is None else _optimizer_record(optimizer, tensors)
    return tensors, tuple(names), record


def _synchronize(layout: Layout) -> None:
    """Wait for asynchronous copies between pinned host memory and CUDA devices."""
    # NOTE: this CUDA path is written but has not run on a GPU yet; CPU copies are synchronous.
    for device in {slot.device for slot in layout.slots if slot.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def _state_dict_copy(component: Any | None) -> dict[str, Any] | None:
    return None if component is None else copy.deepcopy(component.state_dict())


class CapturePlan(NamedTuple):
    """The live tensors in slot order, their layout and the structure around them."""

    tensors: list[torch.Tensor]
    layout: Layout
    model_names: tuple[str, ...]
    optimizer: OptimizerRecord | None


def plan_capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> CapturePlan:
    """Describe what a snapshot of ``model`` and ``optimizer`` will hold, without copying.

    ``plan.layout.total_bytes`` gives the size before any memory is taken, so the
    caller can evict old snapshots first and hand their buffers back to the pool.

    Raises:
        TypeError: a tensor is not dense and strided.
    """
    tensors, names, record = _collect(model, optimizer)
    return CapturePlan(tensors, plan_layout(tensors), names, record)


def capture(
    plan: CapturePlan,
    step: int,
    *,
    scheduler: Any | None,
    scaler: Any | None,
    extra: Mapping[str, Any] | None,
    pool: BufferPool,
) -> StateSnapshot:
    """Copy the planned tensors into a buffer from ``pool`` and return the snapshot.

    Call it right after ``plan_capture``, before the live objects change structure.
    CUDA tensors are copied with ``non_blocking=True`` into pinned memory and the
    devices are synchronised before this returns, so the snapshot is complete.
    """
    buffer = pool.acquire(plan.layout)
    with torch.no_grad():
        for view, tensor in zip(buffer.views, plan.tensors, strict=True):
            view.copy_(tensor, non_blocking=plan.layout.pinned)
    _synchronize(plan.layout)

    rng = capture_rng_state()
    extra_copy = copy.deepcopy(dict(extra or {}))
    return StateSnapshot(
        step=step,
        buffer=buffer,
        model_names=plan.model_names,
        optimizer=plan.optimizer,
        scheduler_state=_state_dict_copy(scheduler),
        scaler_state=_state_dict_copy(scaler),
        rng=rng,
        extra=extra_copy,
        size_bytes=buffer.nbytes + nbytes(rng) + nbytes(extra_copy),
    )


def _check_model(snapshot: StateSnapshot, live: list[tuple[str, torch.Tensor]]) -> None:
    names = tuple(name for name, _ in live)
    if names != snapshot.model_names:
        missing = sorted(set(snapshot.model_names) - set(names))
        unexpected = sorted(set(names) - set(snapshot.model_names))
        raise SnapshotMismatch(
            f"model tensors changed since the snapshot of step {snapshot.step}: "
            f"missing {missing}, unexpected {unexpected}, or a different order"
        )
    for (name, tensor), slot in zip(live, snapshot.buffer.layout.slots, strict=False):
        if (tensor.shape, tensor.dtype, tensor.device) != (slot.shape, slot.dtype, slot.device):
            raise SnapshotMismatch(
                f"model tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} but the "
                f"snapshot of step {snapshot.step} holds {tuple(slot.shape)} {slot.dtype} on {slot.device}"
            )


def _check_optimizer(snapshot: StateSnapshot, optimizer: torch.optim.Optimizer | None) -> None:
    record = snapshot.optimizer
    if (record is None) != (optimizer is None):
        raise SnapshotMismatch(f"the snapshot of step {snapshot.step} and the rollback disagree on having an optimizer")
    if record is None or optimizer is None:
        return
    shapes = tuple(tuple(parameter.shape for parameter in group["params"]) for group in optimizer.param_groups)
    if shapes != record.group_shapes:
        raise SnapshotMismatch(
            f"optimizer param groups changed since the snapshot of step {snapshot.step}: "
            f"{len(shapes)} groups now, {len(record.group_shapes)} then, or different parameter shapes"
        )


def _restore_entry(state: dict[str, Any], entry: _StateEntry, buffer: HostBuffer) -> None:
    if entry.slot is None:
        state[entry.key] = copy.deepcopy(entry.value)
        return
    source = buffer.views[entry.slot]
    slot = buffer.layout.slots[entry.slot]
    live = state.get(entry.key)
    if isinstance(live, torch.Tensor) and (live.shape, live.dtype, live.device) == (
        slot.shape,
        slot.dtype,
        slot.device,
    ):
        live.copy_(source, non_blocking=buffer.layout.pinned)
    else:
        # The optimizer replaced or dropped this tensor since; a fresh copy must never alias the buffer.
        state[entry.key] = source.to(slot.device, copy=True)


def _restore_optimizer(record: OptimizerRecord, optimizer: torch.optim.Optimizer, buffer: HostBuffer) -> None:
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    for parameter, entries in zip(parameters, record.states, strict=True):
        if entries is None:
            optimizer.state.pop(parameter, None)
            continue
        state = optimizer.state[parameter]
        for stale in set(state) - {entry.key for entry in entries}:
            del state[stale]
        for entry in entries:
            _restore_entry(state, entry, buffer)
    for group, saved in zip(optimizer.param_groups, record.hyperparameters, strict=True):
        _restore_hyperparameters(group, saved)


def _restore_hyperparameters(group: dict[str, Any], saved: Mapping[str, Any]) -> None:
    for key, value in saved.items():
        live = group.get(key)
        if isinstance(live, torch.Tensor) and isinstance(value, torch.Tensor) and live.shape == value.shape:
            # Tensor hyperparameters (a tensor ``lr``) may be captured by compiled code, so keep their identity.
            live.copy_(value)
        else:
            group[key] = copy.deepcopy(value)


def _check_components(snapshot: StateSnapshot, scheduler: Any | None, scaler: Any | None) -> None:
    pairs = {"scheduler": (scheduler, snapshot.scheduler_state), "gradient scaler": (scaler, snapshot.scaler_state)}
    for name, (component, saved) in pairs.items():
        if (component is None) != (saved is None):
            raise SnapshotMismatch(f"the snapshot of step {snapshot.step} and the rollback disagree on having a {name}")


def restore(
    snapshot: StateSnapshot,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    scaler: Any | None,
) -> dict[str, Any]:
    """Copy ``snapshot`` back into the live objects in place and return a copy of its ``extra``.

    The structure is checked before anything is written, so a ``SnapshotMismatch``
    leaves the live state untouched. Gradients of the model's parameters are set to
    ``None``: they belong to the abandoned step.

    Raises:
        SnapshotMismatch: the model's tensors, the optimizer's param groups or the set
            of given components differ from the snapshot.
    """
    live = list(_model_tensors(model))
    _check_model(snapshot, live)
    _check_optimizer(snapshot, optimizer)
    _check_components(snapshot, scheduler, scaler)

    buffer = snapshot.buffer
    with torch.no_grad():
        for (_, tensor), view in zip(live, buffer.views, strict=False):
            tensor.copy_(view, non_blocking=buffer.layout.pinned)
        if snapshot.optimizer is not None and optimizer is not None:
            _restore_optimizer(snapshot.optimizer, optimizer, buffer)
    _synchronize(buffer.layout)

    if scheduler is not None:
        scheduler.load_state_dict(copy.deepcopy(snapshot.scheduler_state))
    if scaler is not None:
        scaler.load_state_dict(copy.deepcopy(snapshot.scaler_state))
    for parameter in model.parameters():
        parameter.grad = None
    restore_rng_state(snapshot.rng)
    return copy.deepcopy(snapshot.extra)
