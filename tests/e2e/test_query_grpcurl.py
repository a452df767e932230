"""The query service's newer RPCs through grpcurl and server reflection, no proto files:
filtered ListVerdicts, GetHistory, ListAgents, a resumed WatchVerdicts, and their errors.

One coordinator with three agents (eu, us, ap), an HTTP target and a closed port serves the
module.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from running_system import Coordinator, System, grpcurl

pytestmark = pytest.mark.e2e

SERVICE = "vantage.v1.QueryService"


@pytest.fixture(scope="module")
def coordinator(module_system: System) -> Coordinator:
    return module_system.web_and_closed_port(web_labels="{team: web}", closed_labels="{team: db}")


def _call(coordinator: Coordinator, method: str, request: dict[str, Any], *flags: str) -> Any:
    called = grpcurl(*flags, "-d", json.dumps(request), coordinator.address, f"{SERVICE}/{method}")
    assert called.returncode == 0, called.stderr
    return json.loads(called.stdout)


def _error(coordinator: Coordinator, method: str, request: dict[str, Any]) -> str:
    called = grpcurl("-d", json.dumps(request), coordinator.address, f"{SERVICE}/{method}")
    assert called.returncode != 0, called.stdout
    return called.stderr


def _messages(text: str) -> list[Any]:
    """The JSON messages grpcurl printed one after the other."""
    decoder = json.JSONDecoder()
    messages, position = [], 0
    while text[position:].strip():
        position += len(text[position:]) - len(text[position:].lstrip())
        message, position = decoder.raw_decode(text, position)
        messages.append(message)
    return messages


def test_reflection_describes_the_new_rpcs_and_fields(coordinator: Coordinator) -> None:
    service = grpcurl(coordinator.address, "describe", SERVICE)
    assert service.returncode == 0, service.stderr
    for rpc in ("GetHistory", "CheckNow", "WatchVerdicts", "ListAgents"):
        assert f"rpc {rpc}" in service.stdout
    watch = grpcurl(coordinator.address, "describe", "vantage.v1.WatchVerdictsRequest")
    assert "optional uint64 after_id" in watch.stdout


def test_list_verdicts_filters(coordinator: Coordinator) -> None:
    down = _call(coordinator, "ListVerdicts", {"states": ["VERDICT_STATE_GLOBAL"]})
    assert [v["check"] for v in down["verdicts"]] == ["closed-port"]
    labelled = _call(coordinator, "ListVerdicts", {"labels": {"team": "web"}})
    assert [v["check"] for v in labelled["verdicts"]] == ["web"]
    assert _call(coordinator, "ListVerdicts", {"states": ["VERDICT_STATE_REGIONAL"]}) == {}


def test_list_verdicts_refuses_an_unknown_state(coordinator: Coordinator) -> None:
    error = _error(coordinator, "ListVerdicts", {"states": [99]})
    assert "Code: InvalidArgument" in error
    assert "states: 99 is not a verdict state" in error


def test_history_with_evidence(coordinator: Coordinator) -> None:
    history = _call(coordinator, "GetHistory", {"check": "closed-port"})
    [transition] = history["transitions"]
    assert transition["previous"] == "VERDICT_STATE_UNKNOWN"
    verdict = transition["verdict"]
    assert verdict["state"] == "VERDICT_STATE_GLOBAL"
    assert verdict["regions_down"] == ["ap", "eu", "us"]
    assert verdict["regions"]["eu"]["failing_agents"] == ["eu-1"]
    error = _error(
        coordinator,
        "GetHistory",
        {"check": "web", "since": "2030-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"},
    )
    assert "Code: InvalidArgument" in error
    assert "Code: NotFound" in _error(coordinator, "GetHistory", {"check": "nope"})


def test_list_agents(coordinator: Coordinator) -> None:
    agents = _call(coordinator, "ListAgents", {})["agents"]
    assert [(a["name"], a["region"], a["connected"]) for a in agents] == [
        ("ap-1", "ap", True),
        ("eu-1", "eu", True),
        ("us-1", "us", True),
    ]


def test_a_resumed_watch_replays_what_is_kept(coordinator: Coordinator) -> None:
    # The stream stays open for live transitions; the deadline ends it after the replay.
    watched = grpcurl(
        "-max-time",
        "3",
        "-d",
        json.dumps({"afterId": "0"}),
        coordinator.address,
        f"{SERVICE}/WatchVerdicts",
    )
    assert "Code: DeadlineExceeded" in watched.stderr, watched.stderr
    transitions = _messages(watched.stdout)
    assert [int(t["id"]) for t in transitions] == list(range(1, len(transitions) + 1))
    assert {t["check"] for t in transitions} == {"web", "closed-port"}


def test_a_watch_cannot_resume_past_the_last_id(coordinator: Coordinator) -> None:
    error = _error(coordinator, "WatchVerdicts", {"afterId": "999999"})
    assert "Code: OutOfRange" in error
    assert "after_id 999999 is past the last transition id" in error
