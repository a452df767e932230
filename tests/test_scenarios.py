"""The outage scenarios in ../shared/scenarios are the verdicts' specification; the
multi-region test bed (tests/testbed/, tests/test_testbed.py) plays them, as root. These
tests keep the contract between them and the code where the test bed cannot run: every
scenario's checks are valid checks for the coordinator once a target name becomes a real
URL or host:port, and its states and failure classes are ones the code knows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.verdicts import VerdictState
from vantage.checks import parse_check
from vantage.results import FailureClass

SCENARIOS = Path(__file__).resolve().parent.parent.parent / "shared" / "scenarios"
FILES = sorted(SCENARIOS.glob("*.yaml"))
# How the runner will address each kind of target (the scenario README's `serve` kinds).
ADDRESS = {
    "http": "http://{name}.vantage.test/",
    "https": "https://{name}.vantage.test/",
    "https-expired": "https://{name}.vantage.test/",
    "tcp": "{name}.vantage.test:7000",
    "dns": "{name}.vantage.test",
}


def test_the_scenarios_are_there() -> None:
    assert FILES, f"no scenario files in {SCENARIOS}"


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_scenario_checks_and_expectations_fit_the_code(path: Path) -> None:
    scenario: dict[str, Any] = yaml.safe_load(path.read_text())
    targets = scenario["targets"]
    names = set()
    for spec in scenario["checks"]:
        serve = targets[spec["target"]]["serve"]
        check = parse_check(spec | {"target": ADDRESS[serve].format(name=spec["target"])})
        names.add(check.name)
    for expectation in scenario.get("expect", []) + scenario.get("never", []):
        assert expectation["check"] in names
        VerdictState(expectation["state"])
        if "failure" in expectation:
            FailureClass(expectation["failure"])
