"""The full training state that a checkpoint holds, and the check that it loads safely.

``capture_training_state`` gathers model, optimizer, LR scheduler, gradient scaler,
RNG states and the trainer's own counters into one dict; ``restore_training_state``
puts them back in place. Resuming from that dict reproduces an uninterrupted run
exactly on CPU, provided the trainer stores its data position in ``extra`` and
derives the data order from it.

``check_weights_only_safe`` walks a state before it is saved and rejects any value
that ``torch.load(weights_only=True)`` would refuse, so that the problem shows at
save time instead of when the checkpoint is needed.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from tolaria.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "STATE_VERSION",
    "RestoredState",
    "capture_training_state",
    "check_weights_only_safe",
    "restore_training_state",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_SCALAR_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_CONTAINER_TYPES = (dict, collections.OrderedDict, list, tuple, set, frozenset, torch.Size)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_COMPONENTS = ("optimizer", "scheduler", "scaler")


class RestoredState(NamedTuple):
    """The step and the trainer's ``extra`` values that ``restore_training_state`` put back."""

    step: int
    extra: dict[str, Any]


def _unsafe_value(value: Any, path: str) -> str | None:
    """Return the key path and type of the first value ``weights_only`` rejects, or ``None``."""
    kind = type(value)
    if kind in _TENSOR_TYPES or kind in _SCALAR_TYPES:
        return None
    if kind in _CONTAINER_TYPES:
        if isinstance(value, dict):
            items = [(f"{path}[{key!r}]", item) for key, item in value.items()]
            keys = [(f"{path} key {key!r}", key) for key in value]
            children = keys + items
        else:
            children = [(f"{path}[{index}]", item) for index, item in enumerate(value)]
        for child_path, child in children:
            found = _unsafe_value(child, child_path)
            if found is not None:
                return found
        return None
    return f"{path} is a {kind.__module__}.{kind.__qualname__}"


def check_weights_only_safe(state: Any, *, name: str = "state") -> None:
    """Check that ``torch.load(weights_only=True)`` can load ``state`` without an allowlist.

    Accepted: dense tensors and ``Parameter``; ``bool``, ``int``, ``float``, ``complex``,
    ``str``, ``bytes``, ``None``, ``torch.dtype``, ``torch.device``; and ``dict``,
    ``OrderedDict``, ``list``, ``tuple``, ``set``, ``frozenset`` and ``torch.Size`` of those.
    Subclasses (named tuples included) are rejected because the loader rejects them.

    Raises:
        TypeError: a value of another type is present; the message gives its key path.
    """
    found = _unsafe_value(state, name)
    if found is not None:
        raise TypeError(
            f"{found}, which torch.load(weights_only=True) rejects; convert it to tensors, "
            "numbers, strings, lists or dicts before saving"
        )


def capture_training_state(
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
    include_rng: bool = True,
) -> dict[str, Any]:
    """Gather the state needed to resume training exactly at ``step``.

    The tensors of the result share memory with the live model and optimizer, so
    save it before the next optimizer step (``tolaria.checkpoint.save`` does).

    Args:
        step: global optimizer step the state belongs to.
        model: the model; its ``state_dict()`` is stored.
        optimizer: any ``torch.optim.Optimizer``; its ``state_dict()`` is stored.
        scheduler: an LR scheduler (anything with ``state_dict``/``load_state_dict``).
        scaler: a ``torch.amp.GradScaler``.
        extra: the trainer's counters and data position (epoch, batch index, seeds).
        include_rng: store the Python, torch, CUDA and NumPy RNG states.

    Returns:
        ``{"version", "step", "model", "optimizer", "scheduler", "scaler", "rng", "extra"}``;
        absent components are ``None``.
    """
    return {
        "version": STATE_VERSION,
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": capture_rng_state() if include_rng else None,
        "extra": dict(extra or {}),
    }


def _check_version(state: Mapping[str, Any]) -> None:
    missing = [key for key in ("version", "step", "model", "extra") if key not in state]
    if missing:
        raise ValueError(f"training state is missing {missing}; expected a dict from capture_training_state()")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"training state version {state['version']!r} is not supported; expected {STATE_VERSION}")


def _restore_component(name: str, target: Any | None, saved: Any | None) -> None:
    if target is None:
        if saved is not None:
            logger.warning("training state has a %s state but no %s was given, so it is not restored", name, name)
        return
    if saved is None:
        raise ValueError(
            f"{name} was given but the training state has no {name} state; "
            f"capture it with capture_training_state({name}=...)"
        )
    target.load_state_dict(saved)


def restore_training_state(
    state: Mapping[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
) -> RestoredState:
    """Load a state from ``capture_training_state`` into the given live objects.

    The model is loaded with ``strict=True`` (copied in place, so parameters keep
    their identity); optimizer, scheduler and scaler through their
    ``load_state_dict``. Components saved but not given are skipped with a WARNING log.

    Raises:
        ValueError: the state is not a training state of a supported version, a given
            component has no saved state, or the RNG state is malformed.
        RuntimeError: the model's ``load_state_dict`` found missing or unexpected keys
            or mismatched shapes.
    """
    _check_version(state)
    model.load_state_dict(state["model"], strict=True)
    components = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    for name in _COMPONENTS:
        _restore_component(name, components[name], state.get(name))
    if restore_rng:
        if state.get("rng") is None:
            raise ValueError("restore_rng=True but the training state has no RNG state; pass restore_rng=False")
        restore_rng_state(state["rng"])
    return RestoredState(step=int(state["step"]), extra=dict(state["extra"]))
