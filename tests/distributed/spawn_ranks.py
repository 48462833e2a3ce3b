"""Launch ``rank_worker.py`` jobs on loopback, by hand or through torchrun, and read their results."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "rank_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


@dataclasses.dataclass
class JobResult:
    """Exit codes and logs of one job's processes."""

    returncodes: dict[str, int | None]
    logs: dict[str, str]

    def describe(self) -> str:
        return "\n".join(f"--- {name} (exit {self.returncodes[name]}):\n{log}" for name, log in self.logs.items())


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def base_environment(**extra: str) -> dict[str, str]:
    """Return the environment of a worker: loopback only, one thread, tolaria importable."""
    environment = {name: value for name, value in os.environ.items() if name not in ("RANK", "WORLD_SIZE")}
    pythonpath = [environment.get("PYTHONPATH", ""), str(REPO_ROOT)]
    environment.update(
        PYTHONPATH=os.pathsep.join(part for part in pythonpath if part),
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="error",
        **extra,
    )
    return environment


def run_ranks(
    job: str,
    out_dir: Path,
    *,
    timeout_s: float,
    wait_for: tuple[int, ...],
    deadline_s: float,
    world_size: int = 2,
    environment: dict[str, str] | None = None,
    worker: Path = WORKER,
    log_prefix: str = "",
) -> JobResult:
    """Start ``world_size`` worker processes with torchrun's variables and wait for the ranks in ``wait_for``.

    Ranks not in ``wait_for`` (a rank set to hang) are killed once those have exited
    or ``deadline_s`` has passed, whichever comes first. ``worker`` is the script each
    rank runs; each rank's log is ``out_dir/<log_prefix>rank<r>.log``.
    """
    port = str(free_port())
    processes: dict[str, subprocess.Popen[bytes]] = {}
    log_paths: dict[str, Path] = {}
    for rank in range(world_size):
        rank_environment = base_environment(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_PORT=port, **(environment or {})
        )
        name = f"rank{rank}"
        log_paths[name] = out_dir / f"{log_prefix}{name}.log"
        with log_paths[name].open("wb") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, str(worker), job, str(out_dir), "--timeout-s", str(timeout_s)],
                env=rank_environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    return _finish(processes, log_paths, [f"rank{rank}" for rank in wait_for], deadline_s)


def run_torchrun(job: str, out_dir: Path, *, timeout_s: float, deadline_s: float, nproc: int = 2) -> JobResult:
    """Run the job under ``torchrun --nproc_per_node=nproc`` with a loopback rendezvous."""
    command = [
        str(TORCHRUN),
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER),
        job,
        str(out_dir),
        "--timeout-s",
        str(timeout_s),
    ]
    log_path = out_dir / "torchrun.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=base_environment(), stdout=log, stderr=subprocess.STDOUT)
    return _finish({"torchrun": process}, {"torchrun": log_path}, ["torchrun"], deadline_s)


def _finish(
    processes: dict[str, subprocess.Popen[bytes]], log_paths: dict[str, Path], wait_for: list[str], deadline_s: float
) -> JobResult:
    deadline = time.monotonic() + deadline_s
    for name in wait_for:
        # A process still running at the deadline is killed below, so the test gets exit code -9 and the log.
        with contextlib.suppress(subprocess.TimeoutExpired):
            processes[name].wait(timeout=max(deadline - time.monotonic(), 0.1))
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()
    return JobResult(
        returncodes={name: process.returncode for name, process in processes.items()},
        logs={name: path.read_text(errors="replace") for name, path in log_paths.items()},
    )


def load_result(out_dir: Path, scenario: str, rank: int) -> dict[str, Any]:
    """Load what ``rank`` saved for ``scenario``; only tensors and plain containers are allowed."""
    result: dict[str, Any] = torch.load(out_dir / f"{scenario}.rank{rank}.pt", weights_only=True)
    return result
