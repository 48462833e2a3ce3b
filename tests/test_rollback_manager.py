"""Tests of ``RollbackManager`` on a real model, optimizer, scheduler, scaler, checkpoints and worker."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from torch import nn
from torch.nn import functional

from tolaria import checkpoint
from tolaria.rollback import AttemptStatus, DeadlineSignal, RollbackManager, Tier
from tolaria.telemetry import InMemorySink, Level, Telemetry
from tolaria.worker import AsyncWorker, CancelToken

MIB = 1024 * 1024


class Net(nn.Module):
    """A small model with parameters, BatchNorm buffers and dropout (which draws from the torch RNG)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(inputs)))))


class Run:
    """A model with Adam, a StepLR schedule and a CPU GradScaler, trained on random batches."""

    def __init__(self) -> None:
        torch.manual_seed(1)
        self.model = Net()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu")

    def step(self) -> float:
        """One optimizer step on a batch drawn from the torch and Python RNGs; return the loss."""
        inputs = torch.randn(32, 8)
        targets = inputs.sum(dim=1, keepdim=True) * random.uniform(0.5, 1.5)
        loss = functional.mse_loss(self.model(inputs), targets)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item()

    def manager(self, **kwargs: Any) -> RollbackManager:
        kwargs.setdefault("capacity_bytes", 4 * MIB)
        return RollbackManager(self.model, self.optimizer, scheduler=self.scheduler, scaler=self.scaler, **kwargs)

    def training_state(self, step: int, **extra: Any) -> dict[str, Any]:
        return checkpoint.capture_training_state(
            step=step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            extra=extra,
        )


