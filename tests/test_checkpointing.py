"""CheckpointKeeper and EpochControl paths that a single process reaches only directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tolaria.checkpointing import CheckpointKeeper, TrainingObjects
from tolaria.control import AdaptationCommand, OptimizerExecutor
from tolaria.distributed import DistributedContext
from tolaria.epoch_control import EpochControl, SharedOutcome
from tolaria.functional import anomaly
from tolaria.settings import CheckpointConfig
from tolaria.telemetry import InMemorySink, Telemetry


def make_keeper(tmp_path: Path, telemetry: Telemetry) -> CheckpointKeeper:
    model = torch.nn.Linear(2, 1)
    objects = TrainingObjects(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        None,
        None,
        monitor=lambda: None,
        set_monitor=lambda state: None,
        loss_monitor_config=anomaly.LossMonitorConfig(),
    )
    return CheckpointKeeper(CheckpointConfig(), tmp_path, objects, DistributedContext(), telemetry)


def test_per_rank_values_same_world_size(tmp_path: Path) -> None:
    keeper = make_keeper(tmp_path, Telemetry())
    extra = keeper._local_extra({"epoch": 1, "per_rank": [{"telemetry": {"sequence": 7}}]})
    assert extra["telemetry"] == {"sequence": 7}
    assert extra["epoch"] == 1


def test_other_world_size_takes_rank_zero(tmp_path: Path) -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    keeper = make_keeper(tmp_path, telemetry)
    extra = keeper._local_extra({"epoch": 2, "per_rank": [{"telemetry": "rank0"}, {"telemetry": "rank1"}]})
    assert extra["telemetry"] == "rank0"
    telemetry.flush(0, 0)
    events = sink.events("tolaria.checkpoint.world_size_changed")
    assert len(events) == 1
    assert events[0].attributes["saved_world_size"] == 2
    assert events[0].attributes["world_size"] == 1


class RejectingExecutor:
    """An executor that cannot apply anything."""

    def apply_command(self, command: AdaptationCommand) -> None:
        raise RuntimeError(f"cannot apply {command.kind}")


def test_remote_command_failure_is_reported_and_raised() -> None:
    sink = InMemorySink()
    telemetry = Telemetry([sink])
    control = EpochControl(None, RejectingExecutor(), DistributedContext(), None, telemetry)  # type: ignore[arg-type]
    shared = SharedOutcome(status="applied", command=("adjust_lr", {"factor": 0.5}), timeouts=0, conservative=False)
    with pytest.raises(RuntimeError, match="cannot apply adjust_lr"):
        control._apply_remote(shared, epoch=3)
    assert telemetry.counters["tolaria.command.remote_failures"] == 1
    events = sink.events("tolaria.command.remote_failed")
    assert len(events) == 1
    assert events[0].attributes["error"] == "RuntimeError"


def test_remote_command_applied_with_executor() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    control = EpochControl(None, OptimizerExecutor(optimizer), DistributedContext(), None, Telemetry())  # type: ignore[arg-type]
    shared = SharedOutcome(status="applied", command=("adjust_lr", {"factor": 0.5}), timeouts=0, conservative=False)
    control._apply_remote(shared, epoch=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
