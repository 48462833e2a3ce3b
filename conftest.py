"""Shared test set-up: seeded RNGs, deterministic kernels, and the hypothesis profile.

``TOLARIA_TEST_DEVICE`` (default ``cpu``) and ``TOLARIA_TEST_DTYPE`` (default
``float32``) choose where and in which precision device-generic tests run.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# The test models are small, and on a shared 2-core machine extra intra-op threads
# compete with other processes and slow every test down.
torch.set_num_threads(1)

settings.register_profile(
    "default",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seeded_deterministic() -> None:
    random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=False)


@pytest.fixture
def device() -> torch.device:
    """The device that device-generic tests run on."""
    return torch.device(os.environ.get("TOLARIA_TEST_DEVICE", "cpu"))


@pytest.fixture
def dtype() -> torch.dtype:
    """The floating dtype that dtype-generic tests run in."""
    return getattr(torch, os.environ.get("TOLARIA_TEST_DTYPE", "float32"))


# Catalog coverage: every metric and event name in tolaria.telemetry.catalog must be
# emitted by some test. Names are recorded from every in-process Telemetry call and
# from the JSONL files that subprocesses write under pytest's temporary folder. The
# check runs only when the whole default suite ran and passed.

_EMITTED_NAMES: set[str] = set()


def _record_telemetry_names() -> None:
    from tolaria.telemetry import Event, Metric, Telemetry

    # Records built inside the publisher (drop summaries, sink failures, counter totals)
    # never pass through the public methods, so their constructors are recorded too.
    for record_type in (Event, Metric):
        original_init = record_type.__init__

        def recording_init(self, name, *args, _original=original_init, **kwargs):
            _EMITTED_NAMES.add(name)
            _original(self, name, *args, **kwargs)

        record_type.__init__ = recording_init  # type: ignore[method-assign]

    def recording(method_name: str):
        original = getattr(Telemetry, method_name)

        def wrapper(self, name, *args, **kwargs):
            _EMITTED_NAMES.add(name)
            return original(self, name, *args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapper

    for method_name in ("event", "metric", "count"):
        setattr(Telemetry, method_name, recording(method_name))


def _names_in_jsonl_files(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.jsonl"):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                packet = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(packet, dict):
                continue
            names.update(item.get("name", "") for item in packet.get("metrics", []) if isinstance(item, dict))
            names.update(item.get("name", "") for item in packet.get("events", []) if isinstance(item, dict))
    return names


def pytest_configure(config: pytest.Config) -> None:
    _record_telemetry_names()


def _ran_whole_default_suite(session: pytest.Session) -> bool:
    config = session.config
    testpaths = config.getini("testpaths")
    chosen = [Path(argument).name for argument in config.args]
    return (
        sorted(chosen) == sorted(testpaths)
        and not config.option.keyword
        and config.option.markexpr == "not soak"
        and session.testsfailed == 0
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _ran_whole_default_suite(session):
        return
    from tolaria.telemetry import catalog

    base = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    emitted = _EMITTED_NAMES | _names_in_jsonl_files(Path(base))
    never_emitted = sorted(catalog.all_names() - emitted)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if never_emitted:
        if reporter is not None:
            reporter.write_line(
                f"catalog coverage: {len(never_emitted)} catalogued names were emitted by no test: "
                + ", ".join(never_emitted),
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line(f"catalog coverage: all {len(catalog.all_names())} catalogued names were emitted")
