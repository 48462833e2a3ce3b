"""Cleanup after a committed save: a deletion that fails is logged, emitted and counted, never raised."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tolaria import checkpoint
from tolaria.telemetry import InMemorySink, Level, Telemetry


def _small_state(step: int) -> dict[str, Any]:
    return {"step": step, "weights": torch.full((4,), float(step))}


def _recording_telemetry() -> tuple[Telemetry, InMemorySink]:
    sink = InMemorySink()
    return Telemetry([sink]), sink


def _cleanup_events(telemetry: Telemetry, sink: InMemorySink) -> list[Any]:
    telemetry.flush(0, 0)
    return list(sink.events("tolaria.checkpoint.cleanup_failed"))


def _ended_process_id() -> int:
    """Return the id of a process that has already exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _save_over_blocked_rotation(folder: Path, telemetry: Telemetry) -> tuple[checkpoint.CheckpointInfo, Path]:
    """Save step 1, put a folder in place of its data file, then save step 2 with ``keep_last=1``.

    Returns the step 2 checkpoint and the path whose deletion failed. Unlinking a folder
    fails with ``EISDIR``, a real OS error that root gets as well.
    """
    old = checkpoint.save(folder, _small_state(1), step=1, keep_last=1, telemetry=telemetry)
    old_data = folder / old.manifest.files[0].name
    old_data.unlink()
    old_data.mkdir()
    (old_data / "keep").write_bytes(b"x")

    new = checkpoint.save(folder, _small_state(2), step=2, keep_last=1, telemetry=telemetry)
    return new, old_data


def test_blocked_rotation_keeps_new_checkpoint(tmp_path: Path) -> None:
    telemetry, _ = _recording_telemetry()
    new, old_data = _save_over_blocked_rotation(tmp_path, telemetry)

    assert new.step == 2
    assert checkpoint.list_checkpoints(tmp_path) == (2,)
    latest, state = checkpoint.load_latest(tmp_path)
    assert latest.step == 2
    assert torch.equal(state["weights"], torch.full((4,), 2.0))
    assert old_data.is_dir()
    assert telemetry.counters["tolaria.checkpoint.saved"] == 2


def test_blocked_rotation_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    telemetry, sink = _recording_telemetry()
    with caplog.at_level(logging.WARNING, logger="tolaria.checkpoint"):
        _, old_data = _save_over_blocked_rotation(tmp_path, telemetry)

    assert telemetry.counters["tolaria.checkpoint.cleanup_failures"] == 1
    (event,) = _cleanup_events(telemetry, sink)
    assert event.level == Level.WARNING
    assert event.attributes["path"] == str(tmp_path)
    assert os.strerror(errno.EISDIR) in event.attributes["reason"]
    assert old_data.name in event.attributes["reason"]
    (record,) = [record for record in caplog.records if "cleaning up old checkpoints" in record.getMessage()]
    assert record.levelno == logging.WARNING
    assert os.strerror(errno.EISDIR) in record.getMessage()


@pytest.fixture
def stale_temp_file(tmp_path: Path) -> Path:
    """Return a temporary file that a crashed save of an ended process left in ``tmp_path``."""
    stale = tmp_path / f".checkpoint-000000000001-deadbeef.pt.0a1b2c3d.{_ended_process_id()}.tmp"
    stale.write_bytes(b"partial write of a crashed save")
    return stale


def _fail_unlink_of(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``Path.unlink`` raise ``PermissionError`` for ``path`` only; every other unlink is real.

    Root may delete any file, so this simulates the EACCES that another user's file in a
    shared folder gives.
    """
    real_unlink = Path.unlink

    def failing_unlink(self: Path, missing_ok: bool = False) -> None:
        if self == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", failing_unlink)


def test_undeletable_stale_temp_file_is_reported(
    tmp_path: Path, stale_temp_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry, sink = _recording_telemetry()
    _fail_unlink_of(stale_temp_file, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="tolaria.checkpoint"):
        info = checkpoint.save(tmp_path, _small_state(1), step=1, telemetry=telemetry)

    assert checkpoint.load(info)["step"] == 1
    assert stale_temp_file.exists()
    assert telemetry.counters["tolaria.checkpoint.cleanup_failures"] == 1
    (event,) = _cleanup_events(telemetry, sink)
    assert os.strerror(errno.EACCES) in event.attributes["reason"]
    assert stale_temp_file.name in event.attributes["reason"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(stale_temp_file.name in message for message in warnings)


def test_stale_temp_file_deleted_on_next_save(
    tmp_path: Path, stale_temp_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    telemetry, _ = _recording_telemetry()
    _fail_unlink_of(stale_temp_file, monkeypatch)
    checkpoint.save(tmp_path, _small_state(1), step=1, telemetry=telemetry)
    assert telemetry.counters["tolaria.checkpoint.cleanup_failures"] == 1

    monkeypatch.undo()
    checkpoint.save(tmp_path, _small_state(2), step=2, telemetry=telemetry)
    assert not stale_temp_file.exists()
    assert telemetry.counters["tolaria.checkpoint.cleanup_failures"] == 1
