"""The query service: verdicts and their filters, history, the fleet, and the transition
stream with its resumption."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from live_coordinator import ENGINE, WAIT, FakeAgent, Running, eventually, start, write_config

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


async def _abort(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def _watch_abort(watch: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(WAIT):
            await watch.read()
    return caught.value


def _labelled_checks(running: Running) -> None:
    running.checks_file.write_text(
        "checks:\n"
        "  - {name: web, type: http, target: 'http://127.0.0.1:1/', labels: {team: a}}\n"
        "  - {name: db, type: tcp, target: '127.0.0.1:2', labels: {team: b, tier: '1'}}\n"
    )
    assert running.coordinator.reload_checks()


async def _web_up_db_down(running: Running) -> FakeAgent:
    agent = running.agent()
    await agent.handshake()
    await agent.send_results([agent.result("web"), agent.result("db", success=False)])
    return agent


async def test_list_verdicts_filters_by_state_and_labels(running: Running) -> None:
    _labelled_checks(running)
    agent = await _web_up_db_down(running)

    async def checks(**filters: Any) -> list[str]:
        answer = await running.queries.ListVerdicts(query_pb2.ListVerdictsRequest(**filters))
        return [verdict.check for verdict in answer.verdicts]

    assert await checks() == ["db", "web"]
    assert await checks(states=[query_pb2.VERDICT_STATE_GLOBAL]) == ["db"]
    assert await checks(states=[query_pb2.VERDICT_STATE_UP, query_pb2.VERDICT_STATE_GLOBAL]) == [
        "db",
        "web",
    ]
    assert await checks(labels={"team": "a"}) == ["web"]
    assert await checks(labels={"team": "b", "tier": "1"}) == ["db"]
    assert await checks(labels={"team": "b", "tier": "2"}) == []
    assert await checks(labels={"team": "a"}, states=[query_pb2.VERDICT_STATE_GLOBAL]) == []
    agent.close()


@pytest.mark.parametrize(
    ("request_", "details"),
    [
        (
            query_pb2.ListVerdictsRequest(states=[99]),
            "states: 99 is not a verdict state (1 up, 2 degraded, 3 local, 4 regional, "
            "5 global, 6 unknown)",
        ),
        (query_pb2.ListVerdictsRequest(states=[0]), "states: 0 is not a verdict state"),
        (query_pb2.ListVerdictsRequest(labels={"": "x"}), "labels: an empty label name"),
    ],
    ids=["unknown-state", "unspecified-state", "empty-label"],
)
async def test_list_verdicts_refuses_bad_filters(
    running: Running, request_: query_pb2.ListVerdictsRequest, details: str
) -> None:
    error = await _abort(running.queries.ListVerdicts(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(details)


async def test_get_verdict_needs_a_check_name(running: Running) -> None:
    error = await _abort(running.queries.GetVerdict(query_pb2.GetVerdictRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "check: a check name is needed"


async def test_history_is_the_transitions_of_a_check_with_evidence(running: Running) -> None:
    agent = await _web_up_db_down(running)
    await agent.send_results([agent.result("web", success=False)])
    history = await running.queries.GetHistory(query_pb2.GetHistoryRequest(check="web"))
    assert [(t.previous, t.verdict.state) for t in history.transitions] == [
        (query_pb2.VERDICT_STATE_UNKNOWN, query_pb2.VERDICT_STATE_UP),
        (query_pb2.VERDICT_STATE_UP, query_pb2.VERDICT_STATE_GLOBAL),
    ]
    assert not history.truncated
    first, second = history.transitions
    assert second.id > first.id
    assert list(second.verdict.regions_down) == ["eu"]
    assert list(second.verdict.regions["eu"].failing_agents) == ["eu-1"]

    newest = await running.queries.GetHistory(query_pb2.GetHistoryRequest(check="web", limit=1))
    assert [t.id for t in newest.transitions] == [second.id]
    assert newest.truncated
    ranged = await running.queries.GetHistory(
        query_pb2.GetHistoryRequest(check="web", since=second.at, until=second.at)
    )
    assert [t.id for t in ranged.transitions] == [second.id]
    agent.close()


async def test_history_outlives_the_check_it_is_of(running: Running) -> None:
    agent = await _web_up_db_down(running)
    running.checks_file.write_text(
        "checks:\n  - {name: web, type: http, target: 'http://127.0.0.1:1/'}\n"
    )
    assert running.coordinator.reload_checks()
    error = await _abort(running.queries.GetVerdict(query_pb2.GetVerdictRequest(check="db")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    history = await running.queries.GetHistory(query_pb2.GetHistoryRequest(check="db"))
    assert [t.verdict.state for t in history.transitions] == [query_pb2.VERDICT_STATE_GLOBAL]
    agent.close()


def _stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("request_", "code", "details"),
    [
        (
            query_pb2.GetHistoryRequest(check="web", since=_stamp(2000), until=_stamp(1000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "since 1970-01-01T00:33:20Z is after until 1970-01-01T00:16:40Z",
        ),
        (
            query_pb2.GetHistoryRequest(check="web", since=_stamp(1, nanos=-5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "since: nanos -5 is outside 0..999999999",
        ),
        (
            query_pb2.GetHistoryRequest(check="web", until=_stamp(10**12)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "until: seconds 1000000000000 is outside years 0001..9999",
        ),
        (
            query_pb2.GetHistoryRequest(check="web", limit=10_001),
            grpc.StatusCode.INVALID_ARGUMENT,
            "limit: 10001 is above the most, 10000",
        ),
        (
            query_pb2.GetHistoryRequest(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "check: a check name is needed",
        ),
        (
            query_pb2.GetHistoryRequest(check="nope"),
            grpc.StatusCode.NOT_FOUND,
            "no check named 'nope', and none on record",
        ),
    ],
    ids=["since-after-until", "bad-nanos", "year-10000", "limit", "no-check", "unknown-check"],
)
async def test_history_refuses_bad_requests(
    running: Running, request_: query_pb2.GetHistoryRequest, code: grpc.StatusCode, details: str
) -> None:
    error = await _abort(running.queries.GetHistory(request_))
    assert (error.code(), error.details()) == (code, details)


async def test_an_unknown_check_with_no_transitions_yet_has_an_empty_history(
    running: Running,
) -> None:
    history = await running.queries.GetHistory(query_pb2.GetHistoryRequest(check="web"))
    assert list(history.transitions) == []
    assert not history.truncated


async def test_a_resumed_watch_replays_then_goes_live_without_gap_or_duplicate(
    running: Running,
) -> None:
    # More transitions than one page of the replay, and more arriving while it runs.
    names = [f"c{index:03d}" for index in range(300)]
    running.checks_file.write_text(
        "checks:\n"
        + "".join(f"  - {{name: {name}, type: tcp, target: '127.0.0.1:2'}}\n" for name in names)
    )
    assert running.coordinator.reload_checks()
    agent = running.agent()
    await agent.handshake()
    await agent.send_results([agent.result(name) for name in names])
    assert running.coordinator.transitions.last_id == 300

    watch = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest(after_id=0))
    await agent.send_results([agent.result(name, success=False) for name in names[:50]])
    received = []
    async with asyncio.timeout(WAIT):
        while len(received) < 350:
            received.append(await watch.read())
    assert [t.id for t in received] == list(range(1, 351))
    assert [t.verdict.state for t in received[300:]] == [query_pb2.VERDICT_STATE_GLOBAL] * 50
    watch.cancel()

    resumed = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest(after_id=340))
    async with asyncio.timeout(WAIT):
        assert [(await resumed.read()).id for _ in range(10)] == list(range(341, 351))
    resumed.cancel()
    agent.close()


async def test_a_watch_can_follow_some_checks_only(running: Running) -> None:
    agent = await _web_up_db_down(running)
    watch = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest(after_id=0, checks=["db"]))
    async with asyncio.timeout(WAIT):
        replayed = await watch.read()
        assert (replayed.check, replayed.verdict.state) == ("db", query_pb2.VERDICT_STATE_GLOBAL)
        await agent.send_results([agent.result("web", success=False), agent.result("db")])
        live = await watch.read()
    assert (live.check, live.verdict.state) == ("db", query_pb2.VERDICT_STATE_UP)
    assert live.id == replayed.id + 2  # web global came between, unseen
    watch.cancel()
    agent.close()


async def test_a_watch_cannot_resume_past_the_last_id(running: Running) -> None:
    agent = await _web_up_db_down(running)
    watch = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest(after_id=3))
    error = await _watch_abort(watch)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error.details() == "after_id 3 is past the last transition id, 2"
    empty = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest(checks=[""]))
    error = await _watch_abort(empty)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    agent.close()


async def test_a_watch_cannot_resume_where_retention_pruned(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra=ENGINE + "history_retention: 1s\n")
    async with start(config) as running:
        agent = await _web_up_db_down(running)
        agent.close()
        store = running.coordinator.transitions.store
        await eventually(lambda: store.oldest_id() is None, "retention to prune everything")
        error = await _watch_abort(
            running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest(after_id=0))
        )
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE
        assert error.details() == (
            "transitions after id 0 are no longer kept (the oldest kept is none): "
            "list the verdicts, then watch again"
        )
        last = running.coordinator.transitions.last_id
        live = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest(after_id=last))
        await _watching(running)
        live.cancel()
