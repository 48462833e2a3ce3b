"""tolaria: multi-objective PyTorch training that does not fail silently.

The shell's supported names are exported here; the pure core is ``tolaria.functional``.
Names are imported on first use (PEP 562), so ``import tolaria.worker`` or
``import tolaria.telemetry`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tolaria.checkpoint import CheckpointError
    from tolaria.config import TrainerConfig
    from tolaria.control import (
        AdaptationCommand,
        EpochState,
        KasminaClient,
        OptimizerExecutor,
        PlateauPolicy,
        TamiyoClient,
    )
    from tolaria.data import EpochBatches
    from tolaria.distributed import DistributedContext, RankFailure
    from tolaria.emergency import EmergencyController
    from tolaria.loop import StepRecord
    from tolaria.profiler import ProfilerConfig
    from tolaria.results import EpochMetrics, FitResult
    from tolaria.rollback import RollbackManager, RollbackResult
    from tolaria.settings import CheckpointConfig, ControlConfig, SafetyConfig
    from tolaria.telemetry import Level, Telemetry
    from tolaria.trainer import Trainer
    from tolaria.worker import AsyncWorker, CancelToken, TaskTimeout, WorkerClosed, WorkerSaturated

_EXPORTS = {
    "AdaptationCommand": "tolaria.control",
    "AsyncWorker": "tolaria.worker",
    "CancelToken": "tolaria.worker",
    "CheckpointConfig": "tolaria.settings",
    "CheckpointError": "tolaria.checkpoint",
    "ControlConfig": "tolaria.settings",
    "DistributedContext": "tolaria.distributed",
    "EmergencyController": "tolaria.emergency",
    "EpochBatches": "tolaria.data",
    "EpochMetrics": "tolaria.results",
    "EpochState": "tolaria.control",
    "FitResult": "tolaria.results",
    "KasminaClient": "tolaria.control",
    "Level": "tolaria.telemetry",
    "OptimizerExecutor": "tolaria.control",
    "PlateauPolicy": "tolaria.control",
    "ProfilerConfig": "tolaria.profiler",
    "RankFailure": "tolaria.distributed",
    "RollbackManager": "tolaria.rollback",
    "RollbackResult": "tolaria.rollback",
    "SafetyConfig": "tolaria.settings",
    "StepRecord": "tolaria.loop",
    "TamiyoClient": "tolaria.control",
    "TaskTimeout": "tolaria.worker",
    "Telemetry": "tolaria.telemetry",
    "Trainer": "tolaria.trainer",
    "TrainerConfig": "tolaria.config",
    "WorkerClosed": "tolaria.worker",
    "WorkerSaturated": "tolaria.worker",
}

__all__ = [
    "AdaptationCommand",
    "AsyncWorker",
    "CancelToken",
    "CheckpointConfig",
    "CheckpointError",
    "ControlConfig",
    "DistributedContext",
    "EmergencyController",
    "EpochBatches",
    "EpochMetrics",
    "EpochState",
    "FitResult",
    "KasminaClient",
    "Level",
    "OptimizerExecutor",
    "PlateauPolicy",
    "ProfilerConfig",
    "RankFailure",
    "RollbackManager",
    "RollbackResult",
    "SafetyConfig",
    "StepRecord",
    "TamiyoClient",
    "TaskTimeout",
    "Telemetry",
    "Trainer",
    "TrainerConfig",
    "WorkerClosed",
    "WorkerSaturated",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tolaria' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
