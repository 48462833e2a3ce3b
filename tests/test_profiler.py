"""Tests of ``TrainingProfiler``: the schedule, trace names, exclusive files and export failures."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tolaria.profiler import ProfilerConfig, ProfilerExportError, TrainingProfiler
from tolaria.telemetry import InMemorySink, Level, Telemetry

NAME = re.compile(
    r"^(?P<run>[\w.-]+)\.rank(?P<rank>\d+)\.pid(?P<pid>\d+)\.epoch(?P<epoch>\d+)\.step(?P<step>\d+)\."
    r"(?P<stamp>\d{8}T\d{6}\.\d{6}Z)\.(?P<sequence>\d{6})\.pt\.trace\.json$"
)


def _work() -> None:
    torch.randn(16, 16) @ torch.randn(16, 16)


def _profiled_steps(names: list[Path]) -> list[list[int]]:
    steps = []
    for path in names:
        body = json.loads(path.read_text())
        events = body["traceEvents"] if isinstance(body, dict) else body
        numbers = {
            int(event["name"].split("#")[1]) for event in events if event.get("name", "").startswith("ProfilerStep#")
        }
        steps.append(sorted(numbers))
    return steps


def _telemetry() -> tuple[Telemetry, InMemorySink]:
    sink = InMemorySink()
    return Telemetry(sinks=[sink]), sink


def _run(profiler: TrainingProfiler, steps: int, epoch: int = 0) -> None:
    with profiler:
        for step in range(steps):
            _work()
            profiler.step(epoch, step)


def test_enabled_without_trace_dir_rejected() -> None:
    with pytest.raises(ValueError, match=r"ProfilerConfig.trace_dir: got None; expected a folder"):
        ProfilerConfig(enabled=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("wait", -1), ("warmup", -1), ("active", 0), ("repeat", -1), ("warn_trace_bytes", 0), ("active", 1.5)],
)
def test_bad_schedule_rejected(tmp_path: Path, field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"ProfilerConfig.{field}: got {value!r}; expected an integer"):
        ProfilerConfig(enabled=True, trace_dir=tmp_path, **{field: value})


def test_active_steps_honoured(tmp_path: Path) -> None:
    telemetry, sink = _telemetry()
    config = ProfilerConfig(enabled=True, trace_dir=tmp_path, wait=1, warmup=1, active=2, repeat=2)
    profiler = TrainingProfiler(config, run_id="run/1", rank=3, telemetry=telemetry)
    _run(profiler, 10, epoch=4)

    traces = list(profiler.traces)
    assert len(traces) == 2
    assert sorted(tmp_path.iterdir()) == sorted(traces)
    assert _profiled_steps(traces) == [[2, 3], [6, 7]]

    parsed = [NAME.match(path.name) for path in traces]
    assert all(match is not None for match in parsed)
    first, second = (match.groupdict() for match in parsed if match is not None)
    assert first["run"] == "run_1"
    assert first["rank"] == "3"
    assert first["pid"] == str(os.getpid())
    assert (first["epoch"], first["step"]) == ("4", "3")
    assert (second["epoch"], second["step"]) == ("4", "7")
    assert int(second["sequence"]) > int(first["sequence"])

    telemetry.flush(0, 10)
    assert telemetry.counters["tolaria.profiler.traces_written"] == 2
    sizes = [
        metric.value
        for packet in sink.packets
        for metric in packet.metrics
        if metric.name == "tolaria.profiler.trace_bytes"
    ]
    assert sizes == [float(path.stat().st_size) for path in traces]
    assert all(size > 0 for size in sizes)


def test_two_runs_same_second_distinct_files(tmp_path: Path) -> None:
    config = ProfilerConfig(enabled=True, trace_dir=tmp_path, wait=0, warmup=1, active=1, repeat=1)
    first = TrainingProfiler(config, run_id="same", rank=0)
    second = TrainingProfiler(config, run_id="same", rank=0)
    _run(first, 3)
    _run(second, 3)

    files = sorted(tmp_path.iterdir())
    assert len(files) == 2
    assert set(files) == {*first.traces, *second.traces}
    parsed = [NAME.match(path.name) for path in files]
    fields = [match.groupdict() for match in parsed if match is not None]
    assert len(fields) == 2
    identity = [(item["run"], item["rank"], item["pid"], item["epoch"], item["step"]) for item in fields]
    assert identity[0] == identity[1]
    assert fields[0]["sequence"] != fields[1]["sequence"]
    assert all(path.stat().st_size > 0 for path in files)
    assert all(json.loads(path.read_text()) for path in files)


def test_second_active_profiler_rejected(tmp_path: Path) -> None:
    config = ProfilerConfig(enabled=True, trace_dir=tmp_path)
    with TrainingProfiler(config, run_id="one"):
        other = TrainingProfiler(config, run_id="two")
        with pytest.raises(RuntimeError, match="another TrainingProfiler is already running in this process"):
            other.start()
    with TrainingProfiler(config, run_id="three") as third:
        third.step(0, 0)


def test_existing_files_never_overwritten(tmp_path: Path) -> None:
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    config = ProfilerConfig(enabled=True, trace_dir=tmp_path, wait=0, warmup=1, active=1, repeat=3)
    for _ in range(2):
        _run(TrainingProfiler(config, run_id="again", rank=0), 8)
    assert keep.read_text() == "mine"
    assert len(list(tmp_path.glob("*.pt.trace.json"))) == 6


def test_unwritable_folder_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the trace folder should be")
    telemetry, sink = _telemetry()
    config = ProfilerConfig(enabled=True, trace_dir=blocker / "traces", wait=0, warmup=1, active=1, repeat=1)
    profiler = TrainingProfiler(config, run_id="broken", rank=0, telemetry=telemetry)
    _run(profiler, 4)

    assert profiler.traces == ()
    assert telemetry.counters["tolaria.profiler.export_failures"] == 1
    [event] = sink.events("tolaria.profiler.export_failed")
    assert event.level is Level.ERROR
    assert event.attributes["path"].startswith(str(blocker / "traces"))
    assert event.attributes["error"] in ("FileExistsError", "NotADirectoryError")


def test_unwritable_folder_raises_in_strict_mode(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    telemetry, sink = _telemetry()
    config = ProfilerConfig(
        enabled=True, trace_dir=blocker / "traces", wait=0, warmup=1, active=1, repeat=1, strict=True
    )
    profiler = TrainingProfiler(config, run_id="strict", rank=0, telemetry=telemetry)
    with pytest.raises(ProfilerExportError, match=r"profiler trace .*not-a-folder/traces/strict\.rank0"):
        _run(profiler, 4)
    assert len(sink.events("tolaria.profiler.export_failed")) == 1


def test_large_trace_warned(tmp_path: Path) -> None:
    telemetry, sink = _telemetry()
    config = ProfilerConfig(enabled=True, trace_dir=tmp_path, wait=0, warmup=1, active=1, repeat=1, warn_trace_bytes=1)
    _run(TrainingProfiler(config, run_id="big", rank=0, telemetry=telemetry), 3)
    telemetry.flush(0, 3)
    [event] = sink.events("tolaria.profiler.trace_large")
    assert event.level is Level.WARNING
    assert event.attributes["limit_bytes"] == 1
    assert event.attributes["bytes"] > 1


def test_disabled_profiler_does_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "unused"
    profiler = TrainingProfiler(ProfilerConfig(enabled=False, trace_dir=folder), run_id="off")
    _run(profiler, 5)
    assert profiler.traces == ()
    assert not folder.exists()


def test_negative_rank_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rank must be a non-negative int, got -1"):
        TrainingProfiler(ProfilerConfig(), run_id="x", rank=-1)
