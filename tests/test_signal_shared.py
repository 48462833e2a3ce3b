"""Tests of the shared memory emergency signal, in this process and across processes."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from tolaria.emergency_signals import (
    SIGNAL_LAYOUT_SIZE,
    SharedMemorySignal,
    SharedMemorySignalWatcher,
    SignalReading,
)
from tolaria.functional.emergency import Level

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: attaches by name and prints every new reading as a JSON line.
WATCHER_SCRIPT = """
import json, sys, time
from tolaria.emergency_signals import SharedMemorySignalWatcher

watcher = SharedMemorySignalWatcher(sys.argv[1])
deadline = time.monotonic() + 30.0
last = None
while time.monotonic() < deadline:
    reading = watcher.read()
    if reading.sequence != last:
        last = reading.sequence
        line = {"level": reading.level.name, "reason": reading.reason, "timestamp_s": reading.timestamp_s,
                "sequence": reading.sequence, "seen_at": time.monotonic()}
        print(json.dumps(line), flush=True)
        if reading.reason == "stop":
            watcher.close()
            sys.exit(0)
    time.sleep(0.001)
sys.exit(3)
"""

# Reads as fast as it can while the owner writes, and checks every reading against the writer's invariant.
STRESS_SCRIPT = """
import json, sys, time
from tolaria.emergency_signals import SharedMemorySignalWatcher

watcher = SharedMemorySignalWatcher(sys.argv[1])
print("attached", flush=True)
reads = violations = 0
sequences = set()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    reading = watcher.read()
    reads += 1
    sequences.add(reading.sequence)
    index = int(reading.timestamp_s)
    if reading.sequence and (reading.level != index % 5 or reading.reason != ("r%d," % index) * (index % 20 + 1)):
        violations += 1
