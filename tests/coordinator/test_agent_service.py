"""The agent stream: authentication, Hello, assignments, results, acks, drops and
rechecks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from live_coordinator import EU_TOKEN, FakeAgent, Running, eventually, start, write_config

from vantage.results import FailureClass, ProbeOutcome, ProbeResult
from vantage_proto.v1 import agent_pb2, common_pb2, query_pb2


async def _agents(running: Running) -> list[query_pb2.Agent]:
    response = await running.queries.ListAgents(query_pb2.ListAgentsRequest())
    return list(response.agents)


async def test_wrong_token_is_refused_before_any_state_exists(running: Running) -> None:
    agent = running.agent("intruder-1", token="not-a-listed-token-at-all")
    await agent.hello()
    assert await agent.status() == grpc.StatusCode.UNAUTHENTICATED
    assert await _agents(running) == []
    assert running.coordinator.fleet.agents() == []
    web = running.coordinator.engine.verdict("web")
    assert web is not None
    assert web.regions == {}
    assert await running.metric("vantage_agent_auth_failures_total") == 1
    assert await running.metric("vantage_agent_streams_open") == 0


async def test_missing_token_is_refused(running: Running) -> None:
    agent = running.agent(token=None)
    await agent.hello()
    assert await agent.status() == grpc.StatusCode.UNAUTHENTICATED
    assert await _agents(running) == []


async def test_token_bound_to_another_agent_is_refused(running: Running) -> None:
    agent = running.agent("us-1", "us", token=EU_TOKEN)
    await agent.hello()
    assert await agent.status() == grpc.StatusCode.PERMISSION_DENIED
    assert await _agents(running) == []
    bound = running.agent("eu-1", "eu", token=EU_TOKEN)
    await bound.handshake()
    assert [a.name for a in await _agents(running)] == ["eu-1"]
    bound.close()


async def test_hello_with_a_bad_name_is_invalid_argument(running: Running) -> None:
    agent = running.agent("bad name!", "eu")
    await agent.hello()
    assert await agent.status() == grpc.StatusCode.INVALID_ARGUMENT
    details = await agent.call.details()
    assert "bad name!" in details
    assert "\n" not in details
    assert await _agents(running) == []


async def test_hello_with_a_trailing_newline_in_its_name_is_invalid_argument(
    running: Running,
) -> None:
    agent = running.agent("eu-1\n", "eu")
    await agent.hello()
    assert await agent.status() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _agents(running) == []


async def test_first_message_must_be_hello(running: Running) -> None:
    agent = running.agent()
    await agent.send(heartbeat=agent_pb2.Heartbeat(sent_unix_us=1))
    assert await agent.status() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Hello" in await agent.call.details()


async def test_authenticated_agent_gets_welcome_and_every_check(running: Running) -> None:
    agent = running.agent()
    welcome, assignments = await agent.handshake()
    assert welcome.heartbeat_interval_ms == 1000
    assert welcome.coordinator_version
    assert welcome.last_seq == 0
    assert assignments.full
    assert sorted(check.name for check in assignments.checks) == ["db", "web"]
    web = next(check for check in assignments.checks if check.name == "web")
    assert web.WhichOneof("probe") == "http"
    assert web.interval_ms == 2000
    [listed] = await _agents(running)
    assert (listed.name, listed.region, listed.connected, listed.impaired) == (
        "eu-1",
        "eu",
        True,
        False,
    )
    assert list(listed.capabilities) == ["http", "tcp"]
    agent.close()


async def test_results_move_the_verdict_and_are_acknowledged(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    ack = await agent.send_results([agent.result("web"), agent.result("db", success=False)])
    assert ack == 2
    response = await running.queries.ListVerdicts(query_pb2.ListVerdictsRequest())
    states = {v.check: v.state for v in response.verdicts}
    assert states == {"web": query_pb2.VERDICT_STATE_UP, "db": query_pb2.VERDICT_STATE_GLOBAL}
    db = next(v for v in response.verdicts if v.check == "db")
    assert db.failure == common_pb2.FAILURE_CLASS_CONNECT_REFUSED
    assert list(db.regions_down) == ["eu"]
    assert list(db.regions["eu"].failing_agents) == ["eu-1"]
    assert await running.metric('vantage_results_received_total{region="eu"}') == 2
    [listed] = await _agents(running)
    assert listed.results_received == 2
    agent.close()


async def test_a_mixed_batch_counts_only_what_reached_the_engine(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    assert await agent.send_results([agent.result("web", seq=3)]) == 3
    batch = [
        agent.result("web", seq=4),
        agent.result("nope", seq=5),
        agent.result("web", seq=2),  # a replay
        agent.result("db", seq=6, success=False),
    ]
    assert await agent.send_results(batch) == 6
    assert await running.metric('vantage_results_received_total{region="eu"}') == 3
    assert await running.metric('vantage_results_dropped_total{reason="unassigned"}') == 1
    assert await running.metric('vantage_results_dropped_total{reason="duplicate"}') == 1
    [listed] = await _agents(running)
    assert listed.results_received == 3
    agent.close()


async def test_result_for_an_unassigned_check_is_dropped_and_counted(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    assert await agent.send_results([agent.result("not-assigned")]) == 1
    dropped = 'vantage_results_dropped_total{reason="unassigned"}'
    assert await running.metric(dropped) == 1
    response = await running.queries.ListVerdicts(query_pb2.ListVerdictsRequest())
    assert "not-assigned" not in [v.check for v in response.verdicts]
    agent.close()


async def test_duplicate_sequence_numbers_are_dropped(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    assert await agent.send_results([agent.result("web", seq=5)]) == 5
    assert await agent.send_results([agent.result("web", seq=5), agent.result("web", seq=4)]) == 5
    assert await running.metric('vantage_results_dropped_total{reason="duplicate"}') == 2
    assert await running.metric('vantage_results_received_total{region="eu"}') == 1
    agent.close()


async def test_inconsistent_result_is_dropped_as_invalid_and_still_acknowledged(
    running: Running,
) -> None:
    agent = running.agent()
    await agent.handshake()
    bad = agent.result("web")
    bad.failure = common_pb2.FAILURE_CLASS_TIMEOUT  # success=True with a failure class
    assert await agent.send_results([bad]) == 1
    assert await running.metric('vantage_results_dropped_total{reason="invalid"}') == 1
    assert running.coordinator.engine.verdict("web").regions == {}  # type: ignore[union-attr]
    agent.close()


async def test_reconnect_of_the_same_instance_resumes_its_sequence(running: Running) -> None:
    first = running.agent()
    await first.handshake()
    await first.send_results([first.result("web", seq=7)])
    first.close()
    await eventually(lambda: running.coordinator.fleet.connected_count() == 0, "the disconnect")
    again = running.agent()
    welcome, _ = await again.handshake()
    assert welcome.last_seq == 7
    restarted = running.agent("eu-2", instance_id="instance-b")
    welcome, _ = await restarted.handshake()
    assert welcome.last_seq == 0
    again.close()
    restarted.close()


async def test_heartbeat_is_answered(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    await agent.send(heartbeat=agent_pb2.Heartbeat(sent_unix_us=1))
    reply = await agent.read()
    assert reply.WhichOneof("kind") == "heartbeat"
    assert reply.heartbeat.sent_unix_us > 0
    agent.close()


async def test_second_stream_with_the_same_name_replaces_the_first(running: Running) -> None:
    old = running.agent(instance_id="old")
    await old.handshake()
    new = running.agent(instance_id="new")
    await new.handshake()
    assert await old.status() == grpc.StatusCode.ABORTED
    assert "replaced" in await old.call.details()
    [listed] = await _agents(running)
    assert listed.connected
    # The replacement is live: its results count, in the engine too.
    assert await new.send_results([new.result("web")]) == 1
    web = running.coordinator.engine.verdict("web")
    assert web is not None
    assert web.regions["eu"].up == 1
    new.close()


async def test_disconnect_leaves_the_engine_and_the_fleet(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    await agent.send_results([agent.result("web")])
    assert await running.metric('vantage_agents_connected{region="eu"}') == 1
    agent.close()

    async def gone() -> bool:
        return await running.metric('vantage_agents_connected{region="eu"}') == 0

    await eventually(gone, "the agent to be counted as gone")
    [listed] = await _agents(running)
    assert not listed.connected
    web = running.coordinator.engine.verdict("web")
    assert web is not None
    assert web.state.value == "unknown"
    assert await running.metric("vantage_agent_streams_open") == 0


async def test_agent_closing_its_side_gets_what_was_queued_then_a_clean_end(
    running: Running,
) -> None:
    agent = running.agent()
    await agent.hello()
    await agent.send(results=agent_pb2.ResultBatch(results=[agent.result("web")]))
    await agent.call.done_writing()
    kinds = []
    while (message := await agent.call.read()) is not grpc.aio.EOF:
        kinds.append(message.WhichOneof("kind"))
    assert kinds == ["welcome", "assignments", "ack"]
    assert await agent.call.code() == grpc.StatusCode.OK


# Second opinions: the engine's requests go out as Recheck messages


@pytest.fixture
async def default_engine(tmp_path: Path) -> AsyncIterator[Running]:
    """A coordinator with the engine's default settings (second opinions on)."""
    async with start(write_config(tmp_path, extra=""), reload_on_sighup=False) as coordinator:
        yield coordinator