def _model_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_model_equals(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{name} differs"


def _optimizer_copy(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    return {
        "state": {
            index: {key: value.clone() for key, value in entry.items()} for index, entry in state["state"].items()
        },
        "param_groups": [dict(group) for group in state["param_groups"]],
    }


def _assert_optimizer_equals(optimizer: torch.optim.Optimizer, expected: dict[str, Any]) -> None:
    state = optimizer.state_dict()
    assert state["param_groups"] == expected["param_groups"]
    assert state["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert state["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(state["state"][index][key], value), f"optimizer state {index}/{key} differs"


def _events(sink: InMemorySink, name: str) -> list[Any]:
    return list(sink.events(name))


@pytest.fixture
def telemetry() -> tuple[Telemetry, InMemorySink]:
    sink = InMemorySink()
    return Telemetry(sinks=[sink]), sink


@pytest.fixture
def worker() -> Iterator[AsyncWorker]:
    shared = AsyncWorker(max_concurrency=2, name="test-rollback")
    yield shared
    shared.shutdown(timeout=1.0)


# -- fast tier -----------------------------------------------------------------------------


def test_snapshot_isolated_from_live_updates() -> None:
    run = Run()
    run.step()
    manager = run.manager()
    before = _model_copy(run.model)
    manager.snapshot(1)

    with torch.no_grad():
        for parameter in run.model.parameters():
            parameter.add_(1.0)
    run.model.norm.running_mean.mul_(3.0)

    result = manager.rollback(1, reason="test")
    assert result.ok
    _assert_model_equals(run.model, before)

    with torch.no_grad():
        run.model.fc1.weight.zero_()
    assert manager.rollback(1, reason="again").ok
    _assert_model_equals(run.model, before)


def test_restore_keeps_tensor_identity() -> None:
    run = Run()
    run.step()
    manager = run.manager()
    manager.snapshot(1)
    weight = run.model.fc1.weight
    exp_avg = run.optimizer.state[weight]["exp_avg"]
    run.step()
    manager.rollback(1, reason="test")
    assert run.model.fc1.weight is weight
    assert run.optimizer.state[weight]["exp_avg"] is exp_avg


def test_adam_state_restored_exactly() -> None:
    run = Run()
    for _ in range(3):
        run.step()
    manager = run.manager()
    manager.snapshot(3)
    optimizer_before = _optimizer_copy(run.optimizer)
    scheduler_before = run.scheduler.state_dict()
    scaler_before = run.scaler.state_dict()
    model_before = _model_copy(run.model)

    for _ in range(3):
        run.step()
    assert run.optimizer.state_dict()["param_groups"][0]["lr"] != optimizer_before["param_groups"][0]["lr"]

    result = manager.rollback(5, reason="test")
    assert result.restored_step == 3
    _assert_optimizer_equals(run.optimizer, optimizer_before)
    assert run.scheduler.state_dict() == scheduler_before
    assert run.scaler.state_dict() == scaler_before
    _assert_model_equals(run.model, model_before)
    assert all(parameter.grad is None for parameter in run.model.parameters())


def test_training_after_rollback_repeats_losses() -> None:
    run = Run()
    for _ in range(2):
        run.step()
    manager = run.manager()
    manager.snapshot(2)
    first = [run.step() for _ in range(4)]
    assert manager.rollback(2, reason="test").ok
    second = [run.step() for _ in range(4)]
    assert first == second


def test_rng_states_restored() -> None:
    run = Run()
    manager = run.manager()
    manager.snapshot(0)
    expected = (random.random(), torch.rand(3), numpy.random.rand(2))
    random.random()
    torch.rand(5)
    manager.rollback(0, reason="test")
    actual = (random.random(), torch.rand(3), numpy.random.rand(2))
    assert actual[0] == expected[0]
    assert torch.equal(actual[1], expected[1])
    assert numpy.array_equal(actual[2], expected[2])


def test_snapshot_before_first_step_drops_later_optimizer_state() -> None:
    run = Run()
    manager = run.manager()
    manager.snapshot(0)
    first_loss = run.step()
    assert len(run.optimizer.state) > 0
    manager.rollback(0, reason="test")
    assert len(run.optimizer.state) == 0
    assert run.step() == first_loss


def test_extra_returned_as_copy() -> None:
    run = Run()
    manager = run.manager()
    position = {"epoch": 1, "batch": [3, 4]}
    manager.snapshot(7, extra=position)
    position["batch"].append(5)
    result = manager.rollback(9, reason="test")
    assert result.extra == {"epoch": 1, "batch": [3, 4]}


def test_rollback_restores_newest_before_target() -> None:
    run = Run()
    manager = run.manager()
    for step in (2, 4, 6, 8):
        run.step()
        manager.snapshot(step)
    result = manager.rollback(5, reason="spike")
    assert result.restored_step == 4
    assert result.hit
    assert manager.cached_steps == (2, 4)


def test_buffers_reused_after_eviction() -> None:
    run = Run()
    size = run.manager().snapshot(0)
    manager = run.manager(capacity_bytes=2 * size + size // 2)
    for step in range(6):
        run.step()
        manager.snapshot(step)
        assert manager.size_bytes <= manager.capacity_bytes
    assert manager.cached_steps == (4, 5)
    assert manager.pool.allocations <= 3
    assert manager.pool.reuses >= 3


def test_snapshot_same_step_replaces() -> None:
    run = Run()
    run.step()
    manager = run.manager()
    size = manager.snapshot(3)
    run.step()
    after_step = _model_copy(run.model)
    assert manager.snapshot(3) == size
    assert manager.size_bytes == size
    assert manager.cached_steps == (3,)
    run.step()
    manager.rollback(3, reason="test")
    _assert_model_equals(run.model, after_step)


def test_snapshot_larger_than_capacity_rejected() -> None:
    run = Run()
    manager = run.manager(capacity_bytes=1024)
    with pytest.raises(ValueError, match="can never fit a cache of capacity_bytes=1024"):
        manager.snapshot(0)


def test_rollback_without_sources_fails_visibly(telemetry: tuple[Telemetry, InMemorySink]) -> None:
    sink_telemetry, sink = telemetry
    run = Run()
    manager = run.manager(telemetry=sink_telemetry)
    manager.snapshot(10)
    result = manager.rollback(5, reason="nonfinite")
    assert result.tier is Tier.NONE
    assert result.status is AttemptStatus.FAILED
    assert result.restored_step is None
    assert "no snapshot or checkpoint at or before step 5" in (result.error or "")
    assert sink_telemetry.counters["tolaria.rollback.failures"] == 1
    failed = _events(sink, "tolaria.rollback.failed")
    assert len(failed) == 1
    assert failed[0].level is Level.ERROR
    assert failed[0].attributes["reason"] == "nonfinite"


def test_fast_rollback_telemetry(telemetry: tuple[Telemetry, InMemorySink]) -> None:
    sink_telemetry, sink = telemetry
    run = Run()
    manager = run.manager(telemetry=sink_telemetry)
    manager.snapshot(1)
    result = manager.rollback(1, reason="loss_spike")
    sink_telemetry.flush(0, 1)
    assert result.latency_ms >= 0.0
    assert sink_telemetry.counters["tolaria.rollback.fast_hits"] == 1
    assert sink_telemetry.counters["tolaria.rollback.snapshots"] == 1
    started = _events(sink, "tolaria.rollback.started")
    completed = _events(sink, "tolaria.rollback.completed")
    assert [event.attributes["reason"] for event in started + completed] == ["loss_spike", "loss_spike"]
    assert completed[0].attributes["tier"] == "fast"
    assert completed[0].attributes["restored_step"] == 1
    latencies = [
        metric for packet in sink.packets for metric in packet.metrics if metric.name == "tolaria.rollback.latency_ms"
    ]
    assert len(latencies) == 1


def test_mismatched_snapshot_falls_back_to_checkpoint(
    tmp_path: Path, worker: AsyncWorker, telemetry: tuple[Telemetry, InMemorySink]
) -> None:
    sink_telemetry, sink = telemetry
    run = Run()
    run.step()
    checkpoint.save(tmp_path, run.training_state(1), step=1)
    expected = _model_copy(run.model)
    manager = run.manager(checkpoint_dir=tmp_path, worker=worker, telemetry=sink_telemetry)
    manager.snapshot(2)
    run.model.double()

    result = manager.rollback(2, reason="test")
    assert result.ok
    assert result.tier is Tier.FULL
    assert result.restored_step == 1
    actual = run.model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor.to(actual[name].dtype)), name
    failed = _events(sink, "tolaria.rollback.failed")
    assert len(failed) == 1
    assert failed[0].attributes["tier"] == "fast"
    assert "torch.float64" in failed[0].attributes["error"]


def test_changed_optimizer_fails_both_tiers(
    tmp_path: Path, worker: AsyncWorker, telemetry: tuple[Telemetry, InMemorySink]
) -> None:
    sink_telemetry, _ = telemetry
    run = Run()
    checkpoint.save(tmp_path, run.training_state(0), step=0)
    manager = run.manager(checkpoint_dir=tmp_path, worker=worker, telemetry=sink_telemetry)
    manager.snapshot(1)
    run.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    live = _model_copy(run.model)

    result = manager.rollback(1, reason="test")
    assert result.status is AttemptStatus.FAILED
    assert result.tier is Tier.FULL
    assert "parameter groups" in (result.error or "")
    assert sink_telemetry.counters["tolaria.rollback.failures"] == 2
    # The optimizer check runs before any write, so the fast tier left the model alone.
    del live


# -- full tier -----------------------------------------------------------------------------


def test_full_tier_restores_checkpoint(
    tmp_path: Path, worker: AsyncWorker, telemetry: tuple[Telemetry, InMemorySink]
) -> None:
    sink_telemetry, _ = telemetry
    run = Run()
    for _ in range(2):
        run.step()
    checkpoint.save(tmp_path, run.training_state(2, batch=17), step=2)
    model_at_2 = _model_copy(run.model)
    optimizer_at_2 = _optimizer_copy(run.optimizer)
    following = [run.step() for _ in range(3)]

    manager = run.manager(checkpoint_dir=tmp_path, worker=worker, telemetry=sink_telemetry)
    result = manager.rollback(4, reason="nonfinite")
    assert result.ok
    assert result.tier is Tier.FULL
    assert not result.hit
    assert result.restored_step == 2
    assert result.extra == {"batch": 17}
    _assert_model_equals(run.model, model_at_2)
    _assert_optimizer_equals(run.optimizer, optimizer_at_2)
    assert sink_telemetry.counters["tolaria.rollback.full_restores"] == 1
    assert [run.step() for _ in range(3)] == following


def test_full_tier_skips_corrupted_checkpoint(
    tmp_path: Path, worker: AsyncWorker, telemetry: tuple[Telemetry, InMemorySink]
) -> None:
    sink_telemetry, sink = telemetry
    run = Run()
    run.step()
    checkpoint.save(tmp_path, run.training_state(1), step=1)
    model_at_1 = _model_copy(run.model)
    run.step()
    newest = checkpoint.save(tmp_path, run.training_state(2), step=2)
    data_file = newest.directory / newest.manifest.files[0].name
    data_file.write_bytes(data_file.read_bytes()[:-10])

    manager = run.manager(checkpoint_dir=tmp_path, worker=worker, telemetry=sink_telemetry)
    result = manager.rollback(3, reason="test")
    assert result.restored_step == 1
    _assert_model_equals(run.model, model_at_1)
    sink_telemetry.flush(0, 3)
    fallbacks = _events(sink, "tolaria.checkpoint.fallback")
    assert len(fallbacks) == 1
    assert fallbacks[0].level is Level.WARNING


class SlowLoader:
    """Loads a real checkpoint after ``delay_s`` seconds; optionally ignores cancellation."""

    def __init__(self, delay_s: float, *, cooperative: bool) -> None:
        self.delay_s = delay_s
        self.cooperative = cooperative
        self.cancelled_at: float | None = None
        self.finished = threading.Event()

    def __call__(
        self, directory: Path, *, at_or_before: int, cancel: CancelToken, telemetry: Telemetry
    ) -> tuple[checkpoint.CheckpointInfo, dict[str, Any]]:
        try:
            if self.cooperative:
                if cancel.wait(self.delay_s):
                    self.cancelled_at = time.monotonic()
                cancel.raise_if_cancelled()
            else:
                time.sleep(self.delay_s)
            return checkpoint.load_latest(directory, at_or_before=at_or_before, cancel=cancel, telemetry=telemetry)
        finally:
            self.finished.set()


@pytest.mark.parametrize("cooperative", [True, False], ids=["cooperative", "ignores-cancel"])
def test_full_tier_deadline_returns_on_time(
    tmp_path: Path, worker: AsyncWorker, telemetry: tuple[Telemetry, InMemorySink], cooperative: bool
) -> None:
    sink_telemetry, sink = telemetry
    run = Run()
    run.step()
    checkpoint.save(tmp_path, run.training_state(1), step=1)
    run.step()
    live = _model_copy(run.model)
    signals: list[DeadlineSignal] = []
    loader = SlowLoader(5.0, cooperative=cooperative)
    manager = run.manager(
        checkpoint_dir=tmp_path,
        worker=worker,
        telemetry=sink_telemetry,
        checkpoint_loader=loader,
        on_deadline_exceeded=signals.append,
    )

    wall_before = time.time()
    started = time.monotonic()
    result = manager.rollback(2, reason="loss_spike", deadline_s=0.2)
    elapsed = time.monotonic() - started

    assert elapsed < 0.3
    assert result.status is AttemptStatus.DEADLINE_EXCEEDED
    assert result.tier is Tier.FULL
    assert result.restored_step is None
    _assert_model_equals(run.model, live)

    signal = manager.deadline_signal
    assert signal is not None
    assert signals == [signal]
    assert signal.target_step == 2
    assert signal.deadline_s == pytest.approx(0.2)
    assert started + 0.2 <= signal.monotonic_s <= started + elapsed
    assert wall_before <= signal.wall_time_s <= time.time()
    assert sink_telemetry.counters["tolaria.rollback.deadline_exceeded"] == 1
    exceeded = _events(sink, "tolaria.rollback.deadline_exceeded")
    assert len(exceeded) == 1
    assert exceeded[0].attributes["reason"] == "loss_spike"

    if cooperative:
        assert loader.finished.wait(2.0)
        assert loader.cancelled_at is not None
        assert loader.cancelled_at < started + 1.0
        _assert_model_equals(run.model, live)
    manager.clear_deadline_signal()
    assert manager.deadline_signal is None


def test_deadline_callback_failure_reported(
    tmp_path: Path, worker: AsyncWorker, telemetry: tuple[Telemetry, InMemorySink]
) -> None:
    sink_telemetry, sink = telemetry
    run = Run()
    checkpoint.save(tmp_path, run.training_state(0), step=0)

    def broken(signal: DeadlineSignal) -> None:
        raise RuntimeError(f"listener down at step {signal.target_step}")

    manager = run.manager(
        checkpoint_dir=tmp_path,
        worker=worker,
        telemetry=sink_telemetry,
        checkpoint_loader=SlowLoader(5.0, cooperative=True),
        on_deadline_exceeded=broken,
    )
    result = manager.rollback(0, reason="test", deadline_s=0.1)
    assert result.status is AttemptStatus.DEADLINE_EXCEEDED
    assert sink_telemetry.counters["tolaria.rollback.hook_failures"] == 1
    failed = _events(sink, "tolaria.rollback.hook_failed")
    assert "listener down at step 0" in failed[0].attributes["reason"]


def test_manager_owned_worker_closed(tmp_path: Path) -> None:
    run = Run()
    checkpoint.save(tmp_path, run.training_state(0), step=0)
    with run.manager(checkpoint_dir=tmp_path) as manager:
        assert manager.rollback(0, reason="test").tier is Tier.FULL
        owned = manager._worker
        assert owned is not None
    assert owned.closed


@pytest.mark.parametrize("deadline", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_deadline_rejected(deadline: float) -> None:
    with pytest.raises(ValueError, match="deadline_s must be a finite number of seconds > 0"):
        Run().manager(deadline_s=deadline)


def test_closed_worker_fails_full_tier(tmp_path: Path, telemetry: tuple[Telemetry, InMemorySink]) -> None:
    sink_telemetry, _ = telemetry
    run = Run()
    checkpoint.save(tmp_path, run.training_state(0), step=0)
    closed = AsyncWorker(max_concurrency=1, name="closed")
    closed.shutdown(timeout=1.0)
    manager = run.manager(checkpoint_dir=tmp_path, worker=closed, telemetry=sink_telemetry)
    result = manager.rollback(0, reason="test")
    assert result.status is AttemptStatus.FAILED
    assert result.tier is Tier.FULL
    assert (result.error or "").startswith("WorkerClosed")
    assert sink_telemetry.counters["tolaria.rollback.failures"] == 1


@pytest.mark.parametrize("step", [-1, "3", 2.0])
def test_bad_target_step_rejected(step: object) -> None:
    with pytest.raises(ValueError, match="target_step must be a non-negative int"):
        Run().manager().rollback(step, reason="test")  # type: ignore[arg-type]
