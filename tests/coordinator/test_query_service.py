"""The query service: verdicts, the fleet, and the transition stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from live_coordinator import WAIT, Running, eventually

from vantage_proto.v1 import query_pb2


async def test_get_verdict_of_an_unknown_check_is_not_found(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.queries.GetVerdict(query_pb2.GetVerdictRequest(check="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no check named 'nope'"


async def test_a_new_check_is_unknown_until_agents_report(running: Running) -> None:
    verdict = await running.queries.GetVerdict(query_pb2.GetVerdictRequest(check="web"))
    assert verdict.check == "web"
    assert verdict.state == query_pb2.VERDICT_STATE_UNKNOWN
    assert verdict.reason
    assert verdict.since.seconds > 0


async def test_verdicts_carry_the_check_labels(running: Running) -> None:
    running.checks_file.write_text(
        "checks:\n  - {name: web, type: http, target: 'http://127.0.0.1:1/', labels: {team: a}}\n"
    )
    assert running.coordinator.reload_checks()
    verdict = await running.queries.GetVerdict(query_pb2.GetVerdictRequest(check="web"))
    assert dict(verdict.labels) == {"team": "a"}


async def test_watch_receives_transitions_from_now_on(running: Running) -> None:
    watch = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest())
    await _watching(running)
    agent = running.agent()
    await agent.handshake()
    await agent.send_results([agent.result("web"), agent.result("db", success=False)])
    async with asyncio.timeout(WAIT):
        first = await watch.read()
        second = await watch.read()
    by_check = {first.check: first, second.check: second}
    assert by_check["web"].verdict.state == query_pb2.VERDICT_STATE_UP
    assert by_check["web"].previous == query_pb2.VERDICT_STATE_UNKNOWN
    assert by_check["db"].verdict.state == query_pb2.VERDICT_STATE_GLOBAL
    assert second.id == first.id + 1
    assert first.at.seconds > 0
    watch.cancel()
    agent.close()


async def _watching(running: Running) -> None:
    async def subscribed() -> bool:
        return await running.metric("vantage_watch_streams_open") == 1

    await eventually(subscribed, "the watcher to be subscribed")
