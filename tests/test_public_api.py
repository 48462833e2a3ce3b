"""The supported public surface, pinned so that changes to it are deliberate."""

from __future__ import annotations

import importlib

import pytest

PUBLIC_SURFACE = {
    "tolaria": [
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
    ],
    "tolaria.functional": ["aggregation", "anomaly", "breaker", "emergency", "rollback"],
    "tolaria.functional.aggregation": [
        "AGGREGATOR_NAMES",
        "Aggregate",
        "AggregationStats",
        "Aggregator",
        "RavelSpec",
        "get",
        "mean_grads",
        "pcgrad",
        "pcgrad_orders",
        "ravel_pytree",
        "sum_grads",
        "unravel_pytree",
        "weighted",
    ],
    "tolaria.worker": None,
    "tolaria.telemetry": None,
}


@pytest.mark.parametrize("module_name", sorted(name for name, names in PUBLIC_SURFACE.items() if names is not None))
def test_all_is_pinned(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC_SURFACE[module_name] or [])


@pytest.mark.parametrize("module_name", sorted(PUBLIC_SURFACE))
def test_every_exported_name_resolves(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_no_legacy_names_exported() -> None:
    import tolaria

    exported = {name.lower() for name in tolaria.__all__}
    for legacy in ("legacy", "compat", "deprecated", "v1", "spec"):
        assert not any(legacy in name for name in exported)
