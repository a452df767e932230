"""Who may connect and query, on a real coordinator in-process (real sockets): agent tokens
bound to a name and a region, query and checknow scopes, revocation of live streams,
per-caller stream caps, and the refusals' statuses, counters and lack of side effects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from live_coordinator import WAIT, FakeAgent, Running, eventually, start, write_config

from coordinator.auth import Authenticator, AuthError, QueryAuth
from coordinator.tokens import Scope, TokenFile, TokenRegistry
from vantage.client import refusal_reason
from vantage.configfile import ConfigError
from vantage_proto.v1 import query_pb2


@dataclass
class Tokens:
    file: TokenFile
    eu1: str
    query: str
    checknow: str


def make_tokens(directory: Path) -> Tokens:
    file = TokenFile(directory / "tokens.yaml")
    eu1, _ = file.create("eu-1", Scope.AGENT, "eu")
    query, _ = file.create("grafana", Scope.QUERY, None)
    checknow, _ = file.create("oncall", Scope.CHECKNOW, None)
    return Tokens(file, eu1, query, checknow)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[Running, Tokens]]:
    """A coordinator whose tokens file has an agent token (eu-1 in eu), a query token
    (grafana) and a checknow token (oncall)."""
    tokens = make_tokens(tmp_path)
    config = write_config(
        tmp_path,
        tokens=None,
        extra="tokens_file: tokens.yaml\non_demand: {allow: [127.0.0.0/8]}\n"
        "limits: {max_streams_per_token: 2}\n"
        "engine: {min_agents: 1, min_regions: 1, fail_after: 1, recover_after: 1,"
        " adaptive_confirmation: false}\n",
    )
    async with start(config) as running:
        running.query_token = tokens.query
        yield running, tokens


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def drain(call: Any) -> None:
    """Read a server stream to its end (its error raises)."""
    async with asyncio.timeout(WAIT):
        async for _ in call:
            pass


async def refused(running: Running, endpoint: str, reason: str) -> float | None:
    return await running.metric(
        f'vantage_requests_refused_total{{endpoint="{endpoint}",reason="{reason}"}}'
    )


async def nothing_changed(running: Running) -> None:
    coordinator = running.coordinator
    assert coordinator.fleet.agents() == []
    assert coordinator.transitions.last_id == 0
    for name in ("web", "db"):
        verdict = coordinator.engine.verdict(name)
        assert verdict is not None
        assert verdict.regions == {}


async def test_an_agent_token_admits_its_agent_in_its_region_only(
    secured: tuple[Running, Tokens],
) -> None:
    running, tokens = secured
    for name, region, why in (
        ("eu-2", "eu", "token 'eu-1' is bound to agent eu-1, not eu-2"),
        ("eu-1", "us", "token 'eu-1' is bound to region eu, not us"),
    ):
        claim = running.agent(name, region, token=tokens.eu1)
        await claim.hello()
        assert await claim.status() == grpc.StatusCode.PERMISSION_DENIED
        assert await claim.call.details() == why
        assert refusal_reason(await claim.call.trailing_metadata()) == "permission_denied"
    await nothing_changed(running)
    assert await refused(running, "agent", "permission_denied") == 2
    assert await running.metric("vantage_agent_auth_failures_total") == 2
    agent = running.agent("eu-1", "eu", token=tokens.eu1)
    await agent.handshake()
    assert [a.name for a in running.coordinator.fleet.agents()] == ["eu-1"]
    agent.close()


@pytest.mark.parametrize(
    ("authorization", "why"),
    [
        (None, "missing bearer token (authorization: Bearer TOKEN)"),
        ("Bearer vt1_not-a-token-anybody-was-given", "unknown or revoked token"),
        ("Basic ZXUtMTpzZWNyZXQ=", "malformed authorization: expected 'Bearer TOKEN'"),
        ("Bearer two words", "malformed authorization: expected 'Bearer TOKEN'"),
        ("Bearer " + "x" * 600, "malformed authorization: expected 'Bearer TOKEN'"),
    ],
)
async def test_unknown_and_malformed_tokens_are_unauthenticated(
    secured: tuple[Running, Tokens], authorization: str | None, why: str
) -> None:
    running, _ = secured
    agent = FakeAgent(running.channel, "eu-1", "eu", token=None, authorization=authorization)
    await agent.hello()
    assert await agent.status() == grpc.StatusCode.UNAUTHENTICATED
    assert await agent.call.details() == why
    await nothing_changed(running)
    assert await refused(running, "agent", "unauthenticated") == 1


async def test_a_query_token_cannot_connect_an_agent(secured: tuple[Running, Tokens]) -> None:
    running, tokens = secured
    agent = running.agent("grafana", "eu", token=tokens.query)
    await agent.hello()
    assert await agent.status() == grpc.StatusCode.PERMISSION_DENIED
    assert "is a query token, not an agent token" in await agent.call.details()
    await nothing_changed(running)


async def test_queries_take_query_tokens_and_checknow_takes_checknow(
    secured: tuple[Running, Tokens],
) -> None:
    running, tokens = secured
    queries = running.queries
    request = query_pb2.ListVerdictsRequest()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await queries.ListVerdicts(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refusal_reason(caught.value.trailing_metadata()) == "unauthenticated"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await queries.ListVerdicts(request, metadata=bearer(tokens.eu1))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "token 'eu-1' is an agent token: it cannot call ListVerdicts"
    answer = await queries.ListVerdicts(request, metadata=bearer(tokens.query))
    assert sorted(v.check for v in answer.verdicts) == ["db", "web"]
    check = query_pb2.CheckNowRequest(target="http://127.0.0.2:1/", timeout_ms=200)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await queries.CheckNow(check, metadata=bearer(tokens.query))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "token 'grafana' has scope query; CheckNow needs checknow"
    done = await queries.CheckNow(check, metadata=bearer(tokens.checknow))
    assert done.verdict.reason == "no agent is connected"
    assert await refused(running, "query", "unauthenticated") == 1
    assert await refused(running, "query", "permission_denied") == 2
    # Health and reflection stay open: load balancers and grpcurl need no token.
    health = health_pb2_grpc.HealthStub(running.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_http_takes_the_same_tokens(secured: tuple[Running, Tokens]) -> None:
    running, tokens = secured
    url = running.http_url
    async with aiohttp.ClientSession() as session:
        for path in ("/api/v1/verdicts", "/metrics", "/api/v1/nowhere"):
            async with session.get(url + path) as response:
                assert response.status == 401, path
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="vantage"'
                body = await response.json()
                assert body["error"]["code"] == "unauthenticated"
        for path in ("/healthz", "/api/v1/openapi.yaml"):
            async with session.get(url + path) as response:
                assert response.status == 200, path
        query = {"Authorization": f"Bearer {tokens.query}"}
        async with session.get(url + "/api/v1/verdicts", headers=query) as response:
            assert response.status == 200
        async with session.post(
            url + "/api/v1/checknow", json={"target": "http://127.0.0.2:1/"}, headers=query
        ) as response:
            assert response.status == 403
            assert "insufficient_scope" in response.headers["WWW-Authenticate"]
            assert (await response.json())["error"]["message"] == (
                "token 'grafana' has scope query; POST /api/v1/checknow needs checknow"
            )
        agent = {"Authorization": f"Bearer {tokens.eu1}"}
        async with session.get(url + "/metrics", headers=agent) as response:
            assert response.status == 403
    assert await refused(running, "http", "unauthenticated") == 3
    assert await refused(running, "http", "permission_denied") == 2


def test_without_query_tokens_only_loopback_clients_may_query() -> None:
    auth = Authenticator(TokenRegistry())
    assert auth.queries_open
    caller = auth.query(None, (), "127.0.0.1", Scope.QUERY, "ListVerdicts")
    assert caller.key == "client:127.0.0.1"
    assert auth.query(None, (), "::1", Scope.CHECKNOW, "CheckNow").via == "open"
    with pytest.raises(AuthError) as caught:
        auth.query(None, (), "192.0.2.7", Scope.QUERY, "ListVerdicts")
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "answers loopback clients only" in caught.value.message
    anyone = Authenticator(TokenRegistry(), query_auth=QueryAuth.NONE)
    assert anyone.query(None, (), "192.0.2.7", Scope.CHECKNOW, "CheckNow").via == "open"


async def test_revoking_a_token_ends_its_live_streams(secured: tuple[Running, Tokens]) -> None:
    running, tokens = secured
    agent = running.agent("eu-1", "eu", token=tokens.eu1)
    await agent.handshake()
    watch = running.queries.WatchVerdicts(
        query_pb2.WatchVerdictsRequest(), metadata=bearer(tokens.checknow)
    )
    await eventually(lambda: running.coordinator.authenticator.streams_of("token:oncall"), "watch")
    tokens.file.revoke("eu-1")
    tokens.file.revoke("oncall")
    # The coordinator notices the file within its poll; nothing else is done here.
    assert await agent.status() == grpc.StatusCode.UNAUTHENTICATED
    assert await agent.call.details() == "token 'eu-1' was revoked or changed"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain(watch)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "token 'oncall' was revoked or changed"
    [eu1] = running.coordinator.fleet.agents()
    assert not eu1.connected
    # The revoked token connects nothing any more; the others still work.
    again = running.agent("eu-1", "eu", token=tokens.eu1)
    await again.hello()
    assert await again.status() == grpc.StatusCode.UNAUTHENTICATED
    await running.queries.ListAgents(query_pb2.ListAgentsRequest(), metadata=bearer(tokens.query))


async def test_revoking_a_token_ends_its_event_streams(secured: tuple[Running, Tokens]) -> None:
    running, tokens = secured
    headers = {"Authorization": f"Bearer {tokens.query}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{running.http_url}/api/v1/watch", headers=headers) as response,
    ):
        assert response.status == 200
        await eventually(
            lambda: running.coordinator.authenticator.streams_of("token:grafana"), "the watch"
        )
        tokens.file.revoke("grafana")
        async with asyncio.timeout(WAIT):
            text = (await response.read()).decode()
    assert text.endswith(
        'event: error\ndata: {"error": {"code": "unauthenticated", "message": '
        "\"token 'grafana' was revoked or changed\"}}\n\n"
    )


async def test_one_caller_holds_at_most_its_share_of_streams(
    secured: tuple[Running, Tokens],
) -> None:
    running, tokens = secured
    watches = [
        running.queries.WatchVerdicts(
            query_pb2.WatchVerdictsRequest(), metadata=bearer(tokens.query)
        )
        for _ in range(2)
    ]
    await eventually(
        lambda: running.coordinator.authenticator.streams_of("token:grafana") == 2, "two watches"
    )
    third = running.queries.WatchVerdicts(
        query_pb2.WatchVerdictsRequest(), metadata=bearer(tokens.query)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain(third)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limits.max_streams_per_token" in str(caught.value.details())
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{running.http_url}/api/v1/watch",
            headers={"Authorization": f"Bearer {tokens.query}"},
        ) as response,
    ):
        assert response.status == 429
    # Another caller is not held back by this one.
    other = running.queries.WatchVerdicts(
        query_pb2.WatchVerdictsRequest(), metadata=bearer(tokens.checknow)
    )
    await eventually(
        lambda: running.coordinator.authenticator.streams_of("token:oncall") == 1, "its watch"
    )
    for call in (*watches, other):
        call.cancel()
    assert await refused(running, "query", "too_many_streams") == 1


async def test_a_broken_tokens_file_keeps_the_admitted_tokens(
    secured: tuple[Running, Tokens],
) -> None:
    running, tokens = secured
    path = tokens.file.path
    path.write_text(path.read_text() + "  - nonsense\n")
    await eventually(
        lambda: running.metric('vantage_tokens_reloads_total{result="failed"}'), "the refusal"
    )
    agent = running.agent("eu-1", "eu", token=tokens.eu1)
    await agent.handshake()
    agent.close()


async def test_the_first_query_token_ends_open_watches(tmp_path: Path) -> None:
    file = TokenFile(tmp_path / "tokens.yaml")
    file.create("eu-1", Scope.AGENT, "eu")
    config = write_config(tmp_path, tokens=None, extra="tokens_file: tokens.yaml\n")
    async with start(config) as running:
        watch = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest())
        await eventually(
            lambda: running.coordinator.authenticator.streams_of("client:127.0.0.1"), "watch"
        )
        token, _ = file.create("grafana", Scope.QUERY, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await drain(watch)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == "query tokens are required now"
        await running.queries.ListAgents(query_pb2.ListAgentsRequest(), metadata=bearer(token))


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            "listen: 0.0.0.0:0\nhttp_listen: 127.0.0.1:0\n",
            "listen 0.0.0.0:0 is beyond loopback without TLS: set tls.cert_file and "
            "tls.key_file (or `tls: off` to serve plaintext there on purpose)",
        ),
        (
            "listen: 127.0.0.1:0\nhttp_listen: '[::]:0'\ntls: off\n",
            "http_listen [::]:0 is beyond loopback and the tokens file has no query token: "
            "create one (vantage token create --name NAME --scope query), or set "
            "`query_auth: none` to let anyone who reaches the port query",
        ),
    ],
)
async def test_an_exposed_coordinator_needs_tls_and_query_tokens(
    tmp_path: Path, settings: str, problem: str
) -> None:
    from coordinator.config import load_config
    from coordinator.server import Coordinator

    config = tmp_path / "coordinator.yaml"
    config.write_text(settings)
    with pytest.raises(ConfigError) as caught:
        Coordinator(load_config(config))
    assert str(caught.value) == problem


async def test_plaintext_and_open_queries_beyond_loopback_start_when_asked(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text("listen: 0.0.0.0:0\nhttp_listen: 127.0.0.1:0\ntls: off\nquery_auth: none\n")
    async with start(config) as running:
        reply = await running.queries.ListAgents(query_pb2.ListAgentsRequest())
        assert list(reply.agents) == []