watcher.close()
print(json.dumps({"reads": reads, "distinct": len(sequences), "violations": violations}), flush=True)
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def read_line(process: subprocess.Popen, timeout_s: float = 20.0) -> str:
    """Return the child's next stdout line, failing the test if none arrives in time."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert result, f"no output from child within {timeout_s} s"
    assert result[0], f"child exited early with code {process.wait(timeout=5)}: {process.stderr.read()}"
    return result[0]


@pytest.fixture
def signal():
    owned = SharedMemorySignal()
    yield owned
    owned.close()


def test_owner_reads_back_what_it_sets(signal):
    initial = signal.read()

    reading = signal.set(Level.ELEVATED, "loss spikes: 3", timestamp_s=5.0)

    assert initial.level is Level.NOMINAL
    assert initial.reason == ""
    assert initial.sequence == 0
    assert initial.timestamp_s <= time.monotonic()
    assert reading == SignalReading(Level.ELEVATED, "loss spikes: 3", 5.0, 1)
    assert signal.read() == reading
    assert signal.level is Level.ELEVATED
    assert signal.reason == "loss spikes: 3"
    assert signal.timestamp_s == 5.0


def test_watcher_in_same_process_sees_changes(signal):
    with SharedMemorySignalWatcher(signal.name) as watcher:
        assert watcher.read() == signal.read()

        signal.set(Level.HALT, "rollback failures: 1", timestamp_s=3.0)
        assert watcher.read() == SignalReading(Level.HALT, "rollback failures: 1", 3.0, 1)

        before = time.monotonic()
        cleared = signal.clear()
        assert watcher.read() == cleared
        assert cleared.level is Level.NOMINAL
        assert cleared.reason == ""
        assert cleared.timestamp_s >= before
        assert cleared.sequence == 2


def test_layout_size_is_documented_value():
    assert SIGNAL_LAYOUT_SIZE == 304


def test_long_reason_is_cut_at_character_boundary(signal):
    reading = signal.set(Level.NOTICE, "é" * 300)

    assert reading.reason.endswith("...")
    assert len(reading.reason.encode("utf-8")) <= 256
    assert set(reading.reason[:-3]) == {"é"}
    with SharedMemorySignalWatcher(signal.name) as watcher:
        assert watcher.read().reason == reading.reason


def test_invalid_level_rejected(signal):
    with pytest.raises(ValueError, match=r"level=9 is not an emergency level"):
        signal.set(9, "x")

    assert signal.read().sequence == 0


def test_close_unlinks_block():
    signal = SharedMemorySignal()
    name = signal.name

    signal.close()
    signal.close()

    assert signal.closed
    with pytest.raises(FileNotFoundError):
        SharedMemorySignalWatcher(name)
    with pytest.raises(ValueError, match=r"shared signal .* is closed"):
        signal.set(Level.NOTICE, "late")


def test_context_manager_closes():
    with SharedMemorySignal() as signal:
        name = signal.name
        signal.set(Level.NOTICE, "inside")

    assert signal.closed
    with pytest.raises(FileNotFoundError):
        SharedMemorySignalWatcher(name)


def test_watcher_outlives_owner_close():
    signal = SharedMemorySignal()
    watcher = SharedMemorySignalWatcher(signal.name)
    signal.set(Level.ELEVATED, "last words", timestamp_s=1.0)

    signal.close()

    assert watcher.read() == SignalReading(Level.ELEVATED, "last words", 1.0, 1)
    watcher.close()
    with pytest.raises(ValueError, match=r"watcher of shared signal .* is closed"):
        watcher.read()


def test_named_signal_rejects_duplicate_name(signal):
    with pytest.raises(FileExistsError):
        SharedMemorySignal(signal.name)


def test_watcher_rejects_missing_and_invalid_names():
    with pytest.raises(FileNotFoundError):
        SharedMemorySignalWatcher(f"tolaria_missing_{os.getpid()}")
    with pytest.raises(ValueError, match=r"name='a/b' is invalid; expected the name of a SharedMemorySignal"):
        SharedMemorySignalWatcher("a/b")


def test_watcher_rejects_foreign_block():
    block = shared_memory.SharedMemory(create=True, size=SIGNAL_LAYOUT_SIZE)
    try:
        with pytest.raises(ValueError, match=r"is not a version 1 tolaria signal \(magic b'\\x00"):
            SharedMemorySignalWatcher(block.name)
    finally:
        block.close()
        block.unlink()


def test_watcher_times_out_on_write_left_half_done():
    # Build a block by the documented layout whose sequence is odd, as if the owner died mid-write.
    block = shared_memory.SharedMemory(create=True, size=SIGNAL_LAYOUT_SIZE)
    try:
        struct.pack_into("<8sIIQ", block.buf, 0, b"TLRSIG\x00\x01", 1, 256, 7)
        watcher = SharedMemorySignalWatcher(block.name, read_timeout_s=0.05)
        with pytest.raises(TimeoutError, match=r"stayed mid-write for 0.05 s \(sequence 7\)"):
            watcher.read()
        watcher.close()
    finally:
        block.close()
        block.unlink()


def test_watcher_mapping_is_read_only(signal):
    # The watcher maps the block read-only, so even a write through its private buffer fails.
    with SharedMemorySignalWatcher(signal.name) as watcher, pytest.raises(TypeError):
        watcher._buffer[0] = 0


def test_watcher_in_other_process_follows_changes(signal):
    signal.set(Level.NOTICE, "loss spikes: 1")
    process = subprocess.Popen(
        [sys.executable, "-c", WATCHER_SCRIPT, signal.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        first = json.loads(read_line(process))
        assert first["level"] == "NOTICE"
        assert first["reason"] == "loss spikes: 1"
        assert first["sequence"] == 1
        # Both processes read the host's CLOCK_MONOTONIC, so the owner's stamp is not in the child's future.
        assert first["timestamp_s"] <= first["seen_at"]

        signal.set(Level.CONSERVATIVE, "non-finite steps: 3", timestamp_s=42.0)
        second = json.loads(read_line(process))
        assert second == {**second, "level": "CONSERVATIVE", "reason": "non-finite steps: 3", "timestamp_s": 42.0}
        assert second["sequence"] == 2

        cleared = signal.clear()
        third = json.loads(read_line(process))
        assert third["level"] == "NOMINAL"
        assert third["reason"] == ""
        assert third["timestamp_s"] == cleared.timestamp_s
        assert third["sequence"] == 3

        signal.set(Level.NOMINAL, "stop")
        assert json.loads(read_line(process))["reason"] == "stop"
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=20)
        process.stdout.close()
        process.stderr.close()


def test_reader_in_other_process_never_sees_torn_write(signal):
    process = subprocess.Popen(
        [sys.executable, "-c", STRESS_SCRIPT, signal.name, "1.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert read_line(process).strip() == "attached"
        index = 0
        while process.poll() is None and index < 2_000_000:
            index += 1
            # Level, reason and timestamp all derive from one index, so a mixed reading is detectable.
            signal.set(Level(index % 5), f"r{index}," * (index % 20 + 1), timestamp_s=float(index))
        summary = json.loads(read_line(process))
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=20)
        process.stdout.close()
        process.stderr.close()

    assert summary["violations"] == 0
    assert summary["reads"] > 100
    assert summary["distinct"] > 10
