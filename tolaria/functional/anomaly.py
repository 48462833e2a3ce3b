"""Loss anomaly detection: non-finite losses and spikes, on device and without host syncs.

``init`` builds a ``LossMonitorState`` and ``update(state, loss)`` judges one step's
loss and returns the new state and a ``LossVerdict`` of tensors. Nothing here reads
a value back to the host, so the caller decides when to pay for that read, for
example with one ``summarize(verdict).tolist()`` per step.

Method: a robust z-score against a sliding window. The state keeps the last
``window`` finite losses of each objective in a ring buffer (a tensor; empty slots
hold NaN). A new loss ``x`` is compared with the window's median ``m`` and median
absolute deviation ``MAD``::

    scale = max(1.4826 * MAD, min_relative_scale * |m|)
    score = (x - m) / scale
    spike = score > threshold          (only once `warmup` finite losses were seen)

1.4826 turns the MAD into a standard deviation for normally distributed losses.
The floor ``min_relative_scale * |m|`` stops a nearly constant loss from turning
tiny wobbles into spikes. The test is one-sided: only a loss far *above* the
recent median is a spike, while a sudden drop is not flagged.

Properties:

* Scale invariance: multiplying every loss by a constant ``c > 0`` multiplies
  ``x``, ``m``, ``MAD`` and the floor by ``c``, so the score and every verdict stay
  the same. They are bit for bit the same when ``c`` is a power of two. For other
  ``c`` a score can move by a rounding error, which changes a verdict only for a
  score within that error of the threshold.
* Losses of any sign work. For negative losses "above" still means "larger", that
  is towards zero or positive. If the window holds only zeros, the scale is 0: a
  positive loss then scores ``inf`` (a spike) and a zero loss scores 0.
* A non-finite loss is always flagged in ``nonfinite``, never written to the
  window and never counted towards the warm-up, so it cannot pollute the
  statistics. Its ``score`` is 0 and its ``spike`` is false.
* Spikes are written to the window. The median ignores a few outliers, and a
  lasting change of level stops being flagged once it fills half of the window.

A monitor watches either one scalar loss (``init()``) or a vector of ``n``
per-objective losses (``init(n)``); each objective has its own window and warm-up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import optree
import torch

__all__ = [
    "MAD_TO_SIGMA",
    "LossMonitorConfig",
    "LossMonitorState",
    "LossVerdict",
    "init",
    "merge",
    "summarize",
    "update",
]

MAD_TO_SIGMA = 1.4826
"""Factor that turns a median absolute deviation into a standard deviation for normal data."""


def _check_number(name: str, value: object, *, minimum: float, inclusive: bool) -> float:
    """Return ``value`` as a float if it is a finite real number above ``minimum``, else raise ``ValueError``."""
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if valid:
        valid = value >= minimum if inclusive else value > minimum  # type: ignore[operator]
    if not valid:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name}={value!r} is invalid; expected a finite number {bound}")
    return float(value)  # type: ignore[arg-type]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")
    return value


@dataclasses.dataclass(frozen=True)
class LossMonitorConfig:
    """Parameters of the spike test.

    Attributes:
        window: number of recent finite losses per objective the statistics use
            (default 64, at least 3).
        warmup: finite losses an objective must have seen before its spikes are
            flagged (default 16, between 1 and ``window``).
        threshold: robust z-score above which a loss is a spike (default 20.0, > 0).
        min_relative_scale: floor of the scale as a fraction of ``|median|``
            (default 1.0, >= 0). With the defaults a loss must exceed the median by
            at least 20 times the median to be a spike. Mini-batch losses late in
            training are heavy-tailed (one misclassified sample can raise a batch's
            loss tenfold), and lower defaults flagged ordinary batches of the digits
            demo as spikes.

    Raises:
        ValueError: a field is invalid; the message names it and echoes the value.
    """

    window: int = 64
    warmup: int = 16
    threshold: float = 20.0
    min_relative_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_int("window", self.window, 3)
        _check_int("warmup", self.warmup, 1)
        if self.warmup > self.window:
            raise ValueError(
                f"warmup={self.warmup} is invalid; expected at most window={self.window} "
                "because the statistics only see the last `window` losses"
            )
        object.__setattr__(self, "threshold", _check_number("threshold", self.threshold, minimum=0, inclusive=False))
        object.__setattr__(
            self,
            "min_relative_scale",
            _check_number("min_relative_scale", self.min_relative_scale, minimum=0, inclusive=True),
        )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> LossMonitorConfig:
        """Build a config from a mapping such as a parsed TOML table; missing keys keep their defaults.

        Raises:
            ValueError: a key is unknown (the message lists the allowed keys) or a value is invalid.
        """
        if not isinstance(mapping, Mapping):
            raise ValueError(f"loss monitor config={mapping!r} is invalid; expected a mapping of config fields")
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in mapping if key not in allowed)
        if unknown:
            raise ValueError(f"unknown loss monitor keys {unknown}; allowed keys are {allowed}")
        return cls(**mapping)

    def to_mapping(self) -> dict[str, Any]:
        """Return the config as plain data that ``from_mapping`` accepts."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class LossMonitorState:
    """Immutable state of a loss monitor, a pytree in the ``"tolaria"`` optree namespace.

    Leaves are ``history`` and ``count``; ``config`` and ``scalar`` are metadata.
    Flatten with ``optree.tree_flatten(state, namespace="tolaria")``.

    Attributes:
        history: ``[n, window]`` floating tensor, the ring buffer of recent finite
            losses per objective; empty slots hold NaN.
        count: ``[n]`` int64 tensor, finite losses seen per objective. The next
            loss of objective ``i`` goes to slot ``count[i] % window``.
        config: parameters of the spike test.
        scalar: whether the monitor watches one scalar loss (shape ``[]``) rather
            than a vector of ``n`` losses.
    """

    history: torch.Tensor
    count: torch.Tensor
    config: LossMonitorConfig
    scalar: bool

    @property
    def loss_shape(self) -> tuple[int, ...]:
        """Shape ``update`` expects: ``()`` for a scalar monitor, ``(n,)`` otherwise."""
        return () if self.scalar else (int(self.history.shape[0]),)


