"""No result lost, none counted twice, no transition made up: real agents spooling to disk
across a coordinator killed outright, a link cut for longer than the spool holds, an agent
killed outright, and a coordinator drained by SIGTERM under load.

The accounting is exact. After the last coordinator has stopped (its store is then free
to read), each agent's row in the store holds the highest sequence number it handled for
the agent's one instance (``L``) and the results it ingested (``R``); the agent's spool
(``state.json``, once the agent has stopped) holds the results its bound dropped (``D``).
Sequence numbers go 1, 2, 3 ... with no hole, and a number at or below the highest
handled is dropped as a duplicate, so:

- ``R + D == L``: every result was ingested once or dropped by a full spool, none lost
  in between, none ingested twice; and the replay came in order, since a result sent
  after a newer one would have been dropped as a duplicate, making ``R + D < L``.
- ``R <= L`` with losses bounded, after a ``kill -9`` of the agent (the results of the
  last flush interval, never written).

Each check's history holds exactly its one first verdict when its target never changed:
a restart that published anything would show as a second transition.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from running_system import Coordinator, Nginx, Proc, System, Watch, free_port, wait_until

from coordinator.server import DRAIN_TIMEOUT

pytestmark = pytest.mark.e2e

AGENTS = (("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap"))
CHECKS = 100  # at 1 s each: 100 results a second from every agent
STREAM = 30.0  # seconds of streaming on either side of the coordinator's death: 60 in all
WAIT = 60.0  # bounds each wait; never asserted on


# -- the system under test ----------------------------------------------------------------


def durable_config(system: System, web_port: int) -> Path:
    """A coordinator with a store, on a fixed gRPC port (agents reconnect to it by
    themselves), judging ``CHECKS`` TCP checks of a live server and one of a closed port."""
    checks = "".join(
        f"  - {{name: port-{n:03}, type: tcp, target: '127.0.0.1:{web_port}', interval: 1s, "
        "timeout: 500ms}\n"
        for n in range(CHECKS - 1)
    )
    checks += (
        f"  - {{name: closed, type: tcp, target: '127.0.0.1:{free_port()}', interval: 1s, "
        "timeout: 500ms}\n"
    )
    config = system.write_config(
        "checks:\n" + checks,
        engine="engine: {min_agents: 1, min_regions: 1}\nstore_file: state/vantage.db\n",
    )
    (config.parent / "state").mkdir()
    text = re.sub(
        r"^listen: .*$", f"listen: 127.0.0.1:{free_port()}", config.read_text(), flags=re.M
    )
    config.write_text(text)
    return config


def serving(system: System) -> tuple[Nginx, Path, Coordinator]:
    """A live nginx (the TCP checks' target: it takes 300 connections a second, where
    Python's http.server queues five) and a coordinator on ``durable_config``."""
    web = Nginx(system, "nginx")
    web.start()
    config = durable_config(system, web.port)
    return web, config, system.coordinator(config)


def statuses(coordinator: Coordinator) -> dict[str, dict[str, Any]]:
    """`vantage status --json`: every verdict, by check."""
    listed = json.loads(coordinator.cli("status", "--json").stdout)["verdicts"]
    return {verdict["check"]: verdict for verdict in listed}


def agents(coordinator: Coordinator) -> dict[str, dict[str, Any]]:
    """`vantage agents --json`, by name."""
    listed = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
    return {agent["name"]: agent for agent in listed}


def judged(coordinator: Coordinator) -> dict[str, dict[str, Any]] | None:
    """Every check's verdict once each is settled and confirmed: the live port up, the
    closed one down for everyone."""
    found = statuses(coordinator)
    expected = {f"port-{n:03}": "up" for n in range(CHECKS - 1)} | {"closed": "global"}
    states = {check: verdict["state"] for check, verdict in found.items()}
    if states != expected or any(verdict["unconfirmed"] for verdict in found.values()):
        return None
    return found


def connected(coordinator: Coordinator, names: set[str]) -> bool:
    return {name for name, agent in agents(coordinator).items() if agent["connected"]} >= names


def spool_state(system: System, name: str) -> dict[str, int]:
    """An agent's spool state (``agent.spool``), read once the agent has stopped."""
    found = system.state_home / "vantage" / "spool" / name / "state.json"
    state: dict[str, int] = json.loads(found.read_text())
    return state


def ledgers(config: Path) -> dict[str, dict[str, Any]]:
    """Each agent's row in the store, read once the coordinator has stopped."""
    with sqlite3.connect(config.parent / "state" / "vantage.db") as db:
        rows = db.execute(
            "SELECT name, instances, results_received, results_dropped FROM agents"
        ).fetchall()
    return {
        name: {"instances": json.loads(instances), "received": received, "dropped": dropped}
        for name, instances, received, dropped in rows
    }


def histories(config: Path) -> dict[str, list[tuple[int, str | None, str]]]:
    """Each check's transitions (id, previous, state), read once the coordinator stopped;
    a check's first verdict comes from ``unknown``."""
    with sqlite3.connect(config.parent / "state" / "vantage.db") as db:
        rows = db.execute("SELECT id, check_name, previous, state FROM transitions ORDER BY id")
        found: dict[str, list[tuple[int, str | None, str]]] = {}
        for id_, check, previous, state in rows:
            found.setdefault(check, []).append((id_, previous, state))
    return found


def only_first_verdicts(config: Path) -> None:
    """Every check's history is its one first verdict: nothing was made up."""
    expected = {f"port-{n:03}": "up" for n in range(CHECKS - 1)} | {"closed": "global"}
    found = histories(config)
    assert {check: [(p, s) for _, p, s in kept] for check, kept in found.items()} == {
        check: [("unknown", state)] for check, state in expected.items()
    }


def stop_all(coordinator: Coordinator, started: dict[str, Proc]) -> None:
    """Drain the coordinator, then stop the agents (they spool what it did not take)."""
    assert coordinator.proc.stop() == 0, coordinator.proc.stderr()
    for proc in started.values():
        assert proc.stop() == 0, proc.stderr()


def last_seq(entry: dict[str, Any]) -> int:
    """The one instance's highest sequence number handled."""
    assert len(entry["instances"]) == 1, entry  # the spool's id: one instance, restarts or not
    seq: int = entry["instances"][0][1]
    return seq


def events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [event for event in proc.log_events() if event.get("event") == name]


# -- the scenarios ------------------------------------------------------------------------


def test_a_coordinator_killed_under_load_resumes_with_no_gap_no_duplicate_and_nothing_made_up(
    system: System,
) -> None:
    _, config, first = serving(system)
    started = {name: system.agent(first, name, region) for name, region in AGENTS}
    before = wait_until(lambda: judged(first), WAIT, "every check's verdict")
    time.sleep(STREAM)
    first.proc.stop(signal.SIGKILL)

    # The agents spool while it is gone; then they are held still for a moment, so that
    # nothing can confirm a verdict before we have read what the restart restored.
    time.sleep(3)
    for proc in started.values():
        proc.popen.send_signal(signal.SIGSTOP)
    second = system.coordinator(config)
    restored = statuses(second)
    assert {check: (v["state"], v["since"]) for check, v in restored.items()} == {
        check: (v["state"], v["since"]) for check, v in before.items()
    }
    assert all(verdict["unconfirmed"] for verdict in restored.values())
    assert all(not agent["connected"] for agent in agents(second).values())

    for proc in started.values():
        proc.popen.send_signal(signal.SIGCONT)
    wait_until(lambda: connected(second, {name for name, _ in AGENTS}), WAIT, "the agents")
    wait_until(lambda: judged(second), WAIT, "the verdicts confirmed by fresh results")
    replayed = [
        event["resending"]
        for proc in started.values()
        for event in events(proc, "connected to coordinator")[1:]
    ]
    assert sum(replayed) > 0  # what they made while the coordinator was gone
    time.sleep(STREAM - 3)
    stop_all(second, started)

    only_first_verdicts(config)
    for name, entry in ledgers(config).items():
        spool = spool_state(system, name)
        assert (entry["dropped"], spool["dropped"]) == (0, 0), name
        assert entry["received"] == last_seq(entry), name  # R == L: no gap, no duplicate
        # Everything the agent saw acknowledged was ingested; nothing beyond what it made.
        assert spool["first"] - 1 <= last_seq(entry) <= spool["next_seq"] - 1, name
        assert entry["received"] > CHECKS * 2 * STREAM * 0.8, name  # it really streamed


def test_a_link_cut_longer_than_the_spool_holds_drops_the_oldest_and_says_so(
    system: System,
) -> None:
    _, config, coordinator = serving(system)
    # 64KiB, the smallest spool: about 650 results, six seconds of this agent's.
    agent = system.agent(coordinator, "eu-1", "eu", flags=("--spool-bytes", "64KiB"))
    wait_until(lambda: judged(coordinator), WAIT, "every check's verdict")

    # The coordinator goes silent (as a cut link looks from the agent) for 20 s.
    coordinator.proc.popen.send_signal(signal.SIGSTOP)
    wait_until(lambda: events(agent, "spool full: dropped the oldest results"), WAIT, "drops")
    time.sleep(20)
    coordinator.proc.popen.send_signal(signal.SIGCONT)

    reported = wait_until(
        lambda: agents(coordinator)["eu-1"]["results_dropped"], WAIT, "the drops reported"
    )
    wait_until(lambda: judged(coordinator), WAIT, "the verdicts current again")
    stop_all(coordinator, {"eu-1": agent})

    spool = spool_state(system, "eu-1")
    entry = ledgers(config)["eu-1"]
    # Logged as it happens (at most every 10 s), reported to the coordinator, kept.
    logged = events(agent, "spool full: dropped the oldest results")
    assert spool["dropped"] == entry["dropped"] >= reported >= logged[0]["dropped_total"] > 0
    # R + D == L: nothing lost but what the bound dropped, and the replay in order.
    assert entry["received"] + entry["dropped"] == last_seq(entry)


def test_a_killed_agent_restarts_where_its_sequence_left_off(system: System) -> None:
    _, config, coordinator = serving(system)
    first = system.agent(coordinator, "eu-1", "eu")
    wait_until(lambda: judged(coordinator), WAIT, "every check's verdict")
    time.sleep(5)
    first.stop(signal.SIGKILL)
    instance = events(first, "agent starting")[0]["instance_id"]
    received = agents(coordinator)["eu-1"]["results_received"]

    second = system.agent(coordinator, "eu-1", "eu")
    hello = wait_until(lambda: events(second, "connected to coordinator"), WAIT, "the agent")[0]
    assert events(second, "agent starting")[0]["instance_id"] == instance
    assert hello["last_seq"] >= received  # the coordinator's numbering, carried on
    wait_until(
        lambda: agents(coordinator)["eu-1"]["results_received"] > received + CHECKS * 3,
        WAIT,
        "new results ingested after the restart",
    )
    stop_all(coordinator, {"eu-1": second})

    entry = ledgers(config)["eu-1"]
    # Never more ingested than numbered: no duplicate, though the restart replayed what
    # the coordinator had taken but not yet acknowledged. Lost: only results numbered
    # within the last flush interval before the kill (1 s: one run of every check, two
    # when the kill fell between a run's start and the next).
    assert 0 <= last_seq(entry) - entry["received"] <= 2 * CHECKS


def test_sigterm_under_load_drains_in_time_and_the_agents_come_back(system: System) -> None:
    web, config, first = serving(system)
    started = {name: system.agent(first, name, region) for name, region in AGENTS}
    wait_until(lambda: judged(first), WAIT, "every check's verdict")

    with Watch(first) as watch:
        # The web server stops: every live port goes down at once, a burst of transitions
        # being recorded and sent just as the coordinator is told to stop.
        web.stop()
        wait_until(lambda: len(watch.heard) >= 10, WAIT, "transitions under way")
        first.proc.popen.send_signal(signal.SIGTERM)
        first.proc.popen.wait(timeout=DRAIN_TIMEOUT + 10)
        watch.join()

    assert first.proc.popen.returncode == 0, first.proc.stderr()
    drained = events(first.proc, "coordinator drained")
    assert len(drained) == 1
    assert drained[0]["seconds"] <= DRAIN_TIMEOUT
    assert drained[0]["agents"] == len(AGENTS)
    assert drained[0]["agents_left"] == 0
    assert watch.ended == [None]  # the watch ended cleanly, not with an error

    second = system.coordinator(config)
    wait_until(lambda: connected(second, {name for name, _ in AGENTS}), WAIT, "the agents")
    downs = {f"port-{n:03}": "global" for n in range(CHECKS - 1)} | {"closed": "global"}

    def all_down() -> bool:
        found = statuses(second)
        return {check: v["state"] for check, v in found.items()} == downs and not any(
            v["unconfirmed"] for v in found.values()
        )

    wait_until(all_down, WAIT, "every check down after the restart")
    stop_all(second, started)

    # Every transition the watcher heard is on record, and the record is a consistent
    # chain per check: each starts from the state the previous one ended in.
    kept = histories(config)
    assert set(watch.heard) <= {id_ for chain in kept.values() for id_, _, _ in chain}
    for check, chain in kept.items():
        for (_, _, state), (_, previous, _) in itertools.pairwise(chain):
            assert previous == state, (check, chain)
        assert chain[-1][2] == "global", check
    for name, entry in ledgers(config).items():
        assert entry["received"] == last_seq(entry), name
