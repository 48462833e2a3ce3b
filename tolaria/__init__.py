"""tolaria: multi-objective PyTorch training that does not fail silently.

The shell's supported names are exported here; the pure core is ``tolaria.functional``.
"""

from tolaria.checkpoint import CheckpointError
from tolaria.config import TrainerConfig
from tolaria.control import AdaptationCommand, EpochState, KasminaClient, OptimizerExecutor, PlateauPolicy, TamiyoClient
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