async def _fleet_seeing_web_up(running: Running) -> list[FakeAgent]:
    agents = [running.agent(name, name[:2]) for name in ("eu-1", "us-1", "ap-1")]
    for agent in agents:
        await agent.handshake()
        await agent.send_results([agent.result("web")])
    return agents


async def _recheck(agent: FakeAgent) -> list[str]:
    message = await agent.read()
    assert message.WhichOneof("kind") == "recheck", message
    return list(message.recheck.checks)


async def test_a_wavering_view_asks_every_agent_with_a_view_to_recheck(
    default_engine: Running,
) -> None:
    running = default_engine
    agents = await _fleet_seeing_web_up(running)
    assert await running.metric("vantage_rechecks_requested_total") == 0
    eu = agents[0]

    # One failure where the others see web up: its view wavers, so everyone looks again,
    # the agent that failed included. The batch is acknowledged first.
    assert await eu.send_results([eu.result("web", success=False)]) == 2
    for agent in agents:
        assert await _recheck(agent) == ["web"], agent.name

    assert await running.metric("vantage_rechecks_requested_total") == 3
    web = running.coordinator.engine.verdict("web")
    assert web is not None
    assert web.state.value == "up"  # one failure and a round out moves nothing yet
    for agent in agents:
        agent.close()


