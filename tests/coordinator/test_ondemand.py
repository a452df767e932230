"""On-demand checks (CheckNow) on a real coordinator: scripted agents on real streams for
the protocol's corners, real in-process agents for the whole round trip, and the pieces
(rate limiter, peer parsing, rates) on their own."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_coordinator import TOKEN, WAIT, FakeAgent, Running, eventually, start, write_config

from agent.agent import Agent, AgentSettings
from coordinator.auth import peer_host
from coordinator.limits import RateLimiter, format_rate, parse_rate
from vantage_proto.v1 import agent_pb2, common_pb2, query_pb2

# Two regions of one agent each make a verdict.
ENGINE = "engine: {min_agents: 2, min_regions: 2}\n"
ON_DEMAND = "on_demand: {allow: [127.0.0.0/8], rate: 600/min, burst: 100}\n"


@contextlib.asynccontextmanager
async def coordinator(tmp_path: Path, on_demand: str = ON_DEMAND) -> AsyncIterator[Running]:
    config = write_config(tmp_path, checks=None, extra=ENGINE + on_demand)
    async with start(config) as running:
        yield running


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with coordinator(tmp_path) as live:
        yield live


async def connect(
    running: Running, name: str, region: str, capabilities: tuple[str, ...] = ("http", "tcp")
) -> FakeAgent:
    agent = running.agent(name, region)
    await agent.send(
        hello=agent_pb2.Hello(
            name=name, region=region, version="test", capabilities=capabilities, instance_id="i"
        )
    )
    assert (await agent.read()).WhichOneof("kind") == "welcome"
    assert (await agent.read()).WhichOneof("kind") == "assignments"
    return agent


async def probe_request(agent: FakeAgent) -> agent_pb2.ProbeRequest:
    message = await agent.read()
    assert message.WhichOneof("kind") == "probe_request", message
    return message.probe_request


def answer(
    request: agent_pb2.ProbeRequest,
    *,
    success: bool = True,
    failure: int = common_pb2.FAILURE_CLASS_UNSPECIFIED,
    refused: str = "",
) -> agent_pb2.ProbeResponse:
    result = agent_pb2.ProbeResult(
        check=request.check.name,
        check_revision=request.check.revision,
        started_unix_us=int(time.time() * 1e6),
        duration_us=1500,
        success=success,
        failure=failure,
        message="" if success else "connect 127.0.0.2:1: connection refused",
    )
    return agent_pb2.ProbeResponse(request_id=request.request_id, result=result, refused=refused)


def check_now(running: Running, target: str, **fields: Any) -> Any:
    """The CheckNow call, started (a task-like call object to await)."""
    return running.queries.CheckNow(query_pb2.CheckNowRequest(target=target, **fields))


async def refused(running: Running, target: str, **fields: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check_now(running, target, **fields)
    return caught.value.code(), caught.value.details() or ""


async def test_every_connected_agent_is_asked_and_their_answers_judged(running: Running) -> None:
    eu = await connect(running, "eu-1", "eu")
    us = await connect(running, "us-1", "us")
    call = check_now(running, "http://127.0.0.2:1/", timeout_ms=1500)
    asked_eu, asked_us = await probe_request(eu), await probe_request(us)
    assert asked_eu.request_id == asked_us.request_id
    assert asked_eu.check.name == f"checknow-{asked_eu.request_id}"
    assert asked_eu.check.target == "http://127.0.0.2:1/"
    assert asked_eu.check.WhichOneof("probe") == "http"
    assert asked_eu.check.timeout_ms == 1500
    assert asked_eu.guard.enabled
    assert list(asked_eu.guard.allow) == ["127.0.0.0/8"]
    await eu.send(probe_response=answer(asked_eu))
    await us.send(
        probe_response=answer(
            asked_us, success=False, failure=common_pb2.FAILURE_CLASS_CONNECT_REFUSED
        )
    )
    async with asyncio.timeout(WAIT):
        response = await call
    assert response.check.name == asked_eu.check.name
    assert response.verdict.check == asked_eu.check.name
    assert response.verdict.state == query_pb2.VERDICT_STATE_REGIONAL
    assert response.verdict.reason == "down in us (connect_refused); up in eu"
    assert list(response.verdict.regions_down) == ["us"]
    assert response.verdict.regions["eu"].up == 1
    assert list(response.verdict.regions["us"].failing_agents) == ["us-1"]
    assert [(r.agent, r.region, r.result.success) for r in response.results] == [
        ("eu-1", "eu", True),
        ("us-1", "us", False),
    ]
    assert response.results[1].result.failure == common_pb2.FAILURE_CLASS_CONNECT_REFUSED
    assert response.results[1].result.message == "connect 127.0.0.2:1: connection refused"
    assert list(response.missing) == []
    assert list(response.unable) == []
    for agent in (eu, us):
        agent.close()


async def test_agents_that_do_not_answer_in_time_are_missing(running: Running) -> None:
    eu = await connect(running, "eu-1", "eu")
    us = await connect(running, "us-1", "us")
    call = check_now(running, "127.0.0.2:1", timeout_ms=200)
    await eu.send(probe_response=answer(await probe_request(eu)))
    await probe_request(us)  # and never answered
    async with asyncio.timeout(WAIT):
        response = await call
    assert list(response.missing) == ["us-1"]
    assert [r.agent for r in response.results] == ["eu-1"]
    assert response.verdict.state == query_pb2.VERDICT_STATE_UNKNOWN
    assert response.verdict.regions["us"].stale == 1
    assert response.verdict.reason == "only 1 fresh agent, 2 needed (1 stale); no answer from us-1"
    for agent in (eu, us):
        agent.close()


async def test_an_agent_that_disconnects_is_missing_without_waiting_for_the_deadline(
    running: Running,
) -> None:
    eu = await connect(running, "eu-1", "eu")
    us = await connect(running, "us-1", "us")
    # A deadline far beyond the test's own wait: the answer must not wait for it.
    call = check_now(running, "127.0.0.2:1", timeout_ms=30_000)
    await eu.send(probe_response=answer(await probe_request(eu)))
    await probe_request(us)
    us.close()
    async with asyncio.timeout(WAIT):
        response = await call
    assert list(response.missing) == ["us-1"]
    eu.close()


async def test_agents_without_the_probe_type_are_unable(running: Running) -> None:
    eu = await connect(running, "eu-1", "eu", capabilities=("http", "tcp"))
    ap = await connect(running, "ap-1", "ap", capabilities=("http", "icmp"))
    call = check_now(running, "127.0.0.2", timeout_ms=1000)  # a bare host: icmp
    asked = await probe_request(ap)
    assert asked.check.WhichOneof("probe") == "icmp"
    await ap.send(probe_response=answer(asked))
    async with asyncio.timeout(WAIT):
        response = await call
    assert list(response.unable) == ["eu-1"]
    assert [r.agent for r in response.results] == ["ap-1"]
    assert "eu" not in response.verdict.regions

    response = await check_now(running, "127.0.0.2", type="dns")
    assert list(response.unable) == ["ap-1", "eu-1"]
    assert response.verdict.state == query_pb2.VERDICT_STATE_UNKNOWN
    assert response.verdict.reason == "no connected agent can run dns probes (ap-1, eu-1)"
    for agent in (eu, ap):
        agent.close()


async def test_without_agents_the_answer_is_unknown(running: Running) -> None:
    response = await check_now(running, "http://127.0.0.2:1/")
    assert response.verdict.state == query_pb2.VERDICT_STATE_UNKNOWN
    assert response.verdict.reason == "no agent is connected"
    assert list(response.results) == []
    assert response.check.timeout_ms == 5000  # the default


async def test_a_refusal_by_an_agent_guard_denies_the_whole_call(running: Running) -> None:
    eu = await connect(running, "eu-1", "eu")
    us = await connect(running, "us-1", "us")
    call = check_now(running, "http://127.0.0.2:1/", timeout_ms=30_000)
    await probe_request(eu)
    why = "127.0.0.1 (loopback) is not allowed for on-demand checks"
    await us.send(probe_response=answer(await probe_request(us), success=False, refused=why))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(WAIT):
            await call
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == f"agent us-1 refused: {why}"
    for agent in (eu, us):
        agent.close()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("http://10.1.2.3/", "10.1.2.3 (private) is not allowed for on-demand checks"),
        ("169.254.169.254", "169.254.169.254 (cloud metadata) is not allowed for on-demand checks"),
        (
            "[fd00:ec2::254]:80",
            "fd00:ec2::254 (cloud metadata) is not allowed for on-demand checks",
        ),
        (
            "100.64.1.1:443",
            "100.64.1.1 (not globally reachable) is not allowed for on-demand checks",
        ),
        ("http://[::1]:8080/", "::1 (loopback) is not allowed for on-demand checks"),
    ],
)
async def test_the_guard_refuses_private_and_metadata_targets(
    running: Running, target: str, message: str
) -> None:
    assert await refused(running, target) == (grpc.StatusCode.PERMISSION_DENIED, message)


async def test_the_guard_refuses_a_name_that_resolves_to_a_refused_address(
    tmp_path: Path,
) -> None:
    async with coordinator(tmp_path, "on_demand: {allow: [127.0.0.2/32]}\n") as running:
        code, message = await refused(running, "http://localhost:1/")
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert message.startswith("localhost resolves to ")
        assert message.endswith("(loopback), which is not allowed for on-demand checks")
        # The allow-list opens exactly what it lists.
        response = await check_now(running, "http://127.0.0.2:1/")
        assert response.verdict.reason == "no agent is connected"
        assert await refused(running, "http://127.0.0.3:1/") == (
            grpc.StatusCode.PERMISSION_DENIED,
            "127.0.0.3 (loopback) is not allowed for on-demand checks",
        )


async def test_without_the_guard_anything_is_asked(tmp_path: Path) -> None:
    async with coordinator(tmp_path, "on_demand: {guard: false}\n") as running:
        eu = await connect(running, "eu-1", "eu")
        call = check_now(running, "http://localhost:1/", timeout_ms=500)
        asked = await probe_request(eu)
        assert not asked.guard.enabled
        await eu.send(probe_response=answer(asked))
        async with asyncio.timeout(WAIT):
            response = await call
        assert [r.agent for r in response.results] == ["eu-1"]
        eu.close()


async def test_the_rate_limit_per_client_says_when_to_retry(tmp_path: Path) -> None:
    async with coordinator(
        tmp_path, "on_demand: {allow: [127.0.0.0/8], rate: 2/min, burst: 2}\n"
    ) as running:
        for _ in range(2):
            await check_now(running, "http://127.0.0.2:1/")
        code, message = await refused(running, "http://127.0.0.2:1/")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        pattern = (
            r"rate limit reached: 2/min on-demand checks per caller \(burst 2\); retry in (\d+)s"
        )
        match = re.fullmatch(pattern, message)
        assert match is not None, message
        assert 0 < int(match.group(1)) <= 30


async def test_on_demand_checks_in_flight_are_bounded(tmp_path: Path) -> None:
    on_demand = "on_demand: {allow: [127.0.0.0/8], max_in_flight: 1}\n"
    async with coordinator(tmp_path, on_demand) as running:
        eu = await connect(running, "eu-1", "eu")
        first = check_now(running, "http://127.0.0.2:1/", timeout_ms=30_000)
        asked = await probe_request(eu)
        code, message = await refused(running, "http://127.0.0.2:1/")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "(on_demand.max_in_flight)" in message
        await eu.send(probe_response=answer(asked))
        async with asyncio.timeout(WAIT):
            await first
        eu.close()


@pytest.mark.parametrize(
    ("target", "fields", "message"),
    [
        ("", {}, "the target is empty"),
        ("ftp://example.org/", {}, "target 'ftp://example.org/' is not an http:// or https:// URL"),
        ("example.org", {"type": "smtp"}, "unknown type 'smtp' (known: http, tcp, dns, icmp)"),
        ("example.org", {"type": "tcp"}, "a tcp check needs HOST:PORT, not 'example.org'"),
        ("exa mple.org", {}, "target 'exa mple.org' has spaces or control characters"),
        (
            "example.org",
            {"timeout_ms": 120_000},
            "timeout 2m is above the maximum of 30s (on_demand.max_timeout)",
        ),
        ("example.org", {"timeout_ms": 300}, "3 pings 200ms apart do not fit in timeout 300ms"),
    ],
)
async def test_invalid_requests_are_invalid_arguments(
    running: Running, target: str, fields: dict[str, Any], message: str
) -> None:
    assert await refused(running, target, **fields) == (grpc.StatusCode.INVALID_ARGUMENT, message)


async def test_concurrent_checks_are_independent(running: Running) -> None:
    eu = await connect(running, "eu-1", "eu")
    us = await connect(running, "us-1", "us")
    first = check_now(running, "http://127.0.0.2:1/", timeout_ms=30_000)
    first_eu, first_us = await probe_request(eu), await probe_request(us)
    second = check_now(running, "127.0.0.2:2", timeout_ms=30_000)
    second_eu, second_us = await probe_request(eu), await probe_request(us)
    assert first_eu.request_id != second_eu.request_id
    refused_class = common_pb2.FAILURE_CLASS_CONNECT_REFUSED
    # Answered in the other order, each call gets its own answers.
    await eu.send(probe_response=answer(second_eu, success=False, failure=refused_class))
    await us.send(probe_response=answer(second_us, success=False, failure=refused_class))
    await eu.send(probe_response=answer(first_eu))
    await us.send(probe_response=answer(first_us))
    async with asyncio.timeout(WAIT):
        one, two = await first, await second
    assert one.verdict.state == query_pb2.VERDICT_STATE_UP
    assert two.verdict.state == query_pb2.VERDICT_STATE_GLOBAL
    assert two.check.target == "127.0.0.2:2"
    for agent in (eu, us):
        agent.close()


async def test_a_cancelled_call_leaves_the_agents_alone(running: Running) -> None:
    eu = await connect(running, "eu-1", "eu")
    call = check_now(running, "http://127.0.0.2:1/", timeout_ms=30_000)
    asked = await probe_request(eu)
    call.cancel()
    await eventually(lambda: running.coordinator.on_demand.in_flight == 0, "the call to end")
    # The late answer is dropped, the agent's stream carries on as before.
    await eu.send(probe_response=answer(asked))
    await eu.send(heartbeat=agent_pb2.Heartbeat(sent_unix_us=1))
    assert (await eu.read()).WhichOneof("kind") == "heartbeat"
    agents = await running.queries.ListAgents(query_pb2.ListAgentsRequest())
    assert [agent.connected for agent in agents.agents] == [True]
    eu.close()


# -- real agents --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def real_agent(running: Running, name: str, region: str) -> AsyncIterator[Agent]:
    settings = AgentSettings(
        coordinator=running.grpc_address, name=name, region=region, token=TOKEN
    )
    agent = Agent(settings)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def http_server(host: str, *lines: str) -> tuple[asyncio.Server, int]:
    reply = ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    return server, int(server.sockets[0].getsockname()[1])


@pytest.fixture
async def servers() -> AsyncIterator[list[asyncio.Server]]:
    started: list[asyncio.Server] = []
    yield started
    for server in started:
        server.close()
        await server.wait_closed()


async def test_real_agents_probe_and_answer(tmp_path: Path, servers: list[asyncio.Server]) -> None:
    on_demand = "on_demand: {allow: [127.0.0.2/32]}\n"
    async with coordinator(tmp_path, on_demand) as running:
        web, port = await http_server("127.0.0.2", "HTTP/1.1 204 No Content", "Connection: close")
        inner, inner_port = await http_server("127.0.0.1", "HTTP/1.1 204 No Content")
        hop, hop_port = await http_server(
            "127.0.0.2",
            "HTTP/1.1 302 Found",
            f"Location: http://127.0.0.1:{inner_port}/",
            "Content-Length: 0",
        )
        servers.extend((web, inner, hop))
        async with real_agent(running, "eu-1", "eu"), real_agent(running, "us-1", "us"):

            async def both_connected() -> bool:
                listed = await running.queries.ListAgents(query_pb2.ListAgentsRequest())
                return sum(agent.connected for agent in listed.agents) == 2

            await eventually(both_connected, "both agents to connect")
            response = await check_now(running, f"http://127.0.0.2:{port}/")
            assert response.verdict.state == query_pb2.VERDICT_STATE_UP
            assert [(r.agent, r.result.http.status_code) for r in response.results] == [
                ("eu-1", 204),
                ("us-1", 204),
            ]
            # The first hop is allowed; the agents refuse the hop it redirects to.
            code, message = await refused(running, f"http://127.0.0.2:{hop_port}/")
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert message.startswith("agent ")
            assert message.endswith(
                " refused: 127.0.0.1 (loopback) is not allowed for on-demand checks"
            )


# -- the pieces ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limiter_refills_and_says_how_long_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    assert [limiter.take("a"), limiter.take("a")] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0.0  # per client
    clock.now += 0.5
    assert limiter.take("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    clock.now += 100
    assert [limiter.take("a"), limiter.take("a"), limiter.take("a")] == [0.0, 0.0, 1.0]


def test_the_rate_limiter_table_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.1, burst=1, max_clients=3, clock=clock)
    for client in ("a", "b", "c", "d"):
        assert limiter.take(client) == 0.0
    assert len(limiter) == 3
    assert limiter.take("d") > 0  # remembered
    assert limiter.take("a") == 0.0  # forgotten, the least recently seen


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        ("ipv4:192.0.2.7:51234", "192.0.2.7"),
        ("ipv6:%5B2001:db8::7%5D:5123", "2001:db8::7"),
        ("ipv6:[::1]:5123", "::1"),
        ("unix:/run/vantage.sock", "unix"),
        ("198.51.100.4", "198.51.100.4"),
    ],
)
def test_clients_are_told_apart_by_address(peer: str, client: str) -> None:
    assert peer_host(peer) == client


def test_rates_are_written_per_second_minute_or_hour() -> None:
    assert parse_rate("10/min") == pytest.approx(10 / 60)
    assert parse_rate("2/s") == 2.0
    assert parse_rate("100/hour") == pytest.approx(100 / 3600)
    assert format_rate(10 / 60) == "10/min"
    assert format_rate(2.0) == "2/s"
    assert format_rate(1 / 3600) == "1/hour"
    for bad in ("fast", "0/min", "10/week", 10):
        with pytest.raises(ValueError, match="rate"):
            parse_rate(bad)
