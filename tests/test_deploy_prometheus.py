"""deploy/prometheus: the scrape config and alert rules Prometheus loads, checked by
promtool and unit-tested with ``promtool test rules``, and every metric a rule selects is
one a real coordinator exports."""

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
from metrics_scenario import exported_names, selected_metrics

PROMETHEUS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
ALERTS = {
    "VantageCheckDownGlobally",
    "VantageCheckDownInRegion",
    "VantageAgentOffline",
    "VantageAgentImpaired",
    "VantageCertificateExpiringSoon",
    "VantageCoordinatorDown",
}


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (`make system-deps`)")
    done = subprocess.run(
        [tool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_scrape_config_and_its_rules() -> None:
    output = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 1 rule files found" in output
    assert f"SUCCESS: {len(ALERTS)} rules found" in promtool("check", "rules", "rules.yml")


def test_the_alert_rules_pass_their_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


def test_every_alert_has_a_severity_annotations_and_tests_both_ways() -> None:
    """Each alert is unit-tested firing and not firing, and says what and why."""
    assert {rule["alert"] for rule in rules()} == ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())
    assert tests["rule_files"] == ["rules.yml"]
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    stays_quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert fires == ALERTS
    assert stays_quiet == ALERTS


def test_the_scrape_job_is_the_one_the_rules_select() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["vantage"]
    down = next(rule for rule in rules() if rule["alert"] == "VantageCoordinatorDown")
    assert 'up{job="vantage"}' in down["expr"]


async def test_the_rules_select_only_metrics_the_coordinator_exports(tmp_path: Path) -> None:
    """The alert expressions and the queries their annotations run (printf'd selectors)."""
    exported = await exported_names(tmp_path) | {"up"}  # up: Prometheus' own, per target
    for rule in rules():
        selected = selected_metrics(rule["expr"])
        assert selected, rule["alert"]
        for text in rule["annotations"].values():
            for template in re.findall(r"printf `([^`]*)`", text):
                selected |= selected_metrics(template.replace("%q", '"x"'))
        assert selected <= exported, (rule["alert"], selected - exported)
