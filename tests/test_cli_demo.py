"""The ``tolaria demo`` command as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tolaria.cli import main
from tolaria.cli.output import EpochTable
from tolaria.results import EpochMetrics
from tolaria.telemetry import read_jsonl

SCRIPT = Path(sys.executable).with_name("tolaria")


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tolaria", *args], cwd=cwd, capture_output=True, text=True, timeout=240, check=False
    )


def test_demo_one_epoch_writes_summary_and_telemetry(tmp_path: Path) -> None:
    out = tmp_path / "run"
    completed = run_module("demo", "--epochs", "1", "--out", str(out), "--aggregator", "mean", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1
    assert summary["aggregator"] == "mean"
    assert set(summary["val_accuracy"]) == {"digit", "parity", "high"}
    for value in summary["val_accuracy"].values():
        assert 0.5 < value <= 1.0
    assert summary["wall_time_s"] > 0
    packets = list(read_jsonl(out / "telemetry.jsonl"))
    losses = [metric for packet in packets for metric in packet.metrics if metric.name == "tolaria.train.loss"]
    assert {metric.attributes["objective"] for metric in losses} == {"digit", "parity", "high"}
    assert all(math.isfinite(metric.value) for metric in losses)
    assert "epoch" in completed.stdout
    assert "validation accuracy" in completed.stdout


def test_halted_demo_prints_no_accuracy(tmp_path: Path) -> None:
    # Batches of two make the losses noisy enough for three spike rollbacks in the first epoch.
    out = tmp_path / "run"
    completed = run_module("demo", "--epochs", "1", "--batch-size", "2", "--out", str(out), cwd=tmp_path)

    assert completed.returncode == 3, completed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["halted"] is True
    assert summary["val_accuracy"] == {}
    assert "validation accuracy: none measured;" in completed.stdout
    assert "training halted:" in completed.stderr


@pytest.mark.skipif(not SCRIPT.exists(), reason="the tolaria console script is not installed in this environment")
def test_console_script_matches_module(tmp_path: Path) -> None:
    by_module = tmp_path / "module"
    by_script = tmp_path / "script"
    args = ["demo", "--epochs", "1", "--aggregator", "sum", "--seed", "7"]
    module_run = run_module(*args, "--out", str(by_module), cwd=tmp_path)
    script_run = subprocess.run(
        [str(SCRIPT), *args, "--out", str(by_script)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
        check=False,
    )
    assert module_run.returncode == 0, module_run.stderr
    assert script_run.returncode == 0, script_run.stderr
    module_summary = json.loads((by_module / "summary.json").read_text())
    script_summary = json.loads((by_script / "summary.json").read_text())
    assert module_summary["val_accuracy"] == script_summary["val_accuracy"]
    assert module_summary["train_loss"] == script_summary["train_loss"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs: got 0; expected an integer >= 1"),
        (["--lr", "-1"], "--lr: got -1.0; expected a finite number > 0 (default: 0.002)"),
        (["--lr", "nan"], "--lr: got nan"),
        (["--aggregator", "median"], "invalid choice: 'median'"),
        (["--batch-size", "0"], "--batch-size: got 0; expected an integer >= 1"),
        (["--threads", "0"], "--threads: got 0; expected an integer >= 1"),
        (["--device", "tpu"], "--device: got 'tpu'"),
        (["--epochs", "three"], "invalid int value: 'three'"),
        (
            ["--weights", "1", "2", "3"],
            "--weights: got 1 2 3 with --aggregator pcgrad, which takes no weights; add --aggregator weighted",
        ),
    ],
)
def test_bad_option_exits_2_and_writes_nothing(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(["demo", *args, "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_run_folder_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"kept": true}')
    code = main(["demo", "--epochs", "1", "--out", str(out)])
    assert code == 2
    assert "already contains a run (summary.json); choose a new folder" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == {"kept": True}


def test_bad_option_in_subprocess_exits_2(tmp_path: Path) -> None:
    completed = run_module("demo", "--epochs", "-1", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert completed.returncode == 2
    assert "tolaria demo: error: --epochs: got -1" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(("aggregation", "cell"), [({"conflict_ratio": 1 / 3}, "0.333"), ({}, "-")])
def test_epoch_table_conflict_cell(
    aggregation: dict[str, float], cell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # sum, mean and weighted compute statistics every stats_every steps, so an epoch can have none.
    metrics = EpochMetrics(
        epoch=0,
        global_step=8,
        train_loss={"a": 0.5},
        val_loss={"a": 0.6},
        val_accuracy={"a": 0.9},
        aggregation=aggregation,
        learning_rates=(0.01,),
        samples_per_s=100.0,
        skipped_steps=0,
        wall_time_s=1.0,
    )

    EpochTable(["a"])(metrics)

    cells = capsys.readouterr().out.split()
    assert cells[3] == cell
    assert "nan" not in cells
