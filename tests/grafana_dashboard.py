"""The Grafana dashboard (deploy/grafana/dashboards/vantage.json) as the tests read it:
its panels (those inside collapsed rows included), their queries, and the queries with
the dashboard's variables set to values Prometheus accepts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vantage.json"
# What a variable or Grafana's own interval variables stand for when a query is run.
SUBSTITUTES = {
    "job": "vantage",
    "instance": "127.0.0.1:9470",
    "check": ".*",
    "region": ".*",
    "__rate_interval": "1m",
    "__range": "6h",
    "__interval": "15s",
}
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) of every panel target."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]


def substituted(expr: str, **values: str) -> str:
    """``expr`` with every variable replaced by ``values`` or else ``SUBSTITUTES``; an
    unknown variable fails the test."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        known = {**SUBSTITUTES, **values}
        assert name in known, f"unknown variable ${name} in {expr!r}"
        return known[name]

    return VARIABLE.sub(value, expr)
