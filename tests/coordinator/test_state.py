"""The coordinator's state across its own restarts and drains (``coordinator.state``), on a
real coordinator with a real store file and scripted agents on real streams."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from live_coordinator import ENGINE, WAIT, eventually, start, write_config

from coordinator.store import TransitionStore
from vantage.configfile import ConfigError
from vantage_proto.v1 import agent_pb2, query_pb2

STORE = "store_file: state/vantage.db\n"


def stored_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "state").mkdir(exist_ok=True)
    return write_config(tmp_path, extra=ENGINE + STORE + extra)


async def verdicts(running: Any) -> dict[str, tuple[int, bool]]:
    listed = await running.queries.ListVerdicts(query_pb2.ListVerdictsRequest())
    return {v.check: (v.state, v.unconfirmed) for v in listed.verdicts}


async def agents(running: Any) -> dict[str, query_pb2.Agent]:
    listed = await running.queries.ListAgents(query_pb2.ListAgentsRequest())
    return {agent.name: agent for agent in listed.agents}


UP, GLOBAL = query_pb2.VERDICT_STATE_UP, query_pb2.VERDICT_STATE_GLOBAL


async def test_a_restart_resumes_the_verdicts_unconfirmed_and_confirms_them_quietly(
    tmp_path: Path,
) -> None:
    config = stored_config(tmp_path)
    async with start(config, drain=True) as running:
        agent = running.agent()
        await agent.handshake()
        assert await agent.send_results([agent.result("web"), agent.result("db", success=False)])
        before = await verdicts(running)
        last_id = running.coordinator.transitions.last_id
    assert before == {"web": (UP, False), "db": (GLOBAL, False)}

    async with start(config) as running:
        # Right after the start: the verdicts of before, flagged; the agent known, away.
        assert await verdicts(running) == {"web": (UP, True), "db": (GLOBAL, True)}
        known = (await agents(running))["eu-1"]
        assert (known.connected, known.results_received) == (False, 2)
        assert running.coordinator.transitions.last_id == last_id  # the drain moved nothing

        agent = running.agent()  # the same instance (its spool) reconnects
        welcome, _ = await agent.handshake()
        assert welcome.last_seq == 2
        # A replay of what was acknowledged before the restart is recognised as such.
        replayed = [agent.result("web", seq=1), agent.result("db", success=False, seq=2)]
        assert await agent.send_results(replayed) == 2
        assert await running.metric('vantage_results_dropped_total{reason="duplicate"}') == 2
        assert await verdicts(running) == {"web": (UP, True), "db": (GLOBAL, True)}
        # Fresh results confirm both: the flags go, and no transition is published.
        fresh = [agent.result("web", seq=3), agent.result("db", success=False, seq=4)]
        assert await agent.send_results(fresh) == 4
        assert await verdicts(running) == {"web": (UP, False), "db": (GLOBAL, False)}
        assert running.coordinator.transitions.last_id == last_id
        assert (await agents(running))["eu-1"].results_received == 4
        agent.close()


async def test_results_older_than_their_window_count_as_failures_not_in_the_verdict(
    tmp_path: Path,
) -> None:
    async with start(stored_config(tmp_path, "per_agent_metrics: true\n")) as running:
        agent = running.agent()
        await agent.handshake()
        assert await agent.send_results([agent.result("web")]) == 1
        # Spooled through an outage: probed an hour before the batch was sent (web's
        # window is 2 intervals + the timeout: 5 s).
        now_us = int(time.time() * 1e6)
        late = agent.result("web", success=False)
        late.started_unix_us = now_us - 3600 * 1_000_000
        await agent.send(results=agent_pb2.ResultBatch(results=[late], sent_unix_us=now_us))
        assert (await agent.read()).ack.seq == 2
        assert await verdicts(running) == {
            "web": (UP, False),
            "db": (query_pb2.VERDICT_STATE_UNKNOWN, False),
        }
        failures = 'vantage_check_failures_total{check="web",class="connect_refused",region="eu"}'
        assert await running.metric(failures) == 1
        known = (await agents(running))["eu-1"]
        assert (known.results_received, known.results_late) == (2, 1)
        assert await running.metric('vantage_agents_results_late_total{region="eu"}') == 1
        agent.close()


async def test_an_agents_own_counters_show_in_the_fleet_and_the_metrics(tmp_path: Path) -> None:
    async with start(stored_config(tmp_path, "per_agent_metrics: true\n")) as running:
        agent = running.agent()
        await agent.handshake()
        counters = agent_pb2.AgentCounters(results_dropped=7, runs_skipped=3)
        await agent.send(heartbeat=agent_pb2.Heartbeat(sent_unix_us=1, counters=counters))
        assert (await agent.read()).WhichOneof("kind") == "heartbeat"
        known = (await agents(running))["eu-1"]
        assert (known.results_dropped, known.runs_skipped) == (7, 3)
        assert await running.metric('vantage_agents_results_dropped_total{region="eu"}') == 7
        assert (
            await running.metric('vantage_agent_runs_skipped_total{agent="eu-1",region="eu"}') == 3
        )
        # A batch carries them too, newer ones replacing the old.
        batch = agent_pb2.ResultBatch(
            results=[agent.result("web")],
            counters=agent_pb2.AgentCounters(results_dropped=9, runs_skipped=3),
        )
        await agent.send(results=batch)
        assert (await agent.read()).WhichOneof("kind") == "ack"
        assert (await agents(running))["eu-1"].results_dropped == 9
        agent.close()


async def test_a_drain_ends_agents_unavailable_watchers_cleanly_and_moves_no_verdict(
    tmp_path: Path,
) -> None:
    config = stored_config(tmp_path)
    async with start(config) as running:
        agent = running.agent()
        await agent.handshake()
        await agent.send_results([agent.result("web")])
        watch = running.queries.WatchVerdicts(query_pb2.WatchVerdictsRequest())
        await eventually(
            lambda: running.metric("vantage_watch_streams_open"), "the watch to be open"
        )
        last_id = running.coordinator.transitions.last_id
        running.coordinator.stop()
        assert await agent.status() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in await agent.call.details()
        async with asyncio.timeout(WAIT):
            assert [t async for t in watch] == []  # ends, with no error
        assert await watch.code() == grpc.StatusCode.OK
        assert running.coordinator.transitions.last_id == last_id
    async with start(config) as running:
        assert (await verdicts(running))["web"] == (UP, True)


async def test_a_version_1_store_is_migrated_and_keeps_its_history(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE transitions (id INTEGER PRIMARY KEY AUTOINCREMENT, check_name TEXT NOT
            NULL, at REAL NOT NULL, previous TEXT, state TEXT NOT NULL, verdict TEXT NOT NULL);
        CREATE INDEX transitions_check_at ON transitions (check_name, at);
        CREATE INDEX transitions_at ON transitions (at);
        PRAGMA application_id = 1448363825;
        PRAGMA user_version = 1;
        """
    )
    now = time.time()
    evidence = '[%r,[],null,"up from 1/1 agents",[]]'
    for id_, previous, state in ((1, None, "up"), (2, "up", "global"), (3, "global", "up")):
        old.execute(
            "INSERT INTO transitions VALUES (?, 'web', ?, ?, ?, ?)",
            (id_, now, previous, state, evidence % now),
        )
    old.commit()
    old.close()
    store = TransitionStore.open(path)
    try:
        assert store.last_id == 3
        assert [(r.id, r.transition.verdict.state.value) for r in store.latest()] == [(3, "up")]
        assert len(store.recent(10)) == 3
        assert store.agents() == []
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2


def test_a_store_newer_than_the_coordinator_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    TransitionStore.open(path).close()
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version = 99")
    newer.commit()
    newer.close()
    with pytest.raises(ConfigError, match=r"store version 99 is newer than this coordinator"):
        TransitionStore.open(path)
