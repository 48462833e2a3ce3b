"""Tests of ``tolaria report``: a normal run, a run with every fault, and a run cut off mid-write."""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import pytest

from tolaria.report import ReportInputError, load_history, run_report
from tolaria.telemetry import JsonlSink, Level, Telemetry

OBJECTIVES = ("digit", "parity", "high")
STEPS_PER_EPOCH = 40


def emit_epoch(telemetry: Telemetry, epoch: int, *, level: int = 0) -> None:
    """Emit the metrics the Trainer reports at the end of ``epoch``."""
    for index, objective in enumerate(OBJECTIVES):
        loss = (index + 1) * math.exp(-0.4 * epoch)
        telemetry.metric("tolaria.train.loss", loss, "1", objective=objective)
        telemetry.metric("tolaria.val.loss", loss * 1.1, "1", objective=objective)
        telemetry.metric(
            "tolaria.val.accuracy", 1.0 - 0.5 * math.exp(-0.5 * epoch) / (index + 1), "1", objective=objective
        )
    telemetry.metric("tolaria.grad_agg.conflict_ratio", 0.3 + 0.02 * epoch, "1")
    telemetry.metric("tolaria.emergency.level", float(level), "1")
    telemetry.metric("tolaria.optim.lr", 0.1 * 0.5 ** (epoch // 3), "1", group=0)
    telemetry.metric("tolaria.train.throughput", 5000.0 + 10 * epoch, "samples/s")
    telemetry.flush(epoch, (epoch + 1) * STEPS_PER_EPOCH)


def write_run(run_dir: Path, *, epochs: int = 8, faults: bool = False) -> Path:
    """Write ``run_dir/telemetry.jsonl`` the way a run does, through the real publisher and JSONL sink."""
    run_dir.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry([JsonlSink(run_dir / "telemetry.jsonl")], run_id="run-test")
    levels = {2: 1, 3: 3, 4: 2, 5: 0} if faults else {}
    for epoch in range(epochs):
        telemetry.set_position(epoch, epoch * STEPS_PER_EPOCH)
        if faults:
            emit_faults(telemetry, epoch)
        emit_epoch(telemetry, epoch, level=levels.get(epoch, 0))
    assert telemetry.close()
    return run_dir / "telemetry.jsonl"


def emit_faults(telemetry: Telemetry, epoch: int) -> None:
    """Emit every kind of fault the report marks, spread over a few epochs."""
    base = epoch * STEPS_PER_EPOCH
    if epoch == 1:
        telemetry.event(
            "timeout_inference", Level.WARNING, task="tamiyo", timeout_s=0.5, elapsed_s=0.5, error="TaskTimeout"
        )
        telemetry.count("tolaria.timeout.tamiyo")
    if epoch == 2:
        telemetry.count("tolaria.anomaly.nonfinite")
        telemetry.event("tolaria.anomaly.nonfinite", Level.WARNING, step=base + 10, reason="nan loss")
        telemetry.event(
            "tolaria.emergency.escalated", Level.WARNING, level="NOTICE", reason="nonfinite", step=base + 10
        )
    if epoch == 3:
        telemetry.event("tolaria.anomaly.spike", Level.WARNING, step=base + 20)
        telemetry.event(
            "tolaria.emergency.escalated", Level.WARNING, level="CONSERVATIVE", reason="spike", step=base + 20
        )
        telemetry.event("tolaria.rollback.started", Level.INFO, step=base + 21, reason="spike")
        telemetry.event("tolaria.rollback.completed", Level.INFO, step=base + 21, tier="fast", restored_step=base)
    if epoch == 4:
        telemetry.event("tolaria.rollback.failed", Level.ERROR, step=base + 5, reason="deadline", error="TaskTimeout")
        telemetry.event("tolaria.timeout.kasmina", Level.WARNING, step=base + 30)
        telemetry.count("tolaria.timeout.kasmina")


def summary_value(text: str, label: str) -> str:
    """Return what the summary prints after ``label`` on the line that starts with it."""
    match = re.search(rf"^{re.escape(label)}  +(.+)$", text, flags=re.MULTILINE)
    assert match is not None, f"no summary line {label!r} in:\n{text}"
    return match.group(1).strip()


def test_normal_run_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "normal"
    write_run(run_dir)
    out = io.StringIO()

    code = run_report(run_dir, out=out)

    text = out.getvalue()
    image = run_dir / "report.png"
    assert code == 0
    assert image.read_bytes().startswith(b"\x89PNG")
    assert image.stat().st_size > 20_000
    assert summary_value(text, "epochs reported") == "8"
    assert summary_value(text, "rollbacks") == "0 completed, 0 failed"
    assert summary_value(text, "emergency level") == "max NOMINAL, last NOMINAL"
    digit_row = next(line for line in text.splitlines() if line.startswith("digit"))
    assert f"{math.exp(-0.4 * 7):.4g}" in digit_row
    assert "(epoch 8)" in digit_row
    assert f"report written to {image}" in text


def test_faulty_run_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "faults"
    write_run(run_dir, faults=True)
    out = io.StringIO()

    assert run_report(run_dir, out=out) == 0

    text = out.getvalue()
    assert summary_value(text, "rollbacks") == "1 completed, 1 failed"
    assert summary_value(text, "timeouts") == "2"
    assert summary_value(text, "skipped steps") == "1"
    assert summary_value(text, "loss spikes") == "1"
    assert summary_value(text, "emergency level") == "max CONSERVATIVE, last NOMINAL"
    assert summary_value(text, "tolaria.timeout.tamiyo") == "1"
    assert summary_value(text, "tolaria.anomaly.nonfinite") == "1"
    assert (run_dir / "report.png").stat().st_size > 20_000


def test_fault_markers_placed_by_step(tmp_path: Path) -> None:
    history = load_history(write_run(tmp_path / "faults", faults=True))

    by_kind = {}
    for marker in history.markers:
        by_kind.setdefault(marker.kind, []).append(marker.x)

    # Epoch 3 spans steps 120..160; the spike at step 140 sits half-way through it.
    assert by_kind["loss spike"] == [pytest.approx(3.5)]
    assert by_kind["skipped step"] == [pytest.approx(2.25)]
    assert by_kind["rollback"] == [pytest.approx(3 + 21 / 40)]
    assert by_kind["rollback failed"] == [pytest.approx(4 + 5 / 40)]
    assert sorted(by_kind["timeout"]) == [pytest.approx(2.0), pytest.approx(4.75)]
    assert len(by_kind["escalation"]) == 2


def test_truncated_run_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "crashed"
    path = write_run(run_dir, epochs=5, faults=True)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    # A corrupt line in the middle and a last line cut off by the crash.
    lines.insert(2, "{not json\n")
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    path.write_text("".join(lines), encoding="utf-8")
    out = io.StringIO()

    with caplog.at_level(logging.WARNING, logger="tolaria.report"):
        assert run_report(run_dir, out=out) == 0

    skipped = [record.getMessage() for record in caplog.records]
    assert len(skipped) == 2
    assert "line 3 is not a telemetry packet" in skipped[0]
    assert f"line {len(lines)} is not a telemetry packet" in skipped[1]
    assert "2 invalid lines skipped" in out.getvalue()
    assert summary_value(out.getvalue(), "epochs reported") == "4"
    assert (run_dir / "report.png").exists()


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match=r"run folder .*nowhere does not exist"):
        run_report(tmp_path / "nowhere")


def test_run_dir_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_text("x", encoding="utf-8")

    with pytest.raises(ReportInputError, match="is not a folder"):
        run_report(path)


def test_missing_telemetry_file(tmp_path: Path) -> None:
    with pytest.raises(ReportInputError, match=r"telemetry file .*telemetry.jsonl not found"):
        run_report(tmp_path)
    assert not (tmp_path / "report.png").exists()


def test_telemetry_file_without_packets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "telemetry.jsonl").write_text('{"source": "tr', encoding="utf-8")

    with (
        caplog.at_level(logging.WARNING, logger="tolaria.report"),
        pytest.raises(ReportInputError, match="contains no valid packet"),
    ):
        run_report(tmp_path)
    assert "line 1 is not a telemetry packet" in caplog.records[0].getMessage()


def test_report_input_error_is_value_error() -> None:
    assert issubclass(ReportInputError, ValueError)
