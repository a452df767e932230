"""The coordinator as a whole: listeners, health, reflection, reload, start-up errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from live_coordinator import CHECKS, WAIT, Running, eventually, start, write_config

from coordinator.config import load_config
from coordinator.errors import ListenError
from coordinator.server import Coordinator
from vantage.checks import ConfigError
from vantage_proto.v1 import query_pb2

RELOADED = CHECKS + "  - {name: api, type: tcp, target: '127.0.0.1:3', interval: 2s, timeout: 1s}\n"


async def test_listening_line_names_the_bound_ports(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with start(write_config(tmp_path)) as running:
            ports = running.coordinator.bound_ports
    [event] = [e for e in logs if e["event"] == "coordinator listening"]
    assert ports is not None
    assert (event["grpc_port"], event["http_port"]) == (ports.grpc, ports.http)
    assert all(isinstance(event[key], int) and event[key] > 0 for key in ("grpc_port", "http_port"))


async def test_healthz(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{running.http_url}/healthz") as response,
    ):
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "ok"
    assert body["version"]
    assert body["agents_connected"] == 1
    assert body["checks_loaded"] == 2
    agent.close()


async def test_grpc_health_reports_serving(running: Running) -> None:
    stub = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "vantage.v1.AgentService", "vantage.v1.QueryService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(running: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    call.cancel()
    names = {service.name for service in reply.list_services_response.service}
    assert {
        "vantage.v1.AgentService",
        "vantage.v1.QueryService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_bad_checks_file_on_reload_keeps_the_running_checks(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    running.checks_file.write_text(CHECKS + "  - {name: web, type: tcp, target: 'h:1'}\n")
    with structlog.testing.capture_logs() as logs:
        assert not running.coordinator.reload_checks()
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert "checks.yaml:4: check 'web': duplicate check name" in error["error"]
    verdicts = await running.queries.ListVerdicts(query_pb2.ListVerdictsRequest())
    assert sorted(v.check for v in verdicts.verdicts) == ["db", "web"]
    assert await running.metric('vantage_checks_reloads_total{result="failed"}') == 1
    # Nothing was pushed: the agent's next message is the answer to its heartbeat.
    await agent.send(heartbeat={"sent_unix_us": 1})
    assert (await agent.read()).WhichOneof("kind") == "heartbeat"
    agent.close()


async def test_bad_tokens_file_on_sighup_keeps_the_admitted_tokens(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    tokens = running.directory / "tokens.yaml"
    tokens.write_text(tokens.read_text() + "  - token: short\n")
    with structlog.testing.capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(
            lambda: running.metric('vantage_tokens_reloads_total{result="failed"}'),
            "the reload refused",
        )
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["event"] == "tokens file refused, the admitted tokens stay"
    assert "tokens.yaml:5: tokens[2]: token: " in error["error"]
    # The stream goes on, and the old tokens still admit a new agent.
    await agent.send(heartbeat={"sent_unix_us": 1})
    assert (await agent.read()).WhichOneof("kind") == "heartbeat"
    other = running.agent("us-1", "us")
    await other.handshake()
    agent.close()
    other.close()


async def test_good_checks_file_change_is_pushed_to_connected_agents(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    running.checks_file.write_text(RELOADED.replace("name: db,", "name: database,"))
    # Found by polling the file's modification time, as an operator's edit would be.
    reply = await agent.read()
    assert reply.WhichOneof("kind") == "assignments"
    change = reply.assignments
    assert not change.full
    assert sorted(check.name for check in change.checks) == ["api", "database"]
    assert list(change.removed) == ["db"]
    verdicts = await running.queries.ListVerdicts(query_pb2.ListVerdictsRequest())
    assert sorted(v.check for v in verdicts.verdicts) == ["api", "database", "web"]
    assert 'check="db"' not in await running.metrics()
    agent.close()


async def test_sighup_reloads_the_checks_file(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    running.checks_file.write_text(RELOADED)
    os.kill(os.getpid(), signal.SIGHUP)
    reply = await agent.read()
    assert reply.assignments.full is False
    assert [check.name for check in reply.assignments.checks] == ["api"]
    agent.close()


async def test_bad_files_are_refused_before_anything_listens(tmp_path: Path) -> None:
    config = write_config(tmp_path, checks="checks:\n  - {name: web, type: gopher}\n")
    with pytest.raises(ConfigError, match=r"checks\.yaml:2: check 'web': unknown probe type"):
        Coordinator(load_config(config))
    config = write_config(tmp_path, tokens="tokens:\n  - token: short\n")
    with pytest.raises(ConfigError, match=r"tokens\.yaml:2: tokens\[0\]: token: "):
        Coordinator(load_config(config))


async def test_an_address_in_use_is_a_listen_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, extra=f"http_listen: 127.0.0.1:{port}\n")
        text = config.read_text().replace("http_listen: 127.0.0.1:0\n", "")
        config.write_text(text)
        coordinator = Coordinator(load_config(config), reload_on_sighup=False)
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port} .http_listen."):
            async with asyncio.timeout(WAIT):
                await coordinator.run()


async def test_without_tokens_no_agent_is_admitted(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with start(write_config(tmp_path, tokens=None)) as running:
            agent = running.agent()
            await agent.hello()
            assert await agent.status() == grpc.StatusCode.UNAUTHENTICATED
    assert any(e["log_level"] == "warning" and "no agent tokens" in e["event"] for e in logs)


async def test_engine_ticks_make_silent_agents_stale(tmp_path: Path) -> None:
    checks = (
        "checks:\n  - {name: web, type: tcp, target: '127.0.0.1:1', interval: 1s, timeout: 500ms}\n"
    )
    extra = "engine: {min_agents: 1, min_regions: 1, stale_intervals: 0.5}\n"
    async with start(write_config(tmp_path, checks=checks, extra=extra)) as running:
        agent = running.agent()
        await agent.handshake()
        await agent.send_results([agent.result("web")])
        assert running.coordinator.engine.verdict("web").state.value == "up"  # type: ignore[union-attr]

        def unknown() -> bool:
            verdict = running.coordinator.engine.verdict("web")
            return verdict is not None and verdict.state.value == "unknown"

        await eventually(unknown, "the silent agent's view to go stale")
        agent.close()
