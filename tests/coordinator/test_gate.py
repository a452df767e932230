"""Limits on a real coordinator in-process (real sockets): oversized messages and bodies,
slow and idle clients, connection caps, garbage bytes, and an agent paced to its rate --
each refused with a clear status and a count, and nobody else held up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from live_coordinator import WAIT, Running, eventually, start, write_config

from coordinator.limits import LimitsConfig, TokenBucket
from vantage.client import refusal_reason
from vantage.configfile import ConfigError
from vantage_proto.v1 import agent_pb2, query_pb2

LIMITS = (
    "limits: {max_message_bytes: 16KiB, max_body_bytes: 2KiB, http_idle_timeout: 500ms,"
    " handshake_timeout: 500ms, max_http_connections_per_client: 4,"
    " agent_result_rate: 20/s, agent_result_burst: 20}\n"
    "engine: {min_agents: 1, min_regions: 1, fail_after: 1, recover_after: 1,"
    " adaptive_confirmation: false}\n"
)


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Running]:
    async with start(write_config(tmp_path, extra=LIMITS)) as running:
        yield running


async def refused(running: Running, endpoint: str, reason: str) -> float | None:
    return await running.metric(
        f'vantage_requests_refused_total{{endpoint="{endpoint}",reason="{reason}"}}'
    )


def test_a_bucket_paces_and_refuses_by_its_clock() -> None:
    now = [0.0]
    bucket = TokenBucket(10.0, 20.0, clock=lambda: now[0])
    assert bucket.try_take(20) == 0.0
    assert bucket.try_take(1) == pytest.approx(0.1)
    assert bucket.debit(10) == pytest.approx(1.0)  # taken: a second of debt
    now[0] = 1.0
    assert bucket.try_take(1) == pytest.approx(0.1)
    now[0] = 3.0
    assert bucket.try_take(20) == 0.0


def test_the_result_budget_follows_the_checks() -> None:
    limits = LimitsConfig()
    assert limits.result_rate(scheduled=0.5, checks=10) == (100.0, 6000.0)
    assert limits.result_rate(scheduled=1000.0, checks=10_000) == (4000.0, 240_000.0)
    fixed = LimitsConfig(agent_result_rate="50/s", agent_result_burst=10)  # type: ignore[arg-type]
    assert fixed.result_rate(scheduled=1000.0, checks=10_000) == (50.0, 10.0)


async def test_an_oversized_agent_message_ends_only_that_stream(limited: Running) -> None:
    big = limited.agent("eu-1", "eu", instance_id="big")
    await big.handshake()
    other = limited.agent("us-1", "us")
    await other.handshake()
    result = big.result("web")
    result.message = "x" * 20_000
    await big.send(results=agent_pb2.ResultBatch(results=[result]))
    assert await big.status() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = await big.call.details()
    assert details.startswith("message of 20,0")
    assert details.endswith("bytes is over the limit of 16,384 (limits.max_message_bytes)")
    assert refusal_reason(await big.call.trailing_metadata()) == "too_large"
    assert await refused(limited, "agent", "too_large") == 1
    # Nothing of it was ingested; the other agent goes on.
    assert await other.send_results([other.result("web")]) == 1
    assert await limited.metric('vantage_results_received_total{region="eu"}') is None
    other.close()


async def test_an_oversized_query_is_refused_before_it_is_parsed(limited: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited.queries.CheckNow(query_pb2.CheckNowRequest(target="x" * 20_000))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_message_bytes" in str(caught.value.details())
    assert await refused(limited, "query", "too_large") == 1
    # Past gRPC's own ceiling (the limit plus 1 MiB) gRPC refuses it by itself.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await limited.queries.CheckNow(query_pb2.CheckNowRequest(target="x" * (2 << 20)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_an_agent_over_its_result_rate_is_paced_and_loses_nothing(
    limited: Running,
) -> None:
    flood = limited.agent("eu-1", "eu", instance_id="flood")
    await flood.handshake()
    steady = limited.agent("us-1", "us", instance_id="steady")
    await steady.handshake()
    # 20 a second with a burst of 20: the second batch of 30 waits for its budget...
    assert await flood.send_results([flood.result("web") for _ in range(30)]) == 30
    await flood.send(
        results=agent_pb2.ResultBatch(results=[flood.result("web") for _ in range(30)])
    )
    await eventually(lambda: refused(limited, "agent", "throttled"), "the flood to be paced")
    # ...while another agent's results go in at once,
    assert await steady.send_results([steady.result("web")]) == 1
    # and the flood's are all taken in the end, none dropped.
    reply = await flood.read()
    while reply.WhichOneof("kind") != "ack":
        reply = await flood.read()
    assert reply.ack.seq == 60
    assert await limited.metric('vantage_results_received_total{region="eu"}') == 60
    assert await limited.metric('vantage_results_dropped_total{reason="duplicate"}') == 0
    flood.close()
    steady.close()


async def test_http_bodies_are_bounded_in_size_and_time(limited: Running) -> None:
    url = f"{limited.http_url}/api/v1/checknow"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"{" + b" " * 4096 + b"}") as response:
            assert response.status == 413
            body = await response.json()
        assert body["error"] == {
            "code": "resource_exhausted",
            "message": "the request body is over 2,048 bytes (limits.max_body_bytes)",
        }
    host, port = limited.http_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/v1/checknow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    async with asyncio.timeout(WAIT):
        status = await reader.readline()
    assert status.startswith(b"HTTP/1.1 408")
    writer.close()
    assert await refused(limited, "http", "too_large") == 1
    assert await refused(limited, "http", "timeout") == 1


async def test_a_slow_loris_is_cut_off_and_others_are_served(limited: Running) -> None:
    host, port = limited.http_url.removeprefix("http://").split(":")
    slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(6):  # from 127.0.0.2, two over its cap of 4
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        slow.append((reader, writer))
    await eventually(lambda: refused(limited, "http", "too_many_connections"), "the connection cap")
    # Another client is served meanwhile.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{limited.http_url}/healthz") as response,
    ):
        assert response.status == 200
    answers = []
    for reader, writer in slow:
        async with asyncio.timeout(WAIT):
            answers.append(await reader.read())
        writer.close()
    assert sum(answer.startswith(b"HTTP/1.1 408") for answer in answers) == 4
    assert answers.count(b"") == 2  # closed as soon as made
    assert await refused(limited, "http", "too_many_connections") == 2
    assert await refused(limited, "http", "timeout") == 4


async def test_garbage_on_either_port_harms_nothing(limited: Running) -> None:
    agent = limited.agent("eu-1", "eu")
    await agent.handshake()
    assert limited.coordinator.bound_ports is not None
    for port in (limited.coordinator.bound_ports.grpc, limited.coordinator.bound_ports.http):
        for garbage in (b"\x00\xff" * 4096, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x07" * 64):
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(garbage)
                await writer.drain()
                async with asyncio.timeout(WAIT):
                    await reader.read()  # the server closes it
                writer.close()
    assert await agent.send_results([agent.result("web")]) == 1
    reply = await limited.queries.ListAgents(query_pb2.ListAgentsRequest())
    assert [a.name for a in reply.agents] == ["eu-1"]
    agent.close()


async def test_more_checks_than_an_agent_may_run_are_refused(tmp_path: Path) -> None:
    from coordinator.config import load_config
    from coordinator.server import Coordinator

    checks = "checks:\n" + "".join(
        f"  - {{name: c{i}, type: tcp, target: '127.0.0.1:{i + 1}'}}\n" for i in range(3)
    )
    config = write_config(tmp_path, checks=checks, extra="limits: {max_checks_per_agent: 2}\n")
    with pytest.raises(
        ConfigError, match=r"3 checks is more than limits.max_checks_per_agent \(2\)"
    ):
        Coordinator(load_config(config))
    config = write_config(tmp_path, extra="limits: {max_checks_per_agent: 2}\n")
    async with start(config) as running:
        (tmp_path / "checks.yaml").write_text(checks)
        assert not running.coordinator.reload_checks()
        assert len(running.coordinator.checks) == 2
