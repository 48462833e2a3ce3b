"""Boundary checks of the aggregators' arguments: seeds, visit orders, weights and options.

Value checks of a tensor argument (is ``orders`` a set of permutations, are the
weights finite and non-negative) must read the tensor's values. They run in eager
mode on plain tensors. They are skipped while ``torch.compile`` traces (the values
are not known then) and for tensors wrapped by a ``torch.func`` transform (for
example an ``orders`` tensor batched by ``torch.vmap``), whose values cannot be read
without breaking the transform.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch._C import _functorch

__all__ = [
    "MAX_SEED",
    "can_read_values",
    "check_eps",
    "check_orders",
    "check_reduction",
    "check_seed",
    "outside_transforms",
    "to_weight_tensor",
    "without_autograd",
]

MAX_SEED = 2**64 - 1
"""Largest seed that ``torch.Generator.manual_seed`` accepts."""


def outside_transforms() -> bool:
    """Return whether this call runs in eager mode, outside ``torch.compile`` and every ``torch.func`` transform."""
    return not torch.compiler.is_compiling() and _functorch.maybe_current_level() is None


def without_autograd(tensors: Iterable[Tensor]) -> bool:
    """Return whether nothing computed from ``tensors`` would be recorded: grad mode is off or none requires grad."""
    return not torch.is_grad_enabled() or not any(tensor.requires_grad for tensor in tensors)


def can_read_values(tensor: Tensor) -> bool:
    """Return whether the values of ``tensor`` can be read now: eager mode and no ``torch.func`` wrapper."""
    if torch.compiler.is_compiling():
        return False
    return not _functorch.is_functorch_wrapped_tensor(tensor)


def check_seed(seed: object) -> int:
    """Return ``seed`` if it is an int in ``[0, 2**64 - 1]``, else raise ``TypeError`` or ``ValueError``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is a {type(seed).__name__}; expected an int in [0, {MAX_SEED}]")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} is out of range; expected an int in [0, {MAX_SEED}]")
    return seed


def check_reduction(reduction: object) -> None:
    """Raise ``ValueError`` unless ``reduction`` is ``"sum"`` or ``"mean"``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is invalid; expected 'sum' or 'mean'")


def check_eps(eps: object) -> float:
    """Return ``eps`` as a float if it is a real number in ``[0, 1)``, else raise ``ValueError``."""
    valid = isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0.0 <= eps < 1.0
    if not valid:
        raise ValueError(f"eps={eps!r} is invalid; expected a number in [0, 1)")
    return float(eps)  # type: ignore[arg-type]


def check_orders(orders: object, count: int) -> Tensor:
    """Return ``orders`` after checking that it is an int64 tensor ``[n, n - 1]`` of permutations.

    Row ``i`` must be a permutation of every objective except ``i``. The row contents
    are checked when ``can_read_values(orders)`` holds.

    Raises:
        TypeError: ``orders`` is not an int64 tensor.
        ValueError: its shape is not ``[n, n - 1]`` or a row is not a permutation of the other objectives.
    """
    if not isinstance(orders, Tensor) or orders.dtype != torch.int64:
        found = f"a tensor of dtype {orders.dtype}" if isinstance(orders, Tensor) else f"a {type(orders).__name__}"
        raise TypeError(
            f"orders is {found}; expected a torch.int64 tensor of shape [n, n - 1] = [{count}, {count - 1}]"
        )
    if tuple(orders.shape) != (count, count - 1):
        raise ValueError(
            f"orders has shape {tuple(orders.shape)}; expected [n, n - 1] = [{count}, {count - 1}] for {count} "
            "objectives, row i visiting every objective except i"
        )
    if can_read_values(orders):
        _check_order_rows(orders)
    return orders


def _check_order_rows(orders: Tensor) -> None:
    count = orders.shape[0]
    everyone = torch.arange(count, device=orders.device)
    # Row i sorted must be 0..n-1 without i: position p holds p, or p + 1 once past i.
    expected = everyone[: count - 1] + (everyone[: count - 1] >= everyone.unsqueeze(1))
    if torch.equal(orders.sort(dim=1).values, expected):
        return
    for row_index, row in enumerate(orders):
        if not torch.equal(row.sort().values, expected[row_index]):
            raise ValueError(
                f"orders row {row_index} is {row.tolist()}; expected a permutation of {expected[row_index].tolist()} "
                f"(every objective except {row_index})"
            )


def to_weight_tensor(weights: object, count: int, *, normalize: bool) -> Tensor:
    """Return ``weights`` as a 1-D floating tensor of length ``n`` after checking its values.

    A sequence becomes a float64 CPU tensor; a tensor keeps its device, and an integer
    tensor becomes float64. Values are checked when ``can_read_values`` holds; for a
    tensor on an accelerator that check waits for the device.

    Raises:
        TypeError: ``weights`` is neither a sequence of numbers nor a real tensor.
        ValueError: wrong shape or length, a non-finite or negative weight, or a zero
            sum with ``normalize=True``.
    """
    tensor = _as_tensor(weights)
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise ValueError(
            f"weights has shape {tuple(tensor.shape)}; expected a 1-D sequence or tensor with one weight per "
            f"objective, length {count}"
        )
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    if can_read_values(tensor):
        _check_weight_values(tensor, normalize=normalize)
    return tensor


def _as_tensor(weights: object) -> Tensor:
    if isinstance(weights, Tensor):
        if weights.dtype == torch.bool or weights.is_complex():
            raise TypeError(f"weights is a tensor of dtype {weights.dtype}; expected a real floating or integer tensor")
        return weights
    if isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        for value in weights:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"weights contains {value!r}; expected real numbers")
        return torch.tensor([float(value) for value in weights], dtype=torch.float64)
    raise TypeError(f"weights is a {type(weights).__name__}; expected a sequence of numbers or a 1-D tensor")


def _check_weight_values(weights: Tensor, *, normalize: bool) -> None:
    values = [float(value) for value in weights.detach().cpu().tolist()]
    bad = [value for value in values if not math.isfinite(value) or value < 0.0]
    if bad:
        raise ValueError(f"weights={values} contains {bad[0]}; every weight must be finite and non-negative")
    if normalize and sum(values) == 0.0:
        raise ValueError(
            f"weights={values} sum to 0, so they cannot be normalized; give at least one positive weight "
            "or pass normalize=False"
        )
