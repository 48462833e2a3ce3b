"""Per-objective gradients of a model's parameters.

Given the stacked losses ``[n]`` of one batch, these functions return for every
trainable parameter a tensor ``[n, *param.shape]`` whose row ``k`` is the gradient
of objective ``k`` alone.

Two methods compute the same numbers:

* ``"batched"``: one call of ``torch.autograd.grad`` with ``is_grads_batched=True``
  and the rows of an ``[n, n]`` identity as output gradients. Autograd runs the
  backward graph once under ``vmap``, so the graph is traversed once for all
  objectives. This is the default because it saves the Python and dispatch overhead
  of n separate backward passes.
* ``"loop"``: one backward per objective with ``retain_graph=True``. It works for
  every operation, including the few that have no batching rule, and is used when
  ``"auto"`` finds that the batched call fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["GradientComputer", "objective_usage", "per_objective_gradients", "split_by_usage"]

logger = logging.getLogger(__name__)


def objective_usage(losses: Sequence[torch.Tensor], parameters: Sequence[torch.Tensor]) -> list[tuple[bool, ...]]:
    """Return, for each parameter, which objectives' losses depend on it.

    Runs one backward per objective (``retain_graph=True``), so call it once, not
    every step. Dependence is structural: a parameter in an objective's autograd
    graph counts as used even where its gradient happens to be zero.

    Args:
        losses: the n scalar losses as separate tensors. Pass them before they are
            stacked: an element of a stacked tensor depends, through the stack, on
            every other loss's graph, so every parameter would look used.
        parameters: the tensors to test, each with ``requires_grad=True``.

    Returns:
        One tuple of ``n`` booleans per parameter.
    """
    rows: list[tuple[torch.Tensor | None, ...]] = []
    for loss in losses:
        rows.append(torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True))
    return [tuple(row[position] is not None for row in rows) for position in range(len(parameters))]


def per_objective_gradients(
    losses: torch.Tensor, parameters: Sequence[torch.Tensor], *, batched: bool, retain_graph: bool = False
) -> list[torch.Tensor | None]:
    """Compute ``[n, *shape]`` per-objective gradients for each parameter.

    Args:
        losses: ``[n]`` losses, floating point, sharing one autograd graph.
        parameters: tensors with ``requires_grad=True``.
        batched: use one batched backward instead of one backward per objective.
        retain_graph: keep the autograd graph after the last backward.

    Returns:
        One entry per parameter: ``[n, *param.shape]`` in the parameter's dtype, or
        ``None`` when no objective depends on the parameter.

    Raises:
        RuntimeError: from autograd, for example when an operation has no batching rule.
    """
    count = losses.shape[0]
    if batched:
        identity = torch.eye(count, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(
            losses,
            parameters,
            grad_outputs=identity,
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain_graph,
        )
        return list(grads)
    rows = [
        torch.autograd.grad(
            losses[index], parameters, retain_graph=retain_graph or index < count - 1, allow_unused=True
        )
        for index in range(count)
    ]
    return [_stack_rows([row[position] for row in rows], parameters[position]) for position in range(len(parameters))]


def _stack_rows(rows: list[torch.Tensor | None], parameter: torch.Tensor) -> torch.Tensor | None:
    if all(row is None for row in rows):
        return None
    return torch.stack([torch.zeros_like(parameter) if row is None else row for row in rows])


class GradientComputer:
    """Per-objective gradients with the method chosen by ``TrainerConfig.gradient_mode``.

    In ``"auto"`` mode the first failure of the batched method is logged at WARNING,
    reported through ``on_fallback``, and every later step uses the loop method.
    """

    def __init__(self, mode: str, *, on_fallback: Callable[[RuntimeError], None] | None = None) -> None:
        if mode not in ("auto", "batched", "loop"):
            raise ValueError(f"gradient mode {mode!r} is not one of 'auto', 'batched', 'loop'")
        self.mode = mode
        self._batched = mode in ("auto", "batched")
        self._on_fallback = on_fallback

    @property
    def method(self) -> str:
        """The method in use now: ``"batched"`` or ``"loop"``."""
        return "batched" if self._batched else "loop"

    def __call__(self, losses: torch.Tensor, parameters: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Return per-objective gradients; see ``per_objective_gradients``."""
        if not self._batched:
            return per_objective_gradients(losses, parameters, batched=False)
        try:
            # The loop fallback below needs the graph again, so auto mode keeps it.
            return per_objective_gradients(losses, parameters, batched=True, retain_graph=self.mode == "auto")
        except RuntimeError as error:
            if self.mode == "batched":
                raise
            logger.warning("batched per-objective backward failed (%s); using one backward per objective", error)
            if self._on_fallback is not None:
                self._on_fallback(error)
            self._batched = False
            return per_objective_gradients(losses, parameters, batched=False)


def split_by_usage(
    names: Sequence[str], grads: Sequence[torch.Tensor | None], usage: Mapping[str, tuple[bool, ...]]
) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None]]:
    """Split stacked gradients into shared and exclusive parameters.

    A parameter is shared when two or more objectives use it; its stacked
    ``[n, *shape]`` gradient goes to the aggregator. An exclusive parameter's
    gradient is the sum over the objective axis, which equals the gradient of the
    one objective that uses it because the other rows are exact zeros.

    Returns:
        ``(shared, exclusive)``: name to ``[n, *shape]`` tensor, and name to
        ``[*shape]`` tensor or ``None`` for parameters no objective uses.
    """
    shared: dict[str, torch.Tensor | None] = {}
    exclusive: dict[str, torch.Tensor | None] = {}
    for name, grad in zip(names, grads, strict=True):
        if sum(usage[name]) >= 2:
            shared[name] = grad
        else:
            exclusive[name] = None if grad is None else grad.sum(dim=0)
    return shared, exclusive
