"""Tests of ``LocalSignal``, the in-process emergency signal."""

from __future__ import annotations

import threading

import pytest

from tolaria.emergency_signals import LocalSignal, SignalReading
from tolaria.functional.emergency import Level


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_new_signal_is_nominal_and_stamped():
    clock = FakeClock(12.5)

    signal = LocalSignal(clock=clock)

    assert signal.read() == SignalReading(Level.NOMINAL, "", 12.5, 0)


def test_set_without_timestamp_uses_clock():
    clock = FakeClock(1.0)
    signal = LocalSignal(clock=clock)
    clock.now = 4.0

    reading = signal.set(Level.ELEVATED, "loss spikes: 3")

    assert reading == SignalReading(Level.ELEVATED, "loss spikes: 3", 4.0, 1)
    assert signal.read() == reading
    assert signal.level is Level.ELEVATED
    assert signal.reason == "loss spikes: 3"
    assert signal.timestamp_s == 4.0


def test_set_with_explicit_timestamp():
    signal = LocalSignal(clock=FakeClock(1.0))

    reading = signal.set("halt", "rollback failed", timestamp_s=99.0)

    assert reading == SignalReading(Level.HALT, "rollback failed", 99.0, 1)


def test_clear_resets_level_reason_and_timestamp():
    clock = FakeClock(1.0)
    signal = LocalSignal(clock=clock)
    signal.set(Level.CONSERVATIVE, "non-finite steps: 3", timestamp_s=2.0)
    clock.now = 7.0

    reading = signal.clear()

    assert reading == SignalReading(Level.NOMINAL, "", 7.0, 2)
    assert signal.read() == reading


def test_real_clock_timestamps_increase():
    signal = LocalSignal()
    first = signal.read().timestamp_s

    second = signal.set(Level.NOTICE, "x").timestamp_s
    third = signal.clear().timestamp_s

    assert first <= second <= third


def test_invalid_level_raises_and_keeps_reading():
    signal = LocalSignal(clock=FakeClock(1.0))

    with pytest.raises(ValueError, match=r"level=7 is not an emergency level"):
        signal.set(7, "bad")

    assert signal.read() == SignalReading(Level.NOMINAL, "", 1.0, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "now"])
def test_invalid_timestamp_raises(bad):
    signal = LocalSignal()

    with pytest.raises(ValueError, match=r"timestamp_s=.* is invalid; expected finite monotonic seconds"):
        signal.set(Level.NOTICE, "x", timestamp_s=bad)
    with pytest.raises(ValueError, match=r"timestamp_s=.* is invalid"):
        signal.clear(timestamp_s=bad)


def test_concurrent_writers_count_every_change():
    signal = LocalSignal()
    barrier = threading.Barrier(4)

    def write(index: int) -> None:
        barrier.wait()
        for round_ in range(200):
            signal.set(Level(index % 5), f"writer {index} round {round_}")

    threads = [threading.Thread(target=write, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    reading = signal.read()
    assert reading.sequence == 800
    assert reading.reason.endswith("round 199")