def _flatten_state(
    state: LossMonitorState,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[LossMonitorConfig, bool], tuple[str, str]]:
    return (state.history, state.count), (state.config, state.scalar), ("history", "count")


def _unflatten_state(metadata: tuple[LossMonitorConfig, bool], children: tuple[torch.Tensor, ...]) -> LossMonitorState:
    history, count = children
    config, scalar = metadata
    return LossMonitorState(history=history, count=count, config=config, scalar=scalar)


# optree's stubs type nodes as collections of leaves; the registration itself is the documented API.
optree.register_pytree_node(
    LossMonitorState,  # type: ignore[arg-type]
    _flatten_state,  # type: ignore[arg-type]
    _unflatten_state,  # type: ignore[arg-type]
    namespace="tolaria",
)


class LossVerdict(NamedTuple):
    """Verdict on one step's loss; every field has the loss's shape (``[]`` or ``[n]``).

    Attributes:
        nonfinite: bool tensor, the loss is NaN or infinite.
        spike: bool tensor, the loss is a spike (finite, after warm-up, score above threshold).
        score: floating tensor, the robust z-score; 0 where the loss is non-finite or
            the objective is still warming up.
    """

    nonfinite: torch.Tensor
    spike: torch.Tensor
    score: torch.Tensor


def init(
    num_losses: int | None = None,
    config: LossMonitorConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LossMonitorState:
    """Build an empty monitor for a scalar loss (``num_losses=None``) or ``num_losses`` objectives.

    Args:
        num_losses: number of per-objective losses, or ``None`` for one scalar loss.
        config: spike test parameters; ``LossMonitorConfig()`` when ``None``.
        dtype: floating dtype of the statistics; losses are cast to it. float32 or
            wider is recommended.
        device: device of the state; losses must live on the same device.

    Raises:
        ValueError: ``num_losses`` is not a positive int, or ``dtype`` is not floating point.
    """
    if num_losses is not None:
        _check_int("num_losses", num_losses, 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid; expected a floating point torch.dtype such as torch.float32")
    config = LossMonitorConfig() if config is None else config
    rows = 1 if num_losses is None else num_losses
    return LossMonitorState(
        history=torch.full((rows, config.window), math.nan, dtype=dtype, device=device),
        count=torch.zeros(rows, dtype=torch.int64, device=device),
        config=config,
        scalar=num_losses is None,
    )


def _check_loss(state: LossMonitorState, loss: torch.Tensor) -> None:
    """Raise unless ``loss`` is a floating tensor of the monitor's shape on the monitor's device."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if tuple(loss.shape) != state.loss_shape:
        raise ValueError(
            f"loss has shape {tuple(loss.shape)}; this monitor expects shape {state.loss_shape} "
            "(build it with init(num_losses) to match)"
        )
    if not loss.dtype.is_floating_point:
        raise ValueError(f"loss has dtype {loss.dtype}; expected a floating point dtype")
    if loss.device != state.history.device:
        raise ValueError(
            f"loss is on {loss.device} but the monitor state is on {state.history.device}; "
            "build the state with init(..., device=loss.device)"
        )


def _nan_median(rows: torch.Tensor) -> torch.Tensor:
    """Return the median ``[n]`` of the non-NaN entries of each row of ``rows`` ``[n, w]``; NaN for an all-NaN row.

    An even count gives the mean of the two middle values. Built from ``sort`` and
    ``gather`` because ``torch.nanmedian(dim=...)`` has no deterministic CUDA kernel
    (torch 2.13 raises under ``torch.use_deterministic_algorithms(True)``).
    """
    valid = (~torch.isnan(rows)).sum(dim=-1, keepdim=True)
    ordered = torch.sort(rows, dim=-1).values  # torch.sort places NaN after every number.
    lower = ordered.gather(-1, ((valid - 1).clamp(min=0) // 2)).squeeze(-1)
    upper = ordered.gather(-1, (valid // 2).clamp(max=rows.shape[-1] - 1)).squeeze(-1)
    return (lower + upper) / 2


def _robust_score(history: torch.Tensor, values: torch.Tensor, config: LossMonitorConfig) -> torch.Tensor:
    """Return the robust z-score ``[n]`` of ``values`` ``[n]`` against the windows ``history`` ``[n, window]``."""
    median = _nan_median(history)
    spread = _nan_median((history - median.unsqueeze(-1)).abs())
    scale = torch.maximum(MAD_TO_SIGMA * spread, config.min_relative_scale * median.abs())
    deviation = values - median

    # The scale is zero only when the window contains nothing but zeros, so any rise is infinitely unusual.
    unusual = torch.where(deviation > 0, math.inf, 0.0).to(values.dtype)
    return torch.where(scale > 0, deviation / scale, unusual)


def update(state: LossMonitorState, loss: torch.Tensor) -> tuple[LossMonitorState, LossVerdict]:
    """Judge one step's loss and return the new state and the verdict.

    Args:
        state: the monitor state from ``init`` or the previous ``update``.
        loss: ``[]`` (scalar monitor) or ``[n]`` floating tensor on the state's
            device; it is detached and cast to the state's dtype.

    Returns:
        The new state, with the finite losses written to the window, and a
        ``LossVerdict`` whose tensors have the loss's shape.

    Raises:
        TypeError: ``loss`` is not a tensor.
        ValueError: ``loss`` has the wrong shape, a non-floating dtype or another device.
    """
    _check_loss(state, loss)
    config = state.config
    values = loss.detach().to(state.history.dtype).reshape(-1)
    finite = torch.isfinite(values)

    # Judge against the window as it was before this loss.
    judged = finite & (state.count >= config.warmup)
    score = torch.where(judged, _robust_score(state.history, values, config), torch.zeros_like(values))
    spike = judged & (score > config.threshold)

    # Write finite losses to their ring-buffer slot; a non-finite loss leaves its row untouched.
    slots = torch.arange(config.window, device=values.device)
    write = (slots == (state.count % config.window).unsqueeze(-1)) & finite.unsqueeze(-1)
    history = torch.where(write, values.unsqueeze(-1), state.history)
    count = state.count + finite.to(torch.int64)

    new_state = dataclasses.replace(state, history=history, count=count)
    shape = state.loss_shape
    verdict = LossVerdict(nonfinite=(~finite).reshape(shape), spike=spike.reshape(shape), score=score.reshape(shape))
    return new_state, verdict


def merge(first: LossVerdict, second: LossVerdict) -> LossVerdict:
    """Combine two verdicts of the same shape: flags are OR-ed and the larger score is kept.

    Lets the caller read the verdicts of several steps at once (every ``check_every`` steps).
    """
    return LossVerdict(
        nonfinite=first.nonfinite | second.nonfinite,
        spike=first.spike | second.spike,
        score=torch.maximum(first.score, second.score),
    )


def summarize(verdict: LossVerdict) -> torch.Tensor:
    """Pack a verdict into one float32 tensor ``[3]`` so that a single host read gets all of it.

    Returns:
        ``[any nonfinite (0 or 1), any spike (0 or 1), max score]`` on the verdict's device.
    """
    return torch.stack(
        [
            verdict.nonfinite.any().to(torch.float32),
            verdict.spike.any().to(torch.float32),
            verdict.score.max().to(torch.float32),
        ]
    )
