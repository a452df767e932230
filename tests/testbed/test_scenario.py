"""Scenario files: every shipped one loads; a bad one fails with file, field and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.scenario import (
    Clear,
    DnsFault,
    NetworkFault,
    ProcessFault,
    ScenarioError,
    Selector,
    Target,
    load_scenario,
    target_address,
)

TESTS = Path(__file__).resolve().parent.parent
SHARED = TESTS.parent.parent / "shared" / "scenarios"
FILES = sorted(SHARED.glob("*.yaml")) + sorted((TESTS / "scenarios").glob("*.yaml"))

GOOD = """\
name: small
about: one of each
regions: {eu: 2, us: 1}
targets:
  web: {serve: http}
  shop: {serve: https-expired}
  mail: {serve: tcp}
  ns1: {serve: dns}
checks:
  - {name: web, type: http, target: web, interval: 2s, timeout: 1.5s}
  - {name: shop, type: http, target: shop, interval: 2s, timeout: 1.5s}
  - {name: mail, type: tcp, target: mail, interval: 2s, timeout: 1.5s}
  - {name: names, type: dns, target: ns1, interval: 2s, timeout: 1.5s}
timeline:
  - {at: 20s, fault: clear}
  - {at: 5s, fault: {loss: {from: all, to: target:web, percent: 20}}}
  - {at: 6s, fault: {dns: {region: us, name: web, answer: servfail}}}
  - {at: 7s, fault: {kill: agent:eu-2}}
  - {at: 8s, fault: {restart: coordinator}}
expect:
  - {at: 5s, within: 1m, check: web, state: regional, regions_down: [eu], impaired: []}
never:
  - {check: shop, state: up}
end: 90s
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_every_shipped_scenario_loads(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.expect or scenario.never
    assert all(event.at <= scenario.end for event in scenario.timeline)


def test_a_scenario_reads_into_agents_faults_and_expectations(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD))
    assert scenario.agents == [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")]
    faults = [event.fault for event in scenario.timeline]
    assert [event.at for event in scenario.timeline] == [5, 6, 7, 8, 20]
    assert faults == [
        NetworkFault("loss", Selector("all"), Selector("target", "web"), 20),
        DnsFault("us", "web.vantage.test", "servfail"),
        ProcessFault("kill", Selector("agent", "eu-2")),
        ProcessFault("restart", Selector("coordinator")),
        Clear(),
    ]
    (expectation,) = scenario.expect
    assert expectation.regions_down == frozenset({"eu"})
    assert expectation.impaired == frozenset()
    assert (expectation.at, expectation.within) == (5, 60)


def test_targets_become_the_addresses_of_the_scenario_readme() -> None:
    # tests/test_scenarios.py's ADDRESS table.
    assert target_address("http", Target("web", "http")) == "http://web.vantage.test/"
    assert target_address("http", Target("shop", "https")) == "https://shop.vantage.test/"
    assert target_address("http", Target("old", "https-expired")) == "https://old.vantage.test/"
    assert target_address("tcp", Target("mail", "tcp")) == "mail.vantage.test:7000"
    assert target_address("dns", Target("ns1", "dns")) == "ns1.vantage.test"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("to: target:web, percent: 20", "to: target:nope, percent: 20"), "no target named 'nope'"),
        (("{at: 7s, fault: {kill: agent:eu-2}}", "{at: 7s, fault: {kill: agent:eu-3}}"), "eu-3"),
        (("state: regional", "state: sideways"), "expect.0..state: 'sideways'"),
        (("end: 90s", "end: 30s"), "after the scenario's end"),
        (
            ("interval: 2s, timeout: 1.5s}\n  - {name: mail", "interval: 2s}\n  - {name: mail"),
            "timeout",
        ),
        (("answer: servfail", "answer: maybe"), "nxdomain, servfail or an IPv4 address"),
        (("{kill: agent:eu-2}", "{stop: agent:eu-2}"), "stop takes"),
        (("end: 90s", "end: 90"), "no unit"),
    ],
)
def test_a_bad_scenario_is_refused_naming_file_and_field(
    tmp_path: Path, change: tuple[str, str], problem: str
) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ScenarioError, match=problem) as raised:
        load_scenario(path)
    assert str(raised.value).startswith(f"{path}: ")
