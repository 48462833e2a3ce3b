"""Tests of ``tolaria report``: a normal run, a run with every fault, and a run cut off mid-write."""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import pytest

from tolaria.control.outcome import CallResult
from tolaria.control.reporting import ControlReporter
from tolaria.emergency import EmergencyController
from tolaria.functional.emergency import EmergencyPolicy, StepSignals
from tolaria.functional.rollback import AttemptStatus, RestoreAttempt, RollbackDecision, Tier
from tolaria.report import ReportInputError, load_history, run_report
from tolaria.rollback.reporting import report_failure, report_success
from tolaria.telemetry import JsonlSink, Level, Telemetry
from tolaria.worker import AsyncWorker

OBJECTIVES = ("digit", "parity", "high")
STEPS_PER_EPOCH = 40


def emit_epoch(telemetry: Telemetry, epoch: int, *, level: int | None = 0) -> None:
    """Emit the metrics the Trainer reports at the end of ``epoch``; ``level=None`` leaves the emergency level out."""
    for index, objective in enumerate(OBJECTIVES):
        loss = (index + 1) * math.exp(-0.4 * epoch)
        telemetry.metric("tolaria.train.loss", loss, "1", objective=objective)
        telemetry.metric("tolaria.val.loss", loss * 1.1, "1", objective=objective)
        telemetry.metric(
            "tolaria.val.accuracy", 1.0 - 0.5 * math.exp(-0.5 * epoch) / (index + 1), "1", objective=objective
        )
    telemetry.metric("tolaria.grad_agg.conflict_ratio", 0.3 + 0.02 * epoch, "1")
    if level is not None:
        telemetry.metric("tolaria.emergency.level", float(level), "1")
    telemetry.metric("tolaria.optim.lr", 0.1 * 0.5 ** (epoch // 3), "1", group=0)
    telemetry.metric("tolaria.train.throughput", 5000.0 + 10 * epoch, "samples/s")
    telemetry.flush(epoch, (epoch + 1) * STEPS_PER_EPOCH)


def write_run(run_dir: Path, *, epochs: int = 8, faults: bool = False) -> Path:
    """Write ``run_dir/telemetry.jsonl`` the way a run does, through the real publisher and JSONL sink."""
    run_dir.mkdir(parents=True, exist_ok=True)
    telemetry = Telemetry([JsonlSink(run_dir / "telemetry.jsonl")], run_id="run-test")
    levels = {2: 1, 3: 3, 4: 2, 5: 0} if faults else {}
    worker = AsyncWorker(name="report-test", telemetry=telemetry)
    try:
        reporter = ControlReporter(telemetry, worker)
        for epoch in range(epochs):
            telemetry.set_position(epoch, epoch * STEPS_PER_EPOCH)
            if faults:
                emit_faults(telemetry, reporter, epoch)
            emit_epoch(telemetry, epoch, level=levels.get(epoch, 0))
    finally:
        worker.shutdown(timeout=2.0)
    assert telemetry.close()
    return run_dir / "telemetry.jsonl"


def restore_attempt(target_step: int, restored_step: int | None, error: str | None = None) -> RestoreAttempt:
    """Return a finished fast-tier restore of ``target_step``; a failed one when ``restored_step`` is ``None``."""
    decision = RollbackDecision(Tier.FAST, target_step, restored_step, 10.0, "snapshot_available")
    status = AttemptStatus.FAILED if restored_step is None else AttemptStatus.RESTORED
    return RestoreAttempt(decision, status, 1.0, 1.001, restored_step, error)


def emit_faults(telemetry: Telemetry, reporter: ControlReporter, epoch: int) -> None:
    """Emit every kind of fault the report marks, spread over a few epochs, through the real reporters."""
    base = epoch * STEPS_PER_EPOCH
    if epoch == 0:
        telemetry.event("tolaria.emergency.escalated", Level.INFO, level="NOTICE", reason="slow", step=base + 30)
    if epoch == 1:
        timeout = CallResult("timed_out", "tamiyo.evaluate_epoch", latency_s=0.5, error=TimeoutError("no result"))
        reporter.call_finished("tamiyo", timeout, 0.5, epoch)
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
        report_success(telemetry, restore_attempt(base + 21, base + 21), "spike", 1.0)
    if epoch == 4:
        report_failure(telemetry, restore_attempt(base + 5, None, "checksum mismatch"), "spike", 2.0)
        error = RuntimeError("bad command")
        failure = CallResult("failed", "kasmina.apply_command", latency_s=0.01, error=error, reason=str(error))
        reporter.call_finished("kasmina", failure, 1.0, epoch)
    if epoch == 5:
        timeout = CallResult("timed_out", "kasmina.apply_command", latency_s=1.0, error=TimeoutError("no result"))
        reporter.call_finished("kasmina", timeout, 1.0, epoch)


def summary_value(text: str, label: str) -> str:
    """Return what the summary prints after ``label`` on the line that starts with it."""
    match = re.search(rf"^{re.escape(label)}  +(.+)$", text, flags=re.MULTILINE)
    assert match is not None, f"no summary line {label!r} in:\n{text}"
    return match.group(1).strip()


def summary_values(text: str, expected: dict[str, str]) -> dict[str, str]:
    """Return what the summary prints after each label of ``expected``, to compare with it in one assertion."""
    return {label: summary_value(text, label) for label in expected}


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
    expected = {
        "epochs reported": "8",
        "rollbacks": "0 completed, 0 failed",
        "timeouts": "0 (controller 0, executor 0)",
        "emergency level": "max NOMINAL, last NOMINAL",
    }
    assert summary_values(text, expected) == expected
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
    expected = {
        "rollbacks": "1 completed, 1 failed",
        "timeouts": "2 (controller 1, executor 1)",
        "control call failures": "controller 0, executor 1",
        "skipped steps": "1",
        "loss spikes": "1",
        "emergency level": "max CONSERVATIVE, last NOMINAL",
        "tolaria.timeout.tamiyo": "1",
        "tolaria.timeout.kasmina": "1",
        "tolaria.anomaly.nonfinite": "1",
    }
    assert summary_values(text, expected) == expected
    assert (run_dir / "report.png").stat().st_size > 20_000


def markers_by_kind(run: Path) -> dict[str, list[float]]:
    """Return ``{marker kind: [x, ...]}`` of the run whose telemetry file is ``run``."""
    by_kind: dict[str, list[float]] = {}
    for marker in load_history(run).markers:
        by_kind.setdefault(marker.kind, []).append(marker.x)
    return by_kind


def test_fault_markers_placed_by_step(tmp_path: Path) -> None:
    by_kind = markers_by_kind(write_run(tmp_path / "faults", faults=True))

    # Epoch 3 spans steps 120..160; the spike at step 140 sits half-way through it.
    assert by_kind["loss spike"] == [pytest.approx(3.5)]
    assert by_kind["skipped step"] == [pytest.approx(2.25)]
    assert by_kind["escalation"] == [pytest.approx(0.75), pytest.approx(2.25), pytest.approx(3.5)]


def test_rollback_markers_placed_by_target_step(tmp_path: Path) -> None:
    # Rollback events carry target_step (where the trouble was) and restored_step, not step. The failed one is an
    # ERROR, flushed at once in a packet whose step is the start of its epoch.
    by_kind = markers_by_kind(write_run(tmp_path / "faults", faults=True))

    assert by_kind["rollback"] == [pytest.approx(3 + 21 / 40)]
    assert by_kind["rollback failed"] == [pytest.approx(4 + 5 / 40)]


def test_control_trouble_markers_come_from_events(tmp_path: Path) -> None:
    by_kind = markers_by_kind(write_run(tmp_path / "faults", faults=True))

    # The control events carry no step: they sit at the end of their epoch.
    assert by_kind["controller timeout"] == [pytest.approx(2.0)]
    assert by_kind["executor failure"] == [pytest.approx(5.0)]
    assert by_kind["executor timeout"] == [pytest.approx(6.0)]
    assert "timeout" not in by_kind


def test_emergency_max_reads_the_epoch_max_level(tmp_path: Path) -> None:
    # CONSERVATIVE in the middle of epoch 1, back to ELEVATED by its end, NOMINAL level
    # metrics elsewhere: only tolaria.emergency.max_level holds CONSERVATIVE.
    run_dir = tmp_path / "emergency"
    run_dir.mkdir()
    telemetry = Telemetry([JsonlSink(run_dir / "telemetry.jsonl")], run_id="run-emergency")
    controller = EmergencyController(EmergencyPolicy(cooldown_steps=5), telemetry=telemetry)
    try:
        for epoch in range(3):
            base = epoch * STEPS_PER_EPOCH
            telemetry.set_position(epoch, base)
            if epoch == 1:
                controller.escalate("CONSERVATIVE", reason="test spike", step=base + 10)
                for step in range(base + 11, base + 17):
                    controller.observe(StepSignals(step))
                assert controller.level.name == "ELEVATED"
            controller.emit_epoch_metrics()
            emit_epoch(telemetry, epoch, level=None)
    finally:
        controller.close()
    assert telemetry.close()
    out = io.StringIO()

    assert run_report(run_dir, out=out) == 0

    assert summary_value(out.getvalue(), "emergency level") == "max CONSERVATIVE, last ELEVATED"


def test_final_packet_keeps_epoch_step_ranges(tmp_path: Path) -> None:
    # After a crash the last packet can carry epoch 0 / step 0 with metrics. A repeated
    # packet of epoch 1 can carry a step inside that epoch. Neither may move a marker.
    path = write_run(tmp_path / "crashed", epochs=4, faults=True)
    telemetry = Telemetry([JsonlSink(path)], run_id="run-test")
    telemetry.metric("tolaria.train.loss", 0.5, "1", objective="digit")
    telemetry.flush(1, 50)
    telemetry.event("tolaria.run.failed", Level.ERROR, reason="exception during training", epoch=0, step=0)
    telemetry.metric("tolaria.checkpoint.bytes", 1024.0, "B")
    telemetry.flush(0, 0)
    assert telemetry.close()

    history = load_history(path)

    # Epoch 0 spans steps 0..40, epoch 2 spans 80..120, epoch 3 spans 120..160.
    assert [m.x for m in history.markers if m.kind == "escalation"] == [0.75, 2.25, 3.5]
    assert [marker.x for marker in history.markers if marker.kind == "skipped step"] == [pytest.approx(2.25)]
    assert [marker.x for marker in history.markers if marker.kind == "loss spike"] == [pytest.approx(3.5)]
    assert [m.x for m in history.markers if m.kind == "controller timeout"] == [pytest.approx(2.0)]


def test_finish_packet_is_not_an_epoch(tmp_path: Path) -> None:
    # The Trainer's last flush carries the next epoch number with a few metrics but no training metrics.
    path = write_run(tmp_path / "finished", epochs=3)
    telemetry = Telemetry([JsonlSink(path)], run_id="run-test")
    telemetry.event("tolaria.run.finished", Level.INFO, epoch=3, step=3 * STEPS_PER_EPOCH)
    telemetry.metric("tolaria.checkpoint.bytes", 1024.0, "B")
    telemetry.flush(3, 3 * STEPS_PER_EPOCH)
    assert telemetry.close()
    out = io.StringIO()

    assert run_report(tmp_path / "finished", out=out) == 0

    assert summary_value(out.getvalue(), "epochs reported") == "3"


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

    skipped = [record.getMessage() for record in caplog.records if record.name == "tolaria.report"]
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
