"""A process killed with SIGKILL in the middle of a large checkpoint save leaves earlier checkpoints intact."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tolaria import checkpoint

WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from tolaria import checkpoint

    directory = sys.argv[1]
    weights = torch.randn(32 * 1024 * 1024 // 4 * 3)  # 96 MiB, so a save takes a while
    print("ready", flush=True)
    step = 2
    while True:
        checkpoint.save(directory, {"step": step, "weights": weights}, step=step, keep_last=2)
        step += 1
    """
)
_TEMP = re.compile(r"^\.checkpoint-(?P<step>\d{12})-[0-9a-f]+\.pt\.[0-9a-f]+\.(?P<pid>\d+)\.tmp$")


def _temp_files(directory: Path, pid: int) -> list[tuple[Path, int]]:
    found = []
    for entry in directory.iterdir():
        match = _TEMP.match(entry.name)
        if match is not None and int(match.group("pid")) == pid:
            found.append((entry, int(match.group("step"))))
    return found


def _kill_during_save(directory: Path, process: subprocess.Popen[str]) -> tuple[Path, int]:
    """Wait until the writer's temporary data file has a few MiB, then SIGKILL it."""
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        for path, step in _temp_files(directory, process.pid):
            try:
                if path.stat().st_size > 4 * 1024 * 1024:
                    process.send_signal(signal.SIGKILL)
                    return path, step
            except FileNotFoundError:
                continue
        time.sleep(0.001)
    process.kill()
    pytest.fail("the writer never got into the middle of a save within 60 s")


@pytest.mark.timeout(120)
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"step": 1, "weights": torch.ones(8)}, step=1, keep_last=None)
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"

    temp_path, killed_step = _kill_during_save(tmp_path, process)
    assert process.wait(timeout=30) == -signal.SIGKILL
    process.stdout.close()

    # The save in progress never reached its final names.
    assert temp_path.exists()
    assert not (tmp_path / f"checkpoint-{killed_step:012d}.json").exists()
    assert not list(tmp_path.glob(f"checkpoint-{killed_step:012d}-*.pt"))

    # Every committed checkpoint verifies, and the newest one loads.
    steps = checkpoint.list_checkpoints(tmp_path)
    assert max(steps) == killed_step - 1
    for step in steps:
        checkpoint.verify(tmp_path / f"checkpoint-{step:012d}.json")
    info, state = checkpoint.load_latest(tmp_path)
    assert info.step == killed_step - 1
    assert state["step"] == info.step

    # The next save clears the dead writer's temporary file.
    checkpoint.save(tmp_path, {"step": killed_step, "weights": torch.zeros(8)}, step=killed_step, keep_last=None)
    assert not temp_path.exists()
    assert checkpoint.load_latest(tmp_path)[0].step == killed_step
