"""``StepRunner``: one optimizer step over one batch with several objectives.

Order of work in ``StepRunner.run``:

1. move the batch to the device and run the objectives' forward pass (under autocast
   when mixed precision is on) to get one scalar loss per objective;
2. compute per-objective gradients ``[n, *shape]`` of every trainable parameter
   (``tolaria.gradients``);
3. combine the rows of the shared parameters with the pure aggregator from
   ``tolaria.functional.aggregation``; parameters used by one objective keep that
   objective's gradient;
4. update the loss monitor (``tolaria.functional.anomaly``), decide on the device
   whether losses and gradients are finite, and read those flags on the host in one
   transfer. This is the step's only host synchronisation without fp16. Under
   ``torch.distributed`` one all-reduce first agrees the flags across ranks;
5. when finite, write ``.grad``, clip, and step the optimizer (through the
   ``GradScaler`` under fp16); when not, leave parameters and optimizer state
   untouched and report the step as skipped.

Under fp16 step 4 checks the losses but not the scaled gradients, because the
``GradScaler`` handles their overflow: it skips the optimizer step, and its ``update``
lowers the scale. Whether it skipped is read from the scale before and after the
update (two more host reads per fp16 step). Such a step is reported as not applied,
with ``scaler_skipped`` set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch

from tolaria.functional import aggregation, anomaly
from tolaria.gradients import GradientComputer, objective_usage, split_by_usage
from tolaria.precision import MixedPrecision

__all__ = ["Objectives", "StepOutcome", "StepRunner", "batch_size_of", "move_to_device", "step_seed"]

Objectives = Callable[[torch.nn.Module, Any], Mapping[str, torch.Tensor]]
"""``objectives(model, batch) -> {name: scalar loss}``; the same names in the same order every call."""


class StepOutcome(NamedTuple):
    """The result of one step, still on the device.

    Attributes:
        losses: ``[n]`` float32 losses, detached, in objective order.
        stats: aggregation statistics of the shared parameters, or ``None`` when no
            parameter is shared by two objectives.
        aggregation_ms: host time spent in the aggregator call, in milliseconds.
        applied: whether the optimizer stepped.
        nonfinite: whether a loss or gradient was NaN or infinite.
        batch_size: number of samples in the batch, or 0 when unknown.
        spike: whether the loss monitor flagged a loss spike.
        spike_score: the largest robust z-score of the step's losses.
        nonfinite_loss: whether a loss (not only a gradient) was NaN or infinite.
        scaler_skipped: whether the fp16 ``GradScaler`` found non-finite scaled gradients
            and skipped the optimizer step (the losses were finite, so not an anomaly).
    """

    losses: torch.Tensor
    stats: aggregation.AggregationStats | None
    aggregation_ms: float
    applied: bool
    nonfinite: bool
    batch_size: int
    spike: bool = False
    spike_score: float = 0.0
    nonfinite_loss: bool = False
    scaler_skipped: bool = False


def _read_flags(flags: torch.Tensor) -> list[float]:
    values: list[float] = flags.tolist()
    return values


def step_seed(run_seed: int, global_step: int) -> int:
    """Derive the aggregation seed of one step from the run seed and the global step.

    A resumed run reaches the same global step with the same run seed, so it draws
    the same PCGrad visit orders as the uninterrupted run.
    """
    return (run_seed * 1_000_003 + global_step) % 2**63


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Return ``batch`` with every tensor leaf moved to ``device`` (other leaves unchanged)."""
    return optree.tree_map(
        lambda leaf: leaf.to(device, non_blocking=True) if isinstance(leaf, torch.Tensor) else leaf,
        batch,
        none_is_leaf=True,
    )


def batch_size_of(batch: Any) -> int:
    """Return the leading dimension of the first non-scalar tensor in ``batch``, or 0."""
    for leaf in optree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 0


def _describe_shapes(batch: Any) -> str:
    shapes = [tuple(leaf.shape) for leaf in optree.tree_leaves(batch) if isinstance(leaf, torch.Tensor)]
    return ", ".join(str(shape) for shape in shapes) or "no tensors"


