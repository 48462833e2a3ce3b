"""``TrainingProfiler``: ``torch.profiler`` on a wait/warmup/active/repeat schedule, with checked exports.

Each finished cycle of the schedule is exported as one Chrome trace named
``{run_id}.rank{rank}.pid{pid}.epoch{epoch}.step{step}.{UTC time}.{sequence}.pt.trace.json``.
The name is reserved with ``O_CREAT | O_EXCL`` before torch writes into it, so a trace
never overwrites another file. The sequence number is shared by the whole process, so
two profilers of one process get distinct names even within the same microsecond.
There is exactly one file per trace.

torch's exporter reports some failures only on stderr, so after every export the
file must exist and be non-empty. A failed export raises ``ProfilerExportError`` in
strict mode; otherwise it is logged at ERROR, counted in
``tolaria.profiler.export_failures`` and emitted as the ERROR event
``tolaria.profiler.export_failed`` with the path and the error, and training goes on.

Usage from a training loop::

    profiler = TrainingProfiler(config, run_id="run-1", rank=0, telemetry=telemetry)
    with profiler:
        for step, batch in enumerate(batches):
            train_step(batch)
            profiler.step(epoch, step)
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity

from tolaria.telemetry import Level, Telemetry

__all__ = ["ProfilerConfig", "ProfilerExportError", "TrainingProfiler"]

logger = logging.getLogger(__name__)

_SEQUENCE = itertools.count()
_SEQUENCE_LOCK = threading.Lock()
# torch.profiler (kineto) supports one profiling session per process; a second one crashes it.
_ACTIVE_LOCK = threading.Lock()
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")
_RESERVE_ATTEMPTS = 1000
# torch warns once it starts a second cycle without ``acc_events``; per-cycle traces are the intent here.
_CYCLE_WARNING = "Warning: Profiler clears events at the end of each cycle"


class ProfilerExportError(RuntimeError):
    """A trace could not be written, or was written empty (strict mode only).

    Attributes:
        path: the trace file that was being written.
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"profiler trace {path}: {problem}")
        self.path = path


def _fail(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"ProfilerConfig.{field}: got {value!r}; expected {expected}")


