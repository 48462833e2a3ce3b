"""``tolaria demo --inject``: controller and loss faults in the real command, run as a user runs it.

The demo (``tolaria.cli.demo``) gives the controller and the executor 1 s each. A spike
rolls back at once (``on_spike: 1 -> CONSERVATIVE``), a NaN loss raises the level to
ELEVATED, and ``max_rollbacks`` is 3. An epoch has 45 steps at the default batch size of 32.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tolaria.cli import main
from tolaria.cli.demo import DEMO_CONTROL
from tolaria.telemetry import catalog, read_jsonl

STEPS_PER_EPOCH = 45
# Slack for a busy 2-core machine on top of the configured timeouts. Part of it grows
# with the baseline, because a slower machine slows both runs.
MARGIN_S = 1.0
MARGIN_FRACTION = 0.5


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on a shared 2-core machine, OpenMP threads that wait for
    each other make the demo's small steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def demo(*args: str) -> int:
    """Run ``tolaria demo`` in this process and return its exit code."""
    return main(["--log-level", "WARNING", "demo", "--device", "cpu", "--no-progress", *args])


def read_summary(run_dir: Path) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


def event_names(run_dir: Path) -> list[str]:
    return [event.name for packet in read_jsonl(run_dir / "telemetry.jsonl") for event in packet.events]


def assert_fault_summary(summary: dict[str, Any], skipped_batches: int) -> None:
    """Check the summary of the run with ``tamiyo-hang@1 kasmina-error@2 nan@30 spike@60``."""
    assert summary["halted"] is False
    assert summary["halt_reason"] is None
    assert summary["timeouts"] == {"tamiyo": 1, "kasmina": 0}
    # Epoch 1 (controller timed out) and epoch 2 (executor failed) ran in conservative mode.
    assert summary["conservative_epochs"] >= 2
    assert summary["skipped_steps"] == 1
    assert summary["spikes"] == 1
    assert summary["rollbacks"] == 1
    assert summary["skipped_batches"] == skipped_batches >= 2
    assert summary["emergency"] == {"max_level": "CONSERVATIVE", "final_level": "NOMINAL"}
    # The final trajectory ran every batch once, except those skipped after the rollback, and
    # the NaN step (before the restored snapshot) made no update.
    assert summary["global_step"] == 4 * STEPS_PER_EPOCH - skipped_batches - 1
    for value in summary["val_accuracy"].values():
        assert value > 0.9


def test_demo_survives_controller_and_loss_faults(tmp_path: Path) -> None:
    baseline_dir, faulty_dir = tmp_path / "baseline", tmp_path / "faulty"
    assert demo("--epochs", "4", "--out", str(baseline_dir)) == 0
    faults = ("tamiyo-hang@1", "kasmina-error@2", "nan@30", "spike@60")
    injected = [argument for fault in faults for argument in ("--inject", fault)]
    assert demo("--epochs", "4", "--out", str(faulty_dir), *injected) == 0

    summary = read_summary(faulty_dir)
    names = event_names(faulty_dir)
    assert_fault_summary(summary, names.count("tolaria.rollback.batch_skipped"))

    for expected in (
        "timeout_inference",
        "tolaria.command.failed",
        "tolaria.conservative_mode.entered",
        "tolaria.anomaly.nonfinite",
        "tolaria.anomaly.spike",
        "tolaria.rollback.completed",
    ):
        assert expected in names, expected

    # The run may grow by the configured controller and executor timeouts. The slack also
    # covers the 29 steps replayed after the rollback.
    budget = DEMO_CONTROL.tamiyo_timeout_s + DEMO_CONTROL.kasmina_timeout_s
    baseline_s = read_summary(baseline_dir)["wall_time_s"]
    extra_s = summary["wall_time_s"] - baseline_s
    assert extra_s < budget + MARGIN_S + MARGIN_FRACTION * baseline_s, (summary["wall_time_s"], baseline_s)

    # The rollback from step 59 (epoch 1) to the snapshot of step 30 (epoch 0) runs the end
    # of epoch 0 a second time, but the run still has 4 epochs, not 5.
    assert summary["epochs"] == 4


def test_every_fault_emits_only_catalogued_names(tmp_path: Path) -> None:
    run_dir = tmp_path / "all-faults"
    faults = (
        "tamiyo-hang@1",
        "tamiyo-error@2",
        "kasmina-hang@3",
        "kasmina-error@4",
        "nan@30",
        "spike@60",
    )
    injected = [argument for fault in faults for argument in ("--inject", fault)]
    assert demo("--epochs", "5", "--out", str(run_dir), *injected) == 0

    packets = list(read_jsonl(run_dir / "telemetry.jsonl"))
    metric_names = {metric.name for packet in packets for metric in packet.metrics}
    event_names_seen = {event.name for packet in packets for event in packet.events}
    assert catalog.undeclared(metric_names | event_names_seen) == set()
    assert {name for name in metric_names if catalog.lookup_metric(name) is None} == set()
    assert {name for name in event_names_seen if catalog.lookup_event(name) is None} == set()
    for expected in ("timeout_inference", "tolaria.command.failed", "tolaria.rollback.completed"):
        assert expected in event_names_seen


def test_demo_halts_after_too_many_rollbacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Each spike rolls back. The demo allows 3 rollbacks (max_rollbacks), so the fourth spike
    # halts, and with only the first three the run finishes. The spikes are 20 training calls
    # apart, so each comes after the loss monitor's warm-up of 16 losses even when a rollback
    # restored the monitor of the snapshot of step 0.
    run_dir = tmp_path / "halted"
    spikes = ("spike@20", "spike@40", "spike@60", "spike@80")
    injected = [argument for fault in spikes for argument in ("--inject", fault)]
    code = demo("--epochs", "2", "--out", str(run_dir), *injected)

    assert code == 3
    assert "training halted: 3 rollbacks within 1000 steps" in capsys.readouterr().err
    summary = read_summary(run_dir)
    assert summary["halted"] is True
    assert summary["halt_reason"] == "3 rollbacks within 1000 steps"
    assert summary["spikes"] == 4
    assert summary["rollbacks"] == 3
    assert summary["emergency"] == {"max_level": "HALT", "final_level": "HALT"}
    assert (run_dir / "halted" / "latest.json").is_file()
    names = event_names(run_dir)
    assert names.count("tolaria.rollback.completed") == 3
    assert "tolaria.run.halted" in names


def test_demo_three_spikes_do_not_halt(tmp_path: Path) -> None:
    run_dir = tmp_path / "recovered"
    spikes = ("spike@20", "spike@40", "spike@60")
    injected = [argument for fault in spikes for argument in ("--inject", fault)]
    assert demo("--epochs", "2", "--out", str(run_dir), *injected) == 0
    summary = read_summary(run_dir)
    assert summary["halted"] is False
    assert summary["rollbacks"] == 3
    assert summary["emergency"]["max_level"] == "CONSERVATIVE"
    assert not (run_dir / "halted").exists()
