"""The whole agent: assignments in, real probes run, results out."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from agent.agent import Agent, AgentSettings
from agent.link import FatalError
from vantage.checks import parse_check
from vantage.wire import check_to_pb
from vantage_proto.v1 import agent_pb2


def settings(port: int, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "coordinator": f"127.0.0.1:{port}",
        "name": "eu-1",
        "region": "eu",
        "token": "s3cret",
        "batch_interval": 0.02,
        "backoff_initial": 0.05,
        **overrides,
    }
    return AgentSettings(**values)


async def test_runs_assigned_checks_and_delivers_results(
    coordinator: Any, serve: Any, until: Any
) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    target_port = await serve(hold)
    up = parse_check({"name": "up", "type": "tcp", "target": f"127.0.0.1:{target_port}",
                      "interval": "1s", "timeout": "500ms"})  # fmt: skip
    fake = await coordinator(checks=[check_to_pb(up)])
    agent = Agent(settings(fake.port))

    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: len(fake.results) >= 1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    [hello] = fake.hellos
    assert list(hello.capabilities) == ["dns", "http", "icmp", "tcp"]
    first = fake.results[0]
    assert (first.check, first.seq, first.success) == ("up", 1, True)
    assert first.check_revision == up.revision
    assert first.tcp.peer == f"127.0.0.1:{target_port}"
    assert first.phases.connect_us > 0


async def test_recheck_runs_a_check_out_of_schedule(
    coordinator: Any, serve: Any, until: Any
) -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    target_port = await serve(hold)
    # Due once a day, its first run anywhere within that day: only rechecks run it now.
    daily = parse_check({"name": "daily", "type": "tcp", "target": f"127.0.0.1:{target_port}",
                         "interval": "24h", "timeout": "500ms"})  # fmt: skip
    fake = await coordinator(checks=[check_to_pb(daily)])
    agent = Agent(settings(fake.port))
    recheck = agent_pb2.CoordinatorMessage(recheck=agent_pb2.Recheck(checks=["daily"]))

    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: "daily" in agent.scheduler.assignments)
        fake.outgoing.put_nowait(recheck)
        await until(lambda: len(fake.results) >= 1)
        fake.outgoing.put_nowait(recheck)
        await until(lambda: len(fake.results) >= 2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert [(r.check, r.seq, r.success) for r in fake.results[:2]] == [
        ("daily", 1, True),
        ("daily", 2, True),
    ]


async def test_refused_token_stops_the_agent_with_fatal_error(coordinator: Any) -> None:
    fake = await coordinator(token="other")

    with pytest.raises(FatalError, match=r"UNAUTHENTICATED"):
        async with asyncio.timeout(5):
            await Agent(settings(fake.port)).run()


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("coordinator", "localhost", "is not host:port"),
        ("name", "", "agent name"),
        ("region", " eu", "region . eu. is invalid"),
        ("token", "  ", "token is empty"),
        ("batch_size", 0, "batch_size must be positive"),
    ],
)
def test_settings_are_validated_once(field: str, value: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        settings(7400, **{field: value})


def test_settings_do_not_show_the_token() -> None:
    assert "s3cret" not in repr(settings(7400))
