"""MQTT end to end: a real coordinator and three real agents probing a real nginx,
publishing to a real mosquitto, watched by an aiomqtt subscriber.

One nginx stops and starts (an outage everyone sees); then the broker stops, another
nginx stops and starts while it is away, and the broker comes back on the same port. The broker
persists its state and the subscriber holds a persistent session, as a consumer that
must not miss a transition would: whatever is published while the subscriber is
reconnecting is kept for it. Every transition id must arrive, in order, without a gap;
the retained verdict and agent topics must hold the current state, and be published
again after the restart.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import Mosquitto, Subscriber, SubscriberThread, retained
from running_system import Coordinator, Nginx, System, free_port, wait_until

pytestmark = pytest.mark.e2e

PREFIX = "vantage/"  # the default
AGENTS = (("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap"))
CHECKS = ("web", "api", "steady")
WAIT = 40.0  # bounds each wait; never asserted on


def transitions_logged(coordinator: Coordinator) -> list[dict[str, Any]]:
    return [e for e in coordinator.proc.log_events() if e.get("event") == "verdict changed"]


def metric(coordinator: Coordinator, name: str) -> float | None:
    for line in coordinator.metrics().splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name:
            return float(value)
    return None


def state_is(coordinator: Coordinator, check: str, state: str) -> bool:
    return bool(coordinator.status(check)["state"] == state)


def first_occurrences(ids: list[int]) -> list[int]:
    """Ids in order of first arrival (QoS 1 may deliver one twice)."""
    seen: dict[int, None] = {}
    for id_ in ids:
        seen.setdefault(id_, None)
    return list(seen)


def current_retained(broker: Mosquitto) -> dict[str, bytes]:
    found = asyncio.run(retained(broker.port, f"{PREFIX}#"))
    return {topic.removeprefix(PREFIX): payload for topic, payload in found.items()}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto", persistence=True) as running:
        yield running


def test_every_transition_and_the_current_state_reach_mqtt_across_a_broker_restart(
    system: System, broker: Mosquitto
) -> None:
    # One target per outage: a target that goes down twice within a few intervals is
    # flapping, `degraded`, not `global` again (see the README's Verdicts).
    web, api = Nginx(system, "nginx-web"), Nginx(system, "nginx-api")
    web.start()
    api.start()
    steady_port = free_port()
    system.http_server(steady_port)  # never stops: its verdict moves in no outage
    config = system.write_config(
        "checks:\n"
        f"  - {{name: web, type: http, target: '{web.url}', interval: 1s, timeout: 500ms,"
        " labels: {tier: front}}\n"
        f"  - {{name: api, type: http, target: '{api.url}', interval: 1s, timeout: 500ms}}\n"
        f"  - {{name: steady, type: http, target: 'http://127.0.0.1:{steady_port}/',"
        " interval: 1s, timeout: 500ms}\n",
        engine=f"mqtt: {{url: '{broker.url}'}}\n",
    )
    events = f"{PREFIX}events"
    subscriber = Subscriber(broker.port, [f"{PREFIX}#"], client_id="e2e-watcher")
    with SubscriberThread(subscriber):
        wait_until(lambda: subscriber.connections, 10, "the subscriber to connect")
        coordinator = system.coordinator(config)
        for name, region in AGENTS:
            system.agent(coordinator, name, region)
        for check in CHECKS:
            wait_until(lambda c=check: state_is(coordinator, c, "up"), WAIT, f"{check} up")

        # An outage everyone sees, with the broker up.
        web.stop()
        wait_until(lambda: state_is(coordinator, "web", "global"), WAIT, "web down")
        web.start()
        wait_until(lambda: state_is(coordinator, "web", "up"), WAIT, "web up again")

        # Another one while the broker is away: its transitions wait in the coordinator.
        broker.stop()
        wait_until(
            lambda: metric(coordinator, "vantage_mqtt_connected") == 0, WAIT, "the loss noticed"
        )
        before_restart = len(subscriber.messages)
        queued_before = len(transitions_logged(coordinator))
        api.stop()
        wait_until(lambda: state_is(coordinator, "api", "global"), WAIT, "api down, no broker")
        api.start()
        wait_until(lambda: state_is(coordinator, "api", "up"), WAIT, "api up, no broker")
        while_away = len(transitions_logged(coordinator)) - queued_before
        assert while_away >= 2
        assert (metric(coordinator, "vantage_mqtt_queued_transitions") or 0) >= while_away
        broker.start()

        # Every transition id, in order, without a gap (de-duplicated by id).
        logged = transitions_logged(coordinator)
        expected = [entry["transition_id"] for entry in logged]
        assert expected == list(range(expected[0], expected[0] + len(expected)))
        wait_until(
            lambda: first_occurrences(subscriber.event_ids(events))[: len(expected)] == expected,
            WAIT,
            "every transition over MQTT",
        )
        by_id = {message.json()["id"]: message.json() for message in subscriber.on(events)}
        for entry in logged:
            event = by_id[entry["transition_id"]]
            assert (event["check"], event["state"], event["previous"]) == (
                entry["check"],
                entry["state"],
                entry["previous"],
            )
            assert event["verdict"]["state"] == entry["state"]
        for check in ("web", "api"):  # each outage and its end, whatever came between
            states = [event["state"] for event in by_id.values() if event["check"] == check]
            assert states[-1] == "up"
            assert "global" in states[states.index("up") :], states

        # After the restart everything retained was published again: steady's verdict
        # too, though it did not change, and every agent's presence.
        def republished() -> set[str]:
            return {
                message.topic.removeprefix(PREFIX)
                for message in list(subscriber.messages)[before_restart:]
                if not message.retain and message.payload
            }

        wanted = {"status"} | {f"verdict/{c}" for c in CHECKS} | {f"agent/{n}" for n, _ in AGENTS}
        wait_until(lambda: wanted <= republished(), WAIT, "the retained state republished")

        # A fresh subscriber gets the current state.
        state = wait_until(
            lambda: (
                (found := current_retained(broker)).get("verdict/web")
                and json.loads(found["verdict/web"])["transition_id"] == _last_of(logged, "web")
                and found
            ),
            WAIT,
            "web's latest verdict retained",
        )
        assert state["status"] == b"online"
        for check in CHECKS:
            row = coordinator.status(check)
            body = json.loads(state[f"verdict/{check}"])
            assert set(row) <= set(body)
            assert (body["check"], body["state"], body["since"]) == (
                row["check"],
                row["state"],
                row["since"],
            )
            assert body["transition_id"] == _last_of(logged, check)
            assert body["transition_at"] == row["since"]
        assert json.loads(state["verdict/web"])["labels"] == {"tier": "front"}
        agents = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
        for agent in agents:
            body = json.loads(state[f"agent/{agent['name']}"])
            assert set(agent) <= set(body)
            assert (body["region"], body["connected"], body["impaired"]) == (
                agent["region"],
                True,
                agent["impaired"],
            )
        assert metric(coordinator, "vantage_mqtt_dropped_total") == 0

        # The coordinator vanishes: its last will says so.
        coordinator.proc.stop(signal.SIGKILL)
        wait_until(
            lambda: current_retained(broker).get("status") == b"offline",
            WAIT,
            "status offline (the last will)",
        )


def _last_of(logged: list[dict[str, Any]], check: str) -> int:
    return max(int(entry["transition_id"]) for entry in logged if entry["check"] == check)
