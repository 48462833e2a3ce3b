"""``TrainerConfig``: the typed, validated settings of a training run.

Every field is checked when the object is built, so a bad value fails before any
work starts. Errors are ``ValueError`` messages of the form
``TrainerConfig.<field>: got <value>; expected <rule>``. A config can also be read
from a TOML file whose top-level keys are the field names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tolaria.functional.anomaly import LossMonitorConfig
from tolaria.functional.emergency import EmergencyPolicy
from tolaria.profiler import ProfilerConfig
from tolaria.settings import CheckpointConfig, ControlConfig, SafetyConfig, section_from_mapping

__all__ = ["AGGREGATORS", "AMP_MODES", "GRADIENT_MODES", "TrainerConfig"]

AGGREGATORS = ("sum", "mean", "weighted", "pcgrad")
AMP_MODES = ("off", "bf16", "fp16")
GRADIENT_MODES = ("auto", "batched", "loop")


_SECTION_TYPES: dict[str, type] = {
    "emergency": EmergencyPolicy,
    "loss_monitor": LossMonitorConfig,
    "safety": SafetyConfig,
    "checkpoint": CheckpointConfig,
    "control": ControlConfig,
    "profiler": ProfilerConfig,
}
_SECTION_BUILDERS: dict[str, Any] = {
    "emergency": EmergencyPolicy.from_mapping,
    "loss_monitor": LossMonitorConfig.from_mapping,
    "safety": lambda data: section_from_mapping(SafetyConfig, data),
    "checkpoint": lambda data: section_from_mapping(CheckpointConfig, data),
    "control": lambda data: section_from_mapping(ControlConfig, data),
    "profiler": lambda data: section_from_mapping(ProfilerConfig, data),
}


def _fail(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"TrainerConfig.{field}: got {value!r}; expected {expected}")


def _check_positive_int(field: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(field, value, f"an integer >= {low}")


def _check_positive_float(field: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _fail(field, value, "a finite number > 0" + (" or None" if allow_none else ""))


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(field, value, "one of " + ", ".join(repr(choice) for choice in choices))


def _check_device(value: Any) -> None:
    if not isinstance(value, str) or not (value in ("auto", "cpu") or value.startswith("cuda")):
        raise _fail("device", value, "'auto', 'cpu', 'cuda' or 'cuda:N'")


def _check_writable_folder(field: str, value: Path | None) -> None:
    """Check that ``value`` exists as a writable folder, or could be created as one."""
    if value is None:
        return
    existing = value
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise _fail(field, str(value), f"a folder path, but {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail(field, str(value), f"a writable folder, but {existing} is not writable; choose another path")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Settings of one training run.

    Attributes:
        epochs: number of passes over the training data, >= 1.
        aggregator: how per-objective gradients of shared parameters are combined:
            ``"sum"``, ``"mean"``, ``"weighted"`` or ``"pcgrad"``.
        weights: one non-negative weight per objective, in the order the objectives
            return their losses; required by ``"weighted"`` and rejected otherwise.
        lr: when set, every parameter group's learning rate is set to this value
            when ``fit`` starts; ``None`` keeps the optimizer's own.
        seed: seeds Python, NumPy and torch RNGs and the per-step PCGrad orders.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: mixed precision: ``"off"``, ``"bf16"`` (autocast, CPU or CUDA) or ``"fp16"``
            (autocast with a ``torch.amp.GradScaler``; CUDA only).
        grad_clip_norm: clip the total gradient 2-norm to this value; ``None`` disables clipping.
        gradient_mode: how per-objective gradients are computed: ``"batched"`` (one
            backward with ``is_grads_batched=True``), ``"loop"`` (one backward per
            objective) or ``"auto"`` (batched, falling back to loop with a warning when
            an operation has no batching rule).
        stats_every: with the linear aggregators (``sum``, ``mean``, ``weighted``),
            compute per-objective gradients and the aggregation statistics every this
            many steps. The other steps take one backward of the weighted loss sum,
            which gives the same update. ``1`` computes statistics on every step.
            PCGrad always computes per-objective gradients.
        out_dir: folder for telemetry and checkpoints; created when ``fit`` starts.
        progress: show a progress bar on standard error.
        emergency: how step signals map to emergency levels (TOML table ``[emergency]``).
        loss_monitor: spike detection settings (TOML table ``[loss_monitor]``).
        safety: snapshots, rollback and broadcasting (TOML table ``[safety]``).
        checkpoint: on-disk checkpoints, written only when ``out_dir`` is set
            (TOML table ``[checkpoint]``).
        control: controller and executor calls (TOML table ``[control]``).
        profiler: ``torch.profiler`` settings (TOML table ``[profiler]``).
    """

    epochs: int = 10
    aggregator: str = "pcgrad"
    weights: tuple[float, ...] | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "off"
    grad_clip_norm: float | None = None
    gradient_mode: str = "auto"
    stats_every: int = 50
    out_dir: Path | None = None
    progress: bool = False
    emergency: EmergencyPolicy = dataclasses.field(default_factory=EmergencyPolicy)
    loss_monitor: LossMonitorConfig = dataclasses.field(default_factory=LossMonitorConfig)
    safety: SafetyConfig = dataclasses.field(default_factory=SafetyConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    control: ControlConfig = dataclasses.field(default_factory=ControlConfig)
    profiler: ProfilerConfig = dataclasses.field(default_factory=ProfilerConfig)

    def __post_init__(self) -> None:
        if self.out_dir is not None and not isinstance(self.out_dir, Path):
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.weights is not None and not isinstance(self.weights, tuple):
            object.__setattr__(self, "weights", tuple(self.weights))
        self._validate()

    def _validate(self) -> None:
        _check_positive_int("epochs", self.epochs)
        _check_choice("aggregator", self.aggregator, AGGREGATORS)
        self._validate_weights()
        _check_positive_float("lr", self.lr, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise _fail("seed", self.seed, "an integer in [0, 2**63)")
        _check_device(self.device)
        _check_choice("amp", self.amp, AMP_MODES)
        _check_positive_float("grad_clip_norm", self.grad_clip_norm, allow_none=True)
        _check_choice("gradient_mode", self.gradient_mode, GRADIENT_MODES)
        _check_positive_int("stats_every", self.stats_every)
        _check_writable_folder("out_dir", self.out_dir)
        for name, kind in _SECTION_TYPES.items():
            if not isinstance(getattr(self, name), kind):
                raise _fail(name, getattr(self, name), f"a {kind.__name__} or a TOML table of its fields")

    def _validate_weights(self) -> None:
        if self.aggregator == "weighted" and self.weights is None:
            raise _fail("weights", None, "one weight per objective when aggregator is 'weighted'")
        if self.aggregator != "weighted" and self.weights is not None:
            raise _fail("weights", self.weights, f"None, because aggregator {self.aggregator!r} takes no weights")
        for weight in self.weights or ():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise _fail("weights", self.weights, "a sequence of numbers")
            if not math.isfinite(weight) or weight < 0:
                raise _fail("weights", self.weights, "finite weights >= 0")

    def check_objectives(self, names: tuple[str, ...]) -> None:
        """Check the settings that depend on the objectives' names.

        Raises:
            ValueError: ``weights`` has a different length from ``names``.
        """
        if self.weights is not None and len(self.weights) != len(names):
            raise _fail(
                "weights",
                self.weights,
                f"{len(names)} weights, one for each objective {list(names)}",
            )

    def replace(self, **changes: Any) -> TrainerConfig:
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TrainerConfig:
        """Build a config from a mapping of field names to values.

        Raises:
            ValueError: a key is not a field, or a value is invalid.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TrainerConfig: unknown fields {unknown}; valid fields are {sorted(names)}")
        values = dict(data)
        if "out_dir" in values and values["out_dir"] is not None:
            values["out_dir"] = Path(values["out_dir"])
        for name, build in _SECTION_BUILDERS.items():
            if isinstance(values.get(name), Mapping):
                values[name] = build(values[name])
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> TrainerConfig:
        """Read a config from a TOML file whose top-level keys are field names.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not valid TOML, or a key or value is invalid.
        """
        with Path(path).open("rb") as file:
            try:
                data = tomllib.load(file)
            except tomllib.TOMLDecodeError as error:
                raise ValueError(f"{path}: invalid TOML: {error}") from error
        return cls.from_mapping(data)
