"""deploy/grafana: the dashboard is well-formed for Grafana 11+, its queries are valid
PromQL (promtool) and select only metrics a real coordinator exports, and the provisioning
files point Grafana at it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "coordinator"))
from grafana_dashboard import (
    GRAFANA,
    SUBSTITUTES,
    VARIABLE,
    dashboard,
    panels,
    queries,
    substituted,
)
from metrics_scenario import exported_names, selected_metrics

RULES = GRAFANA.parent / "prometheus" / "rules.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "state-timeline", "table", "stat"}


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}


def test_the_dashboard_is_a_grafana_11_dashboard() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39  # Grafana 11.0
    assert board["uid"] == "vantage-overview"
    assert board["title"]
    assert board["time"] == {"from": "now-6h", "to": "now"}
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_panels_are_laid_out_on_the_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert all(isinstance(v, int) for v in grid.values()), panel["title"]
        assert min(grid["w"], grid["h"]) >= 1, panel["title"]
        assert min(grid["x"], grid["y"]) >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_every_panel_queries_the_chosen_prometheus() -> None:
    for panel in panels(dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["description"], panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_the_variables_choose_data_source_coordinator_check_and_region() -> None:
    found = variables(dashboard())
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "check", "region"):
        assert found[name]["type"] == "query", name
        assert found[name]["datasource"] == DATASOURCE, name
        assert found[name]["query"]["query"] == found[name]["definition"], name
    for name in ("check", "region"):
        assert found[name]["multi"], name
        assert found[name]["includeAll"], name
        assert found[name]["allValue"] == ".*", name  # the queries match with =~
    # Every variable a query uses is defined (or one of Grafana's own).
    defined = set(found) | {name for name in SUBSTITUTES if name.startswith("__")}
    for where, expr in queries(dashboard()):
        used = {a or b for a, b in VARIABLE.findall(expr)}
        assert used <= defined, (where, used - defined)


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    """Verdicts per check and region, latency per phase and region, failure classes, the
    fleet and the coordinator's health each have a panel."""
    shown = set().union(*(selected_metrics(substituted(expr)) for _, expr in queries(dashboard())))
    for metric in (
        "vantage_check_verdict",
        "vantage_check_region_up",
        "vantage_check_phase_seconds",
        "vantage_check_failures_total",
        "vantage_check_cert_expiry_timestamp_seconds",
        "vantage_agents_connected",
        "vantage_agents_impaired",
        "vantage_agent_connected",
        "vantage_results_received_total",
        "vantage_results_ingest_seconds_total",
        "vantage_engine_tick_duration_seconds_bucket",
    ):
        assert metric in shown, metric


async def test_every_query_selects_metrics_the_coordinator_exports(tmp_path: Path) -> None:
    """Names from a real coordinator's /metrics with agents, failures, TLS checks and
    per-agent series: a misspelt or renamed metric would leave a panel empty for good."""
    exported = await exported_names(tmp_path)
    board = dashboard()
    for where, expr in queries(board):
        selected = selected_metrics(substituted(expr))
        assert selected, where
        assert selected <= exported, (where, selected - exported)
    for name, variable in variables(board).items():
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+), *\w+\)", variable["query"]["query"])
            assert inner, name
            assert selected_metrics(substituted(inner.group(1))) <= exported, name
    # The alert annotations read Prometheus' ALERTS series for the alerts of rules.yml.
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }
    for annotation in board["annotations"]["list"]:
        if annotation.get("datasource") == DATASOURCE:
            expr = annotation["target"]["expr"]
            assert selected_metrics(expr) == {"ALERTS"}
            pattern = re.search(r'alertname=~"([^"]+)"', expr)
            assert pattern
            assert all(re.fullmatch(pattern.group(1), alert) for alert in alerts)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, variables substituted, as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (`make system-deps`)")
    rules = [
        {"record": f"vantage_dashboard:query_{index}", "expr": substituted(expr)}
        for index, (_, expr) in enumerate(queries(dashboard()))
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_the_provisioning_files_load_the_dashboard_from_prometheus() -> None:
    provisioning = GRAFANA / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "vantage.yaml").read_text())
    assert sources["apiVersion"] == 1
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    assert sources["datasources"][0]["url"].startswith("http")
    providers = yaml.safe_load((provisioning / "dashboards" / "vantage.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()
