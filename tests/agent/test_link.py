"""The coordinator link against a real gRPC AgentService served in the test."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import pytest
import structlog

import vantage
from agent.buffer import ResultBuffer
from agent.link import CoordinatorLink, FatalError
from agent.scheduler import Assignment
from vantage.checks import parse_check
from vantage.results import ProbeOutcome, ProbeResult, TcpDetails
from vantage.wire import check_to_pb
from vantage_proto.v1 import agent_pb2, common_pb2


class Applied:
    """Records what the link hands to the scheduler."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, list[Assignment], list[str]]] = []

    def __call__(self, full: bool, checks: Sequence[Assignment], removed: Sequence[str]) -> None:
        self.calls.append((full, list(checks), list(removed)))


class RanNow:
    """Records the check names the link hands to the scheduler to probe at once."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, names: Iterable[str]) -> int:
        self.calls.append(list(names))
        return len(self.calls[-1])


def result(seq: int) -> ProbeResult:
    return ProbeResult(
        check="port",
        check_revision=7,
        seq=seq,
        started_at=time.time(),
        duration=0.001,
        outcome=ProbeOutcome(success=True, details=TcpDetails(peer="127.0.0.1:1")),
    )


def make_link(
    port: int,
    store: ResultBuffer | None = None,
    apply: Applied | None = None,
    run_now: RanNow | None = None,
    **tuning: Any,
) -> CoordinatorLink:
    tuning = {
        "token": "s3cret",
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "batch_interval": 0.02,
        "rng": random.Random(1),
        **tuning,
    }
    return CoordinatorLink(
        f"127.0.0.1:{port}",
        name="eu-1",
        region="eu",
        results=store if store is not None else ResultBuffer(100_000),
        apply=apply or Applied(),
        run_now=run_now or RanNow(),
        **tuning,
    )


@contextlib.asynccontextmanager
async def running(link: CoordinatorLink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reconnect_reasons(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "reconnecting to coordinator"]


async def test_hello_assignments_and_results_arrive(coordinator: Any, until: Any) -> None:
    web = parse_check({"name": "web", "type": "http", "target": "http://127.0.0.1/"})
    port = parse_check({"name": "port", "type": "tcp", "target": "127.0.0.1:22"})
    web_pb = check_to_pb(web)
    web_pb.revision = 42  # the coordinator's revision is what results must carry
    fake = await coordinator(checks=[web_pb, check_to_pb(port)])
    store = ResultBuffer(100_000)
    applied = Applied()
    link = make_link(fake.port, store, applied)

    async with running(link):
        for seq in (1, 2, 3):
            store.add(result(seq))
        await until(lambda: len(fake.results) == 3 and link.unacknowledged == 0)

    [hello] = fake.hellos
    assert (hello.name, hello.region, hello.version) == ("eu-1", "eu", vantage.__version__)
    assert list(hello.capabilities) == ["dns", "http", "icmp", "tcp"]
    assert hello.instance_id == link.instance_id
    assert len(hello.instance_id) == 32
    [(full, checks, removed)] = applied.calls
    assert full is True
    assert removed == []
    assert [(a.check, a.revision) for a in checks] == [(web, 42), (port, port.revision)]
    assert [r.seq for r in fake.results] == [1, 2, 3]
    assert fake.results[0].check == "port"
    assert fake.results[0].tcp.peer == "127.0.0.1:1"


async def test_invalid_or_unknown_checks_are_skipped(coordinator: Any, until: Any) -> None:
    good = check_to_pb(parse_check({"name": "ok", "type": "tcp", "target": "127.0.0.1:22"}))
    bad = common_pb2.Check(
        name="bad", revision=1, target="127.0.0.1:22", interval_ms=1000, timeout_ms=5000
    )
    bad.tcp.SetInParent()  # timeout above interval
    unknown = common_pb2.Check(name="dns", revision=1, target="example.org", interval_ms=1000)
    fake = await coordinator(checks=[bad, good, unknown])
    applied = Applied()

    with structlog.testing.capture_logs() as logs:
        link = make_link(fake.port, apply=applied)
        async with running(link) as task:
            await until(lambda: len(applied.calls) == 1)
            assert not task.done()  # the agent carries on

    [(_full, checks, removed)] = applied.calls
    assert [a.check.name for a in checks] == ["ok"]
    assert sorted(removed) == ["bad", "dns"]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 2
    assert "timeout 5s must be below interval 1s" in errors[0]["error"]


async def test_wrong_token_is_fatal(coordinator: Any) -> None:
    fake = await coordinator(token="other")
    link = make_link(fake.port)

    with structlog.testing.capture_logs() as logs, pytest.raises(FatalError) as raised:
        async with asyncio.timeout(5):
            await link.run()

    assert str(raised.value).startswith("coordinator refused the token (UNAUTHENTICATED)")
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["reason"] == str(raised.value)
    assert reconnect_reasons(logs) == []  # no point retrying


async def test_unreachable_coordinator_is_retried_and_logged(free_port: int, until: Any) -> None:
    with structlog.testing.capture_logs() as logs:
        link = make_link(free_port)
        async with running(link):
            await until(lambda: len(reconnect_reasons(logs)) >= 3)

    assert set(reconnect_reasons(logs)) == {"coordinator unreachable: connection refused"}
    delays = [e["delay"] for e in logs if e["event"] == "reconnecting to coordinator"]
    assert all(0 <= delay <= 0.2 for delay in delays)


async def test_reconnects_after_restart_and_resends_unacked_in_order(
    coordinator: Any, until: Any
) -> None:
    first = await coordinator(ack=False)  # ingests nothing it acknowledges
    store = ResultBuffer(100_000)

    with structlog.testing.capture_logs() as logs:
        link = make_link(first.port, store)
        async with running(link):
            for seq in (1, 2, 3):
                store.add(result(seq))
            await until(lambda: len(first.results) == 3)
            await first.stop()
            # Results made while the coordinator is away are kept too.
            for seq in (4, 5):
                store.add(result(seq))
            await until(lambda: len(reconnect_reasons(logs)) >= 1)

            # The restarted coordinator had ingested up to 2 before going away.
            second = await coordinator(port=first.port, last_seq=2)
            await until(lambda: len(second.results) == 3 and link.unacknowledged == 0)

    assert [r.seq for r in second.results] == [3, 4, 5]
    assert second.hellos[0].instance_id == first.hellos[0].instance_id
    assert reconnect_reasons(logs)[0].startswith(
        ("connection to coordinator lost", "stream failed", "stream closed by coordinator")
    )


async def test_silent_coordinator_is_left(coordinator: Any, until: Any) -> None:
    fake = await coordinator(ack=False, heartbeat_ms=50)
    store = ResultBuffer(100_000)

    with structlog.testing.capture_logs() as logs:
        link = make_link(fake.port, store, reply_timeout=0.2)
        async with running(link):
            store.add(result(1))
            await until(lambda: len(fake.results) >= 2)

    assert reconnect_reasons(logs)[0] == "coordinator went silent: no reply for 200ms"
    assert [r.seq for r in fake.results[:2]] == [1, 1]  # sent again on the new stream


async def test_idle_link_sends_heartbeats(coordinator: Any, until: Any) -> None:
    fake = await coordinator(heartbeat_ms=50)

    with structlog.testing.capture_logs() as logs:
        link = make_link(fake.port, reply_timeout=0.2)
        async with running(link):
            await until(lambda: fake.heartbeats >= 8)

    assert fake.batches == []
    assert len(fake.hellos) == 1  # answered heartbeats keep the stream
    assert reconnect_reasons(logs) == []


async def test_idle_coordinator_that_stops_answering_is_left(coordinator: Any, until: Any) -> None:
    fake = await coordinator(heartbeat_ms=50, ack=False)  # answers nothing

    with structlog.testing.capture_logs() as logs:
        link = make_link(fake.port, reply_timeout=0.2)
        async with running(link):
            await until(lambda: len(reconnect_reasons(logs)) >= 1)

    assert reconnect_reasons(logs)[0] == "coordinator went silent: no reply for 200ms"


async def test_results_travel_in_bounded_batches(coordinator: Any, until: Any) -> None:
    fake = await coordinator()
    store = ResultBuffer(100_000)
    link = make_link(fake.port, store, batch_size=500)

    async with running(link):
        await until(lambda: len(fake.hellos) == 1)
        for seq in range(1, 1201):
            store.add(result(seq))
        await until(lambda: len(fake.results) == 1200)

    assert [r.seq for r in fake.results] == list(range(1, 1201))
    assert max(len(batch) for batch in fake.batches) == 500
    assert len(fake.batches) >= 3


async def test_later_messages_are_handled(coordinator: Any, until: Any) -> None:
    fake = await coordinator()
    applied = Applied()
    link = make_link(fake.port, apply=applied)
    port = parse_check({"name": "port", "type": "tcp", "target": "127.0.0.1:22"})

    async with running(link) as task:
        await until(lambda: len(applied.calls) == 1)
        change = agent_pb2.Assignments(full=False, checks=[check_to_pb(port)], removed=["old"])
        fake.outgoing.put_nowait(agent_pb2.CoordinatorMessage(assignments=change))
        fake.outgoing.put_nowait(agent_pb2.CoordinatorMessage(heartbeat=agent_pb2.Heartbeat()))
        request = agent_pb2.ProbeRequest(request_id="r1", check=check_to_pb(port))
        fake.outgoing.put_nowait(agent_pb2.CoordinatorMessage(probe_request=request))
        await until(lambda: len(applied.calls) == 2)
        await asyncio.sleep(0.05)
        assert not task.done()

    full, checks, removed = applied.calls[1]
    assert full is False
    assert [a.check for a in checks] == [port]
    assert removed == ["old"]


async def test_endpoint_that_never_answers_is_left(serve: Any, until: Any) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts the connection, never speaks HTTP/2

    port = await serve(mute)
    with structlog.testing.capture_logs() as logs:
        link = make_link(port, hello_timeout=0.2)
        async with running(link):
            await until(lambda: len(reconnect_reasons(logs)) >= 1)

    assert reconnect_reasons(logs)[0] == "coordinator did not answer the hello within 200ms"


async def test_recheck_reaches_the_scheduler(coordinator: Any, until: Any) -> None:
    checks = [
        check_to_pb(parse_check({"name": name, "type": "tcp", "target": "127.0.0.1:22"}))
        for name in ("port", "db", "old")
    ]
    fake = await coordinator(checks=checks)
    applied, ran = Applied(), RanNow()
    link = make_link(fake.port, apply=applied, run_now=ran)

    def recheck(*names: str) -> None:
        message = agent_pb2.CoordinatorMessage(recheck=agent_pb2.Recheck(checks=names))
        fake.outgoing.put_nowait(message)

    with structlog.testing.capture_logs() as logs:
        async with running(link) as task:
            await until(lambda: len(applied.calls) == 1)
            recheck("port", "db")
            await until(lambda: len(ran.calls) == 1)
            # Names not assigned (any more) are left out; a removal counts.
            change = agent_pb2.Assignments(full=False, removed=["old"])
            fake.outgoing.put_nowait(agent_pb2.CoordinatorMessage(assignments=change))
            recheck("old", "db")
            await until(lambda: len(ran.calls) == 2)
            assert not task.done()

    assert ran.calls == [["port", "db"], ["db"]]
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []


async def test_recheck_naming_more_than_is_assigned_is_refused(
    coordinator: Any, until: Any
) -> None:
    port = check_to_pb(parse_check({"name": "port", "type": "tcp", "target": "127.0.0.1:22"}))
    fake = await coordinator(checks=[port])
    applied, ran = Applied(), RanNow()
    link = make_link(fake.port, apply=applied, run_now=ran)

    with structlog.testing.capture_logs() as logs:
        async with running(link) as task:
            await until(lambda: len(applied.calls) == 1)
            flood = agent_pb2.Recheck(checks=["port"] * 100_000)
            fake.outgoing.put_nowait(agent_pb2.CoordinatorMessage(recheck=flood))
            sane = agent_pb2.Recheck(checks=["port"])
            fake.outgoing.put_nowait(agent_pb2.CoordinatorMessage(recheck=sane))
            await until(lambda: len(ran.calls) == 1)
            assert not task.done()  # the agent carries on

    assert ran.calls == [["port"]]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "recheck refused: it names more checks than are assigned"
    assert (warning["names"], warning["assigned"]) == (100_000, 1)
