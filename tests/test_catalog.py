"""Tests of the telemetry catalog: generated docs, declarations, and names used in the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tolaria.telemetry import Level, Telemetry, catalog
from tolaria.telemetry.catalog import CatalogEntry, _index, render_markdown, undeclared
from tolaria.telemetry.publisher import DROP_SUMMARY, DROPPED, SINK_FAILED, SINK_FAILURES, SINK_RECOVERED

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "telemetry.md"
REGENERATE = "python -m tolaria.telemetry.catalog > docs/telemetry.md"


def test_docs_are_not_stale() -> None:
    assert DOCS.read_text(encoding="utf-8") == render_markdown(), f"docs/telemetry.md is stale; run `{REGENERATE}`"


def test_cli_prints_the_docs() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tolaria.telemetry.catalog"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=120,
    )

    assert completed.stdout == render_markdown()


def test_docs_list_every_name() -> None:
    text = render_markdown()

    for name in catalog.all_names():
        assert f"| `{name}` |" in text, name


def test_undeclared() -> None:
    names = {"tolaria.train.loss", "timeout_inference", "tolaria.no.such_metric", "made_up"}

    assert undeclared(names) == {"tolaria.no.such_metric", "made_up"}
    assert undeclared([]) == set()


def test_publisher_own_names_are_declared() -> None:
    assert catalog.lookup_metric(DROPPED) is not None
    assert catalog.lookup_metric(SINK_FAILURES) is not None
    for name in (DROP_SUMMARY, SINK_FAILED, SINK_RECOVERED):
        entry = catalog.lookup_event(name)
        assert entry is not None, name
        assert entry.kind == "event"


def test_counters_do_not_end_in_total() -> None:
    counters = [entry.name for entry in catalog.METRICS.values() if entry.kind == "counter"]

    assert counters
    assert not [name for name in counters if name.endswith("_total")]


def test_emitted_names_checked_against_catalog() -> None:
    telemetry = Telemetry()
    telemetry.event("tolaria.rollback.completed", Level.INFO, tier="fast")
    telemetry.metric("tolaria.val.accuracy", 0.5, "1", objective="digit")
    telemetry.count("tolaria.anomaly.nonfinite")
    telemetry.event("tolaria.not.declared")

    assert undeclared(telemetry.emitted_names) == {"tolaria.not.declared"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [CatalogEntry("a.b", "gauge", "1", Level.INFO, "x"), CatalogEntry("a.b", "gauge", "1", Level.INFO, "y")],
            "catalog declares 'a.b' twice",
        ),
        ([CatalogEntry("a.steps_total", "counter", "1", Level.INFO, "x")], "must not end in '_total'"),
        ([CatalogEntry("a.b", "event", "", Level.INFO, "x")], "has kind 'event'; expected one of"),
        ([CatalogEntry("a.b", "meter", "1", Level.INFO, "x")], "has kind 'meter'; expected one of"),
    ],
)
def test_invalid_metric_declarations(entries: list[CatalogEntry], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _index(entries, metrics=True)


def test_event_table_rejects_metric_kinds() -> None:
    with pytest.raises(ValueError, match="has kind 'counter'; expected one of"):
        _index([CatalogEntry("a.b", "counter", "1", Level.INFO, "x")], metrics=False)


def literal_name(node: ast.AST) -> tuple[str, str] | None:
    """Return ``(method, name)`` when ``node`` is an ``event``, ``metric`` or ``count`` call with a literal name."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
        return None
    first = node.args[0]
    if node.func.attr not in ("event", "metric", "count") or not isinstance(first, ast.Constant):
        return None
    return (node.func.attr, first.value) if isinstance(first.value, str) else None


def literal_telemetry_names(source_root: Path) -> dict[str, set[str]]:
    """Return ``{"event" | "metric": names}`` of the literal first arguments of telemetry calls in the source."""
    found: dict[str, set[str]] = {"event": set(), "metric": set()}
    for path in source_root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = literal_name(node)
            if call is not None:
                method, name = call
                found["event" if method == "event" else "metric"].add(name)
    return found


def test_names_in_source_are_declared() -> None:
    found = literal_telemetry_names(ROOT / "tolaria")

    missing_events = sorted(name for name in found["event"] if catalog.lookup_event(name) is None)
    missing_metrics = sorted(name for name in found["metric"] if catalog.lookup_metric(name) is None)

    assert found["event"]
    assert found["metric"]
    assert missing_events == [], f"declare these events in tolaria/telemetry/catalog.py: {missing_events}"
    assert missing_metrics == [], f"declare these metrics in tolaria/telemetry/catalog.py: {missing_metrics}"