class StepRunner:
    """Runs forward, per-objective backward, aggregation and the optimizer step.

    Args:
        model: the module being trained.
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        objectives: ``objectives(model, batch) -> {name: scalar loss}``.
        aggregator: name accepted by ``tolaria.functional.aggregation.get``.
        weights: per-objective weights for ``"weighted"``, else ``None``.
        precision: autocast and gradient scaling settings.
        gradient_mode: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``tolaria.gradients``).
        grad_clip_norm: clip the total 2-norm of the combined gradient; ``None`` disables.
        seed: run seed from which each step's aggregation seed is derived.
        check_objectives: called once with the objective names, when the first
            forward pass reveals them; it raises ``ValueError`` for settings that do
            not fit them (``TrainerConfig.check_objectives``).
        on_gradient_fallback: called with the error when ``"auto"`` gives up batching.
        loss_monitor: spike detection settings; the monitor state is built on the
            first step, when the number of objectives is known.
        agree_flags: maps the step's ``[4]`` float32 flag tensor to host floats. The
            default reads it with ``tolist``. Distributed training passes an
            all-reduce (MAX), so every rank takes the same decision.
        average_gradients: applied to ``{"shared": ..., "exclusive": ...}`` before
            aggregation (or to ``{"combined": ...}`` on summed steps); distributed
            training passes the cross-rank mean.
        stats_every: for the linear aggregators (``sum``, ``mean``, ``weighted``),
            compute per-objective gradients and aggregation statistics only on steps
            that are multiples of this. The other steps take one backward of the
            weighted loss sum, which gives the same combined gradient for a fraction
            of the cost. PCGrad always uses per-objective gradients.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        objectives: Objectives,
        *,
        aggregator: str,
        weights: Sequence[float] | None,
        precision: MixedPrecision,
        gradient_mode: str,
        grad_clip_norm: float | None,
        seed: int,
        check_objectives: Callable[[tuple[str, ...]], None] | None = None,
        on_gradient_fallback: Callable[[RuntimeError], None] | None = None,
        loss_monitor: anomaly.LossMonitorConfig | None = None,
        agree_flags: Callable[[torch.Tensor], list[float]] | None = None,
        average_gradients: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
        stats_every: int = 1,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.objectives = objectives
        self.aggregator_name = aggregator
        self._aggregate = aggregation.get(aggregator)
        self._weights = None if weights is None else torch.tensor(list(weights), dtype=torch.float32)
        self.precision = precision
        self.gradients = GradientComputer(gradient_mode, on_fallback=on_gradient_fallback)
        self.grad_clip_norm = grad_clip_norm
        self.seed = seed
        self._check_objectives = check_objectives
        self._loss_terms: tuple[torch.Tensor, ...] = ()
        self.stats_every = stats_every
        self._coefficients: torch.Tensor | None = None
        self._coefficient_values: list[float] = []
        self._rescale: dict[str, float] | None = None
        self._loss_monitor_config = loss_monitor or anomaly.LossMonitorConfig()
        self.monitor_state: anomaly.LossMonitorState | None = None
        self._agree_flags = agree_flags or _read_flags
        self._average_gradients = average_gradients
        self._named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
        self._usage: dict[str, tuple[bool, ...]] | None = None
        self.objective_names: tuple[str, ...] | None = None

    @property
    def device(self) -> torch.device:
        """Device of the precision settings, where batches are moved."""
        return self.precision.device

    def forward(self, batch: Any) -> torch.Tensor:
        """Run the objectives on a device-resident batch and return ``[n]`` float32 losses.

        Raises:
            RuntimeError: the forward pass failed; the message gives the batch shapes.
            ValueError: the objectives returned something other than scalar floating
                losses under the same names as before.
        """
        try:
            with self.precision.autocast():
                loss_map = self.objectives(self.model, batch)
        except (RuntimeError, IndexError, TypeError) as error:
            raise RuntimeError(
                f"the objectives' forward pass failed for a batch with tensor shapes [{_describe_shapes(batch)}]; "
                f"check that the batch matches the model's expected input: {error}"
            ) from error
        return self._stack_losses(loss_map)

    def _set_coefficients(self, count: int) -> None:
        """Record the linear aggregator's effective coefficient of each objective, if it is linear."""
        if self.aggregator_name == "sum":
            values = [1.0] * count
        elif self.aggregator_name == "mean":
            values = [1.0 / count] * count
        elif self.aggregator_name == "weighted" and self._weights is not None:
            total = float(self._weights.sum())
            values = [float(weight) / total for weight in self._weights] if total > 0 else []
        else:
            values = []
        # A zero coefficient cannot be divided out of an exclusive parameter's gradient.
        if values and all(value > 0 for value in values):
            self._coefficient_values = values
            self._coefficients = torch.tensor(values, dtype=torch.float32)

    def _stack_losses(self, loss_map: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(loss_map, Mapping) or not loss_map:
            raise ValueError(f"objectives must return a non-empty mapping of name to loss, got {type(loss_map)!r}")
        names = tuple(loss_map)
        if self.objective_names is None:
            if self._check_objectives is not None:
                self._check_objectives(names)
            self.objective_names = names
            self._set_coefficients(len(names))
        elif names != self.objective_names:
            raise ValueError(f"objectives returned names {list(names)}, expected {list(self.objective_names)}")
        for name, loss in loss_map.items():
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"objective {name!r} returned {shape}; expected a scalar floating-point tensor")
        # Kept separate for objective_usage, which cannot see structure through a stack.
        self._loss_terms = tuple(loss.float() for loss in loss_map.values())
        return torch.stack(self._loss_terms)

    def run(self, batch: Any, global_step: int) -> StepOutcome:
        """Take one step on ``batch``; see the module docstring for the order of work."""
        batch = move_to_device(batch, self.device)
        losses = self.forward(batch)
        scaler = self.precision.scaler
        backward_losses = scaler.scale(losses) if scaler is not None else losses
        if self._summed_step(global_step):
            combined, stats, aggregation_ms = self._summed_gradients(backward_losses, global_step), None, 0.0
        else:
            combined, stats, aggregation_ms = self._aggregated_gradients(backward_losses, global_step)

        finite = self._finite(losses, combined, check_grads=scaler is None)
        summary = self._monitor(losses)
        # The one host read of the step: the update must not run on non-finite values.
        skip, nonfinite_loss, spike, score = self._agree_flags(torch.cat([(~finite).float().reshape(1), summary]))
        size = batch_size_of(batch)
        stepped = False
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            stepped = self._apply(combined)
        return StepOutcome(
            losses.detach(),
            stats,
            aggregation_ms,
            applied=stepped,
            nonfinite=bool(skip),
            batch_size=size,
            spike=bool(spike),
            spike_score=score,
            nonfinite_loss=bool(nonfinite_loss),
            scaler_skipped=not skip and not stepped,
        )

    def _summed_step(self, global_step: int) -> bool:
        """Return whether this step may use one backward of the weighted loss sum (see ``stats_every``)."""
        return (
            self._coefficients is not None
            and self._usage is not None
            and self.stats_every > 1
            and global_step % self.stats_every != 0
        )

    def _aggregated_gradients(
        self, losses: torch.Tensor, global_step: int
    ) -> tuple[dict[str, torch.Tensor | None], aggregation.AggregationStats | None, float]:
        shared, exclusive = self._gradients(losses)
        if self._average_gradients is not None:
            averaged = self._average_gradients({"shared": shared, "exclusive": exclusive}, global_step)
            shared, exclusive = averaged["shared"], averaged["exclusive"]
        started = time.perf_counter()
        combined, stats = self._combine(shared, global_step)
        aggregation_ms = (time.perf_counter() - started) * 1000.0
        combined.update(exclusive)
        return combined, stats, aggregation_ms

    def _summed_gradients(self, losses: torch.Tensor, global_step: int) -> dict[str, torch.Tensor | None]:
        """Combined gradients from one backward of ``Σ c_k L_k``, for linear aggregators.

        Shared parameters get ``Σ c_k g_k``, which is what ``sum``, ``mean`` and
        ``weighted`` return. A parameter used only by objective ``k`` gets
        ``c_k g_k``, which is divided by ``c_k`` so that it receives that objective's
        gradient unchanged, as on the per-objective path.
        """
        coefficients = self._coefficients
        if coefficients is None:
            raise RuntimeError("the summed-gradient path needs the linear aggregator's coefficients")
        if coefficients.device != losses.device or coefficients.dtype != losses.dtype:
            coefficients = self._coefficients = coefficients.to(losses.device, losses.dtype)
        total = (losses * coefficients).sum()
        parameters = [parameter for _, parameter in self._named]
        grads = torch.autograd.grad(total, parameters, allow_unused=True)
        rescale = self._exclusive_rescale()
        combined: dict[str, torch.Tensor | None] = {}
        for (name, _), grad in zip(self._named, grads, strict=True):
            divisor = rescale.get(name)
            combined[name] = grad / divisor if grad is not None and divisor is not None else grad
        if self._average_gradients is not None:
            combined = self._average_gradients({"combined": combined}, global_step)["combined"]
        return combined

    def _exclusive_rescale(self) -> dict[str, float]:
        """Return the divisor ``c_k`` of each parameter used only by objective ``k``, when ``c_k != 1``.

        Computed once, because parameter usage and coefficients do not change after the first step.
        """
        if self._rescale is None:
            usage = self._usage or {}
            self._rescale = {}
            for name, used in usage.items():
                users = [index for index, flag in enumerate(used) if flag]
                if len(users) == 1 and self._coefficient_values[users[0]] != 1.0:
                    self._rescale[name] = self._coefficient_values[users[0]]
        return self._rescale

    def _gradients(
        self, losses: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor | None], dict[str, torch.Tensor | None]]:
        parameters = [parameter for _, parameter in self._named]
        if self._usage is None:
            usage = objective_usage(self._loss_terms, parameters)
            self._usage = {name: used for (name, _), used in zip(self._named, usage, strict=True)}
        grads = self.gradients(losses, parameters)
        return split_by_usage([name for name, _ in self._named], grads, self._usage)

    def set_monitor(self, state: anomaly.LossMonitorState) -> None:
        """Use ``state`` as the loss monitor, moved to the runner's device."""
        self.monitor_state = anomaly.LossMonitorState(
            history=state.history.to(self.device),
            count=state.count.to(self.device),
            config=state.config,
            scalar=state.scalar,
        )

    def restore_monitor(self, extra: Mapping[str, Any]) -> None:
        """Put back the loss monitor saved with a snapshot or checkpoint in ``extra``.

        A snapshot taken before the first step has none, so the monitor starts over.
        A checkpoint stores it as a plain mapping of its tensors.
        """
        saved = extra.get("loss_monitor")
        if saved is None:
            self.monitor_state = None
        elif isinstance(saved, anomaly.LossMonitorState):
            self.monitor_state = saved
        else:
            self.set_monitor(
                anomaly.LossMonitorState(
                    history=saved["history"],
                    count=saved["count"],
                    config=self._loss_monitor_config,
                    scalar=bool(saved["scalar"]),
                )
            )

    def _monitor(self, losses: torch.Tensor) -> torch.Tensor:
        """Update the loss monitor and return its ``[3]`` summary (non-finite, spike, score)."""
        if self.monitor_state is None:
            self.monitor_state = anomaly.init(losses.shape[0], self._loss_monitor_config, device=losses.device)
        self.monitor_state, verdict = anomaly.update(self.monitor_state, losses.detach())
        return anomaly.summarize(verdict)

    def _combine(
        self, shared: dict[str, torch.Tensor | None], global_step: int
    ) -> tuple[dict[str, torch.Tensor | None], aggregation.AggregationStats | None]:
        if not shared:
            return {}, None
        kwargs: dict[str, Any] = {}
        if self.aggregator_name == "pcgrad":
            kwargs["seed"] = step_seed(self.seed, global_step)
        elif self.aggregator_name == "weighted":
            kwargs["weights"] = self._weights
        result = self._aggregate(shared, stacked=True, **kwargs)
        return dict(result.grad), result.stats

    @staticmethod
    def _finite(losses: torch.Tensor, grads: Mapping[str, torch.Tensor | None], *, check_grads: bool) -> torch.Tensor:
        finite = torch.isfinite(losses).all()
        if check_grads:
            present = [grad for grad in grads.values() if grad is not None and grad.numel() > 0]
            if present:
                # A sum is NaN or infinite when any element is, and reads each tensor once
                # without a temporary (abs().amax() cost 25x more on a 4M-parameter model).
                # NOTE: finite gradients whose sum overflows float32 (beyond 3.4e38) are
                # also reported as non-finite, so such a step is skipped as well.
                sums = torch.stack([grad.detach().sum().float() for grad in present])
                finite = finite & torch.isfinite(sums).all()
        return finite

    def _apply(self, combined: Mapping[str, torch.Tensor | None]) -> bool:
        """Write the gradients, clip them, step the optimizer and return whether it stepped."""
        for name, parameter in self._named:
            grad = combined.get(name)
            parameter.grad = None if grad is None else grad.to(parameter.dtype)
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([parameter for _, parameter in self._named], self.grad_clip_norm)
        stepped = True
        if scaler is not None:
            # GradScaler requires backoff_factor < 1 < growth_factor, so update() lowers the scale
            # if and only if step() found inf or NaN and skipped the optimizer.
            scale = scaler.get_scale()
            scaler.step(self.optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped
