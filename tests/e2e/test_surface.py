"""The public surface of a running system: CLI, /metrics (promtool), gRPC (grpcurl), and
what happens to bad input from outside while it runs.

One coordinator with three agents (eu, us, ap) serves every test in this module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from running_system import TOKEN, Coordinator, System, grpcurl, wait_until

from vantage_proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

pytestmark = pytest.mark.e2e

CHECK_NAMES = ["closed-port", "web"]


@pytest.fixture(scope="module")
def coordinator(module_system: System) -> Coordinator:
    return module_system.web_and_closed_port()


def _status(coordinator: Coordinator) -> list[dict[str, object]]:
    verdicts: list[dict[str, object]] = json.loads(coordinator.cli("status", "--json").stdout)[
        "verdicts"
    ]
    return verdicts


def test_status_json_has_the_documented_fields(coordinator: Coordinator) -> None:
    verdicts = {v["check"]: v for v in _status(coordinator)}
    assert sorted(verdicts) == CHECK_NAMES
    down = verdicts["closed-port"]
    assert down["state"] == "global"
    assert down["failure"] == "connect_refused"
    assert down["regions_down"] == ["ap", "eu", "us"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(down["since"]))
    regions = down["regions"]
    assert isinstance(regions, dict)
    assert regions["eu"] == {
        "state": "down",
        "up": 0,
        "down": 1,
        "stale": 0,
        "failure": "connect_refused",
        "failing_agents": ["eu-1"],
    }


def test_status_table_names_every_check(coordinator: Coordinator) -> None:
    out = coordinator.cli("status").stdout
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["CHECK", "STATE"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows == {"closed-port": "global", "web": "up"}
    assert "connect_refused" in out


def test_status_of_an_unknown_check_is_a_one_line_error(coordinator: Coordinator) -> None:
    result = coordinator.cli("status", "no-such-check", check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "no-such-check" in result.stderr


def test_agents_lists_the_fleet(coordinator: Coordinator) -> None:
    agents = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
    assert [(a["name"], a["region"], a["connected"], a["impaired"]) for a in agents] == [
        ("ap-1", "ap", True, False),
        ("eu-1", "eu", True, False),
        ("us-1", "us", True, False),
    ]
    assert all(a["last_seen"] for a in agents)
    table = coordinator.cli("agents").stdout
    assert table.splitlines()[0].split()[:3] == ["AGENT", "REGION", "CONNECTED"]


def test_metrics_pass_promtool(coordinator: Coordinator) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs the Debian package prometheus"
    metrics = coordinator.metrics()
    assert 'vantage_check_verdict{check="closed-port",state="global"} 1.0' in metrics
    result = subprocess.run(
        [promtool, "check", "metrics"], input=metrics, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_healthz(coordinator: Coordinator) -> None:
    url = f"http://127.0.0.1:{coordinator.http_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200


def test_grpcurl_lists_services_through_reflection(coordinator: Coordinator) -> None:
    listed = grpcurl(coordinator.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {
        "vantage.v1.AgentService",
        "vantage.v1.QueryService",
        "grpc.health.v1.Health",
    } <= services
    described = grpcurl(coordinator.address, "describe", "vantage.v1.QueryService")
    assert described.returncode == 0, described.stderr
    assert "rpc ListVerdicts" in described.stdout


def test_grpcurl_calls_the_query_and_health_services(coordinator: Coordinator) -> None:
    called = grpcurl(
        "-d", '{"check": "web"}', coordinator.address, "vantage.v1.QueryService/GetVerdict"
    )
    assert called.returncode == 0, called.stderr
    verdict = json.loads(called.stdout)
    assert verdict["check"] == "web"
    assert verdict["state"] == "VERDICT_STATE_UP"
    health = grpcurl(coordinator.address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_wrong_token_is_refused_on_both_sides(
    coordinator: Coordinator, module_system: System, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text("this-token-is-not-listed-anywhere\n")
    intruder = module_system.agent(coordinator, "intruder-1", "eu", token_file=wrong)
    assert intruder.popen.wait(timeout=30) == 1
    assert "UNAUTHENTICATED" in intruder.stderr() or "token" in intruder.stderr()
    wait_until(
        lambda: any(
            e.get("level") == "warning" and "intruder-1" in json.dumps(e)
            for e in coordinator.proc.log_events()
        ),
        10,
        "the coordinator to log the refused agent",
    )
    agents = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
    assert "intruder-1" not in [a["name"] for a in agents]
    assert coordinator.proc.popen.poll() is None


def _dropped(coordinator: Coordinator, reason: str) -> float:
    match = re.search(
        rf'^vantage_results_dropped_total{{reason="{reason}"}} (\S+)$',
        coordinator.metrics(),
        re.MULTILINE,
    )
    assert match, f"no vantage_results_dropped_total for reason {reason}"
    return float(match.group(1))


def test_result_for_an_unassigned_check_is_dropped_and_counted(coordinator: Coordinator) -> None:
    before = _dropped(coordinator, "unassigned")
    result = agent_pb2.ProbeResult(
        check="not-assigned",
        seq=1,
        started_unix_us=int(time.time() * 1e6),
        success=False,
        failure=common_pb2.FAILURE_CLASS_CONNECT_REFUSED,
        message="made up",
    )
    messages = [
        agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(name="tester-1", region="eu", version="test", instance_id="x")
        ),
        agent_pb2.AgentMessage(results=agent_pb2.ResultBatch(results=[result])),
    ]
    with grpc.insecure_channel(coordinator.address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        replies = stub.Connect(
            iter(messages), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5
        )
        kinds: list[str | None] = []
        try:
            for reply in replies:
                kinds.append(reply.WhichOneof("kind"))
        except grpc.RpcError as exc:  # the deadline ends a stream the coordinator keeps open
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        assert kinds[:2] == ["welcome", "assignments"]
    wait_until(
        lambda: _dropped(coordinator, "unassigned") == before + 1, 10, "the drop to be counted"
    )
    verdicts = {v["check"] for v in _status(coordinator)}
    assert "not-assigned" not in verdicts


def test_a_bad_checks_file_on_reload_keeps_the_running_checks(coordinator: Coordinator) -> None:
    checks = coordinator.config.parent / "checks.yaml"
    good = checks.read_text()
    checks.write_text(good + "  - {name: web, type: tcp, target: '127.0.0.1:1'}\n")
    try:
        wait_until(
            lambda: any(
                e.get("level") == "error" and "duplicate check name" in json.dumps(e)
                for e in coordinator.proc.log_events()
            ),
            15,
            "the coordinator to refuse the bad checks file",
        )
        assert coordinator.proc.popen.poll() is None
        states = {v["check"]: v["state"] for v in _status(coordinator)}
        assert states == {"web": "up", "closed-port": "global"}
    finally:
        checks.write_text(good)