def _check_count(field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(field, value, f"an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class ProfilerConfig:
    """Settings of the training profiler.

    Attributes:
        enabled: profile the run; requires ``trace_dir``.
        trace_dir: folder the traces are written to; created when missing.
        wait: steps skipped at the start of each cycle.
        warmup: steps profiled but discarded, so start-up costs stay out of the trace.
        active: steps recorded and exported per cycle, at least 1.
        repeat: number of cycles; 0 repeats until the profiler stops.
        strict: raise ``ProfilerExportError`` on a failed export instead of reporting it.
        warn_trace_bytes: size in bytes above which a written trace is reported at WARNING.
        record_shapes: record operator input shapes.
        profile_memory: record tensor memory allocation.
        with_stack: record Python source locations (large traces).

    Raises:
        ValueError: a field is invalid; the message names it, e.g. ``ProfilerConfig.trace_dir``.
    """

    enabled: bool = False
    trace_dir: str | os.PathLike[str] | None = None
    wait: int = 1
    warmup: int = 1
    active: int = 3
    repeat: int = 1
    strict: bool = False
    warn_trace_bytes: int = 256 * 1024 * 1024
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def __post_init__(self) -> None:
        if self.enabled and self.trace_dir is None:
            raise _fail("trace_dir", None, "a folder for the trace files when enabled=True")
        if self.trace_dir is not None and not isinstance(self.trace_dir, (str, os.PathLike)):
            raise _fail("trace_dir", self.trace_dir, "a path or None")
        _check_count("wait", self.wait, 0)
        _check_count("warmup", self.warmup, 0)
        _check_count("active", self.active, 1)
        _check_count("repeat", self.repeat, 0)
        _check_count("warn_trace_bytes", self.warn_trace_bytes, 1)


def _next_sequence() -> int:
    with _SEQUENCE_LOCK:
        return next(_SEQUENCE)


def _safe(text: str) -> str:
    return _UNSAFE_NAME_CHARACTERS.sub("_", text) or "run"


class TrainingProfiler:
    """Runs ``torch.profiler`` over training steps and exports one checked trace per cycle.

    Disabled (``config.enabled`` false), every method returns at once.

    Args:
        config: the profiler settings.
        run_id: run identifier written into trace names.
        rank: process rank written into trace names.
        telemetry: receives counters ``tolaria.profiler.traces_written`` and
            ``tolaria.profiler.export_failures``, the metric ``tolaria.profiler.trace_bytes``
            and the events ``tolaria.profiler.trace_written`` (INFO),
            ``tolaria.profiler.trace_large`` (WARNING) and ``tolaria.profiler.export_failed``
            (ERROR); a sink-less ``Telemetry`` when ``None``.

    Raises:
        ValueError: ``rank`` is negative.
    """

    def __init__(
        self, config: ProfilerConfig, *, run_id: str, rank: int = 0, telemetry: Telemetry | None = None
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        self.config = config
        self.run_id = run_id
        self.rank = rank
        self.telemetry = Telemetry() if telemetry is None else telemetry
        self._traces: list[Path] = []
        self._profile: torch.profiler.profile | None = None
        self._position = (0, 0)
        self._pending_error: ProfilerExportError | None = None

    @property
    def enabled(self) -> bool:
        """Whether profiling is switched on in the config."""
        return self.config.enabled

    @property
    def traces(self) -> tuple[Path, ...]:
        """Trace files written so far, in order."""
        return tuple(self._traces)

    def __enter__(self) -> TrainingProfiler:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _build(self) -> torch.profiler.profile:
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        config = self.config
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            schedule = torch.profiler.schedule(
                wait=config.wait, warmup=config.warmup, active=config.active, repeat=config.repeat
            )
        for warning in caught:
            logger.warning("torch.profiler: %s", warning.message)
        return torch.profiler.profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self._on_trace_ready,
            record_shapes=config.record_shapes,
            profile_memory=config.profile_memory,
            with_stack=config.with_stack,
        )

    def start(self) -> None:
        """Start profiling; a second call while running does nothing.

        Raises:
            RuntimeError: another ``TrainingProfiler`` is running in this process; torch
                supports one profiling session per process.
        """
        if not self.enabled or self._profile is not None:
            return
        if not _ACTIVE_LOCK.acquire(blocking=False):
            raise RuntimeError(
                "another TrainingProfiler is already running in this process; torch.profiler supports one "
                "session per process, so stop the other one first"
            )
        try:
            self._profile = self._build()
            self._profile.start()
        except BaseException:
            self._profile = None
            _ACTIVE_LOCK.release()
            raise
        logger.info("profiler started for run %s rank %d, traces in %s", self.run_id, self.rank, self.config.trace_dir)

    def step(self, epoch: int, step: int) -> None:
        """Mark the end of training step ``step`` of ``epoch``; exports a trace when a cycle ends.

        Raises:
            ProfilerExportError: strict mode and the export of the cycle that just ended failed.
        """
        if self._profile is None:
            return
        self._position = (epoch, step)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CYCLE_WARNING)
            self._profile.step()
        self._raise_pending()

    def stop(self) -> None:
        """Stop profiling and export the cycle in progress, if any.

        Raises:
            ProfilerExportError: strict mode and that last export failed.
        """
        if self._profile is None:
            return
        profile, self._profile = self._profile, None
        try:
            profile.stop()
        finally:
            _ACTIVE_LOCK.release()
        logger.info("profiler stopped for run %s rank %d: %d traces", self.run_id, self.rank, len(self._traces))
        self._raise_pending()

    def _raise_pending(self) -> None:
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise error

    def _trace_name(self, sequence: int) -> str:
        epoch, step = self._position
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        return (
            f"{_safe(self.run_id)}.rank{self.rank}.pid{os.getpid()}.epoch{epoch}.step{step}."
            f"{stamp}.{sequence:06d}.pt.trace.json"
        )

    def _reserve(self) -> Path:
        """Create an empty, new trace file exclusively and return its path."""
        folder = Path(self.config.trace_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(_RESERVE_ATTEMPTS):
            path = folder / self._trace_name(_next_sequence())
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            os.close(descriptor)
            return path
        raise FileExistsError(f"no free trace name in {folder} after {_RESERVE_ATTEMPTS} attempts")

    def _on_trace_ready(self, profile: torch.profiler.profile) -> None:
        """Export one cycle without raising, because an exception here crashes torch's profiler later."""
        path = Path(self.config.trace_dir or ".") / self._trace_name(-1)
        try:
            path = self._reserve()
            profile.export_chrome_trace(str(path))
            size = path.stat().st_size
            if size == 0:
                raise ProfilerExportError(path, "the exporter left the file empty (its errors go to stderr only)")
        except Exception as error:  # noqa: BLE001 - reported by _export_failed, raised from step() when strict
            # An exception escaping into torch's profiler crashes it later, so every failure is reported here.
            self._export_failed(path, error)
            return
        self._written(path, size)

    def _written(self, path: Path, size: int) -> None:
        self._traces.append(path)
        self.telemetry.count("tolaria.profiler.traces_written")
        self.telemetry.metric("tolaria.profiler.trace_bytes", float(size), "B")
        self.telemetry.event("tolaria.profiler.trace_written", Level.INFO, path=str(path), bytes=size)
        logger.info("profiler trace written: %s (%d bytes)", path, size)
        if size > self.config.warn_trace_bytes:
            logger.warning(
                "profiler trace %s is %d bytes, above warn_trace_bytes=%d; profile fewer active steps",
                path,
                size,
                self.config.warn_trace_bytes,
            )
            self.telemetry.event(
                "tolaria.profiler.trace_large",
                Level.WARNING,
                path=str(path),
                bytes=size,
                limit_bytes=self.config.warn_trace_bytes,
            )

    def _export_failed(self, path: Path, error: BaseException) -> None:
        if path.exists() and path.stat().st_size == 0:
            path.unlink(missing_ok=True)
        logger.error("exporting profiler trace %s failed: %s", path, error)
        self.telemetry.count("tolaria.profiler.export_failures")
        self.telemetry.event(
            "tolaria.profiler.export_failed",
            Level.ERROR,
            path=str(path),
            error=type(error).__name__,
            reason=str(error),
        )
        if self.config.strict:
            failure = error if isinstance(error, ProfilerExportError) else ProfilerExportError(path, str(error))
            failure.__cause__ = None if failure is error else error
            self._pending_error = failure