async def test_requests_left_by_any_engine_call_go_out_with_the_next_tick(
    default_engine: Running,
) -> None:
    running = default_engine
    agents = await _fleet_seeing_web_up(running)

    # A wavering result folded in by someone who does not send what the engine asks
    # (as tick() might ask): the coordinator's ticker sends it within a second.
    failed = ProbeOutcome.failed(FailureClass.CONNECT_REFUSED, "connection refused")
    result = ProbeResult("web", 1, seq=99, started_at=time.time(), duration=0.001, outcome=failed)
    running.coordinator.engine.observe("us-1", result)
    for agent in agents:
        assert await _recheck(agent) == ["web"], agent.name

    assert await running.metric("vantage_rechecks_requested_total") == 3
    for agent in agents:
        agent.close()


async def test_agents_gone_are_not_asked(default_engine: Running) -> None:
    running = default_engine
    eu, us, ap = await _fleet_seeing_web_up(running)
    ap.close()
    await eventually(lambda: running.coordinator.fleet.connected_count() == 2, "ap to leave")

    await eu.send_results([eu.result("web", success=False)])
    assert await _recheck(eu) == ["web"]
    assert await _recheck(us) == ["web"]
    assert await running.metric("vantage_rechecks_requested_total") == 2
    eu.close()
    us.close()
