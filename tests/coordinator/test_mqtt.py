"""The MQTT publisher (coordinator/mqtt.py): configuration, topics, payloads, the bounded
queue, and a real coordinator publishing to a real mosquitto (tests/mqtt_broker.py).

Transitions come from a scripted agent on the real agent stream, with an engine that
moves on one result (one agent in one region is enough) and checks whose interval is
long enough that nothing goes stale while a test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog
from live_coordinator import TOKENS, FakeAgent, Running, eventually, start
from mqtt_broker import Mosquitto, Subscriber, make_tls, retained

from coordinator.config import load_config
from coordinator.fleet import AgentInfo
from coordinator.mqtt import (
    MqttConfig,
    Topics,
    TransitionQueue,
    agent_payload,
    broker_address,
    event_payload,
    topic_level,
    verdict_payload,
)
from coordinator.server import Coordinator
from coordinator.store import RecordedTransition
from coordinator.verdicts import RegionState, RegionView, Transition, Verdict, VerdictState
from vantage.checks import ConfigError, parse_checks
from vantage.client import agent_json, verdict_json
from vantage.results import FailureClass
from vantage_proto.v1 import query_pb2

WAIT = 30.0  # bounds a wait (a reconnection backs off up to 10 s); never asserted on
PREFIX = "t/"
CHECK_NAMES = ("web", "db", "dns", "api", "mail", "cdn")


def checks_yaml(names: tuple[str, ...]) -> str:
    return "checks:\n" + "".join(
        f"  - {{name: {name}, type: tcp, target: '127.0.0.1:{port}', interval: 60s, "
        f"timeout: 10s, labels: {{team: t{port}}}}}\n"
        for port, name in enumerate(names, start=1)
    )


CHECKS = checks_yaml(CHECK_NAMES)
# One result moves a verdict; no second opinions (the scripted agent answers none).
ENGINE = (
    "engine: {min_agents: 1, min_regions: 1, fail_after: 1, recover_after: 1,"
    " adaptive_confirmation: false, second_opinion: false}\n"
)


def write_config(directory: Path, mqtt: str, checks: str = CHECKS) -> Path:
    (directory / "checks.yaml").write_text(checks)
    (directory / "tokens.yaml").write_text(TOKENS)
    config = directory / "coordinator.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nhttp_listen: 127.0.0.1:0\n"
        "checks_file: checks.yaml\ntokens_file: tokens.yaml\n"
        "heartbeat_interval: 60s\n" + ENGINE + mqtt
    )
    return config


def mqtt_section(broker: Mosquitto, **extra: object) -> str:
    settings = {"url": broker.url, "topic_prefix": PREFIX, **extra}
    return "mqtt: " + json.dumps(settings) + "\n"


async def until(predicate: Callable[[], Any], what: str) -> Any:
    """``eventually``, with the longer wait a broker's reconnection needs."""
    return await eventually(predicate, what, within=WAIT)


@contextlib.asynccontextmanager
async def subscribed(subscriber: Subscriber) -> AsyncIterator[Subscriber]:
    task = asyncio.create_task(subscriber.run())
    try:
        await until(lambda: subscriber.connections, "the test subscriber to connect")
        yield subscriber
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def connected_agent(running: Running, name: str = "eu-1") -> FakeAgent:
    agent = running.agent(name, "eu")
    await agent.handshake()
    return agent


async def outcomes(agent: FakeAgent, *results: tuple[str, bool]) -> None:
    """Send results in one batch: (check, success) each."""
    await agent.send_results([agent.result(check, success=ok) for check, ok in results])


def recorded_ids(running: Running) -> list[int]:
    return [recorded.id for recorded in running.coordinator.transitions.recent(100_000)]


# -- configuration -----------------------------------------------------------------------


def test_off_without_a_url() -> None:
    config = load_config(None)
    assert not config.mqtt.enabled
    assert Coordinator(config, reload_on_sighup=False).mqtt is None


def test_a_full_section(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    path = tmp_path / "coordinator.yaml"
    path.write_text(
        "mqtt:\n"
        "  url: mqtts://broker.example.net\n"
        "  topic_prefix: site/vantage\n"
        "  client_id: vantage-eu\n"
        "  username: vantage\n"
        "  password_file: secret\n"
        "  ca_file: /etc/ssl/broker-ca.pem\n"
        "  queue_size: 500\n"
        "  keepalive: 2m\n"
    )
    mqtt = load_config(path).mqtt
    assert mqtt.enabled
    assert broker_address(mqtt.url or "") == ("broker.example.net", 8883, True)
    assert mqtt.topic_prefix == "site/vantage/"  # the levels under it
    assert mqtt.password_file == tmp_path / "secret"
    assert mqtt.ca_file == Path("/etc/ssl/broker-ca.pem")
    assert (mqtt.queue_size, mqtt.keepalive) == (500, 120.0)
    assert MqttConfig().topic_prefix == "vantage/"  # ARCHITECTURE.md's default


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("{url: 'http://broker:1883'}", "is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"),
        ("{url: 'broker:1883'}", "is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"),
        ("{url: 'mqtt://'}", "names no host"),
        ("{url: 'mqtt://broker:99999'}", "Port out of range"),
        ("{url: 'mqtt://broker:0'}", "port 0"),
        ("{url: 'mqtt://broker/x'}", "no path, query or fragment"),
        ("{url: 'mqtt://user:hunter2@broker'}", "set mqtt.username and mqtt.password_file"),
        ("{url: 'mqtt://b', topic_prefix: 'a/+/b'}", "a wildcard or forbidden in topics"),
        ("{url: 'mqtt://b', topic_prefix: 'a/#'}", "a wildcard or forbidden in topics"),
        ("{url: 'mqtt://b', topic_prefix: '$SYS/'}", "belong to the broker"),
        ("{url: 'mqtt://b', queue_size: 0}", "mqtt.queue_size: must be at least 1"),
        ("{url: 'mqtt://b', keepalive: 100000s}", "outside 1s..65535s"),
        ("{url: 'mqtt://b', password_file: pw}", "password_file is set without a username"),
        ("{url: 'mqtt://b', ca_file: ca.pem}", "ca_file is only used with an mqtts:// url"),
        ("{url: 'mqtt://b', host: b}", "unknown field 'mqtt.host'"),
    ],
)
def test_mistakes_are_one_line(tmp_path: Path, section: str, expected: str) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text(f"listen: 127.0.0.1:0\nmqtt: {section}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:2: ")
    assert expected in message
    assert "hunter2" not in message


def test_unusable_files_are_refused_before_anything_runs(tmp_path: Path) -> None:
    def coordinator(mqtt: str) -> None:
        path = tmp_path / "coordinator.yaml"
        path.write_text(f"mqtt: {mqtt}\n")
        Coordinator(load_config(path), reload_on_sighup=False)

    with pytest.raises(ConfigError, match=r"mqtt.password_file .*/missing: cannot read: No such"):
        coordinator("{url: 'mqtt://b', username: u, password_file: missing}")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"mqtt.password_file .*/empty: empty"):
        coordinator("{url: 'mqtt://b', username: u, password_file: empty}")
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"mqtt.ca_file .*/ca.pem: not a PEM CA certificate"):
        coordinator("{url: 'mqtts://b', ca_file: ca.pem}")


# -- topics ------------------------------------------------------------------------------


def test_topics_under_a_prefix() -> None:
    topics = Topics("vantage/")
    assert topics.status == "vantage/status"
    assert topics.events == "vantage/events"
    assert topics.verdict("web.example-1") == "vantage/verdict/web.example-1"
    assert topics.agent("eu_1") == "vantage/agent/eu_1"
    assert topics.parse("vantage/verdict/web") == ("verdict", "web")
    assert topics.parse("vantage/agent/eu-1") == ("agent", "eu-1")
    assert topics.parse("vantage/verdict/a/b") is None
    assert topics.parse("other/verdict/web") is None
    assert Topics("").verdict("web") == "verdict/web"


@pytest.mark.parametrize("name", ["", "a/b", "a+", "#", "a\0b", "web\n"])
def test_a_name_that_is_not_one_topic_level_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cannot be one MQTT topic level"):
        topic_level(name)


@pytest.mark.parametrize("name", ["a/b", "a+", "a#b", "a\0b"])
def test_check_names_never_hold_topic_separators_or_wildcards(name: str) -> None:
    with pytest.raises(ConfigError, match="not a valid check name"):
        parse_checks(
            f"checks:\n  - {{name: {json.dumps(name)}, type: tcp, target: 'h:1'}}\n", "x.yaml"
        )


# -- documentation -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_payload_examples_are_what_the_code_publishes() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## MQTT\n") :]
    start = section.index("```text\n") + len("```text\n")
    block = section[start : section.index("\n```", start)]
    examples = dict(line.split(maxsplit=1) for line in block.splitlines())

    at = 1_795_687_202.0  # 2026-11-26T10:00:02Z
    failing = ("eu-1", "eu-2")
    eu = RegionView(
        RegionState.DOWN, down=2, failure=FailureClass.CONNECT_TIMEOUT, failing_agents=failing
    )
    us = RegionView(RegionState.UP, up=2)
    verdict = Verdict(
        "web", VerdictState.REGIONAL, at, regions={"eu": eu, "us": us},
        regions_down=("eu",), failure=FailureClass.CONNECT_TIMEOUT,
        reason="down in eu (connect_timeout)",
    )  # fmt: skip
    last = RecordedTransition(42, Transition("web", VerdictState.UP, verdict, at))
    agent = AgentInfo(
        "eu-1", "eu", "0.1.0", ("http", "tcp"), "instance", connected=True,
        connected_since=at - 3600, last_seen=at + 1, results_received=1234,
    )  # fmt: skip
    labels = {"team": "web"}
    assert json.loads(examples["vantage/verdict/web"]) == json.loads(
        verdict_payload(verdict, labels, last)
    )
    assert json.loads(examples["vantage/events"]) == json.loads(event_payload(last, labels))
    assert json.loads(examples["vantage/agent/eu-1"]) == json.loads(agent_payload(agent))


def test_the_commented_example_section_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "examples" / "coordinator.yaml").read_text()
    lines = text[text.index("# mqtt:") :].splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line[2:])
    path = tmp_path / "coordinator.yaml"
    path.write_text("\n".join(block) + "\n")
    mqtt = load_config(path).mqtt
    assert mqtt.enabled
    assert mqtt.password_file == tmp_path / "mqtt.password"


# -- the queue ---------------------------------------------------------------------------


def recorded(id_: int, check: str = "web") -> RecordedTransition:
    verdict = Verdict(check, VerdictState.UP, since=1_800_000_000.0 + id_)
    return RecordedTransition(id_, Transition(check, None, verdict, verdict.since))


def drain(queue: TransitionQueue) -> list[int]:
    ids = []
    while (item := queue.take()) is not None:
        ids.append(item.id)
        queue.acked(item.id)
    return ids


def test_the_queue_keeps_the_newest_and_counts_the_dropped() -> None:
    queue = TransitionQueue(3)
    assert [queue.put(recorded(i)) for i in range(1, 6)] == [0, 0, 0, 1, 1]
    assert queue.dropped == 2
    assert len(queue) == 3
    assert drain(queue) == [3, 4, 5]
    assert len(queue) == 0


def test_unacknowledged_transitions_go_again_before_newer_ones() -> None:
    queue = TransitionQueue(10)
    for i in range(1, 5):
        queue.put(recorded(i))
    first, second, third = queue.take(), queue.take(), queue.take()
    assert (first and first.id, second and second.id, third and third.id) == (1, 2, 3)
    queue.acked(2)  # the broker acknowledged 2 alone when the connection dropped
    queue.put(recorded(5))
    assert len(queue) == 4  # 1 and 3 in flight, 4 and 5 waiting
    assert queue.requeue() == 0
    assert drain(queue) == [1, 3, 4, 5]


def test_requeueing_into_a_full_queue_drops_the_oldest() -> None:
    queue = TransitionQueue(3)
    for i in range(1, 4):
        queue.put(recorded(i))
    queue.take()
    queue.take()  # 1 and 2 in flight
    for i in range(4, 6):
        queue.put(recorded(i))  # waiting: 3, 4, 5 (full)
    assert queue.requeue() == 2  # 1 and 2 would make five
    assert queue.dropped == 2
    assert drain(queue) == [3, 4, 5]


# -- payloads ----------------------------------------------------------------------------


async def test_payloads_are_the_public_json_rows(tmp_path: Path) -> None:
    async with start(write_config(tmp_path, ""), reload_on_sighup=False) as running:
        agent = await connected_agent(running)
        await outcomes(agent, ("web", False))
        coordinator = running.coordinator
        last = coordinator.transitions.recent()[-1]
        assert last.transition.check == "web"
        verdict = coordinator.engine.verdict("web")
        assert verdict is not None

        served = verdict_json(
            await running.queries.GetVerdict(query_pb2.GetVerdictRequest(check="web"))
        )
        body = json.loads(verdict_payload(verdict, {"team": "t1"}, last))
        assert body == {
            **served,
            "transition_id": last.id,
            "transition_at": served["since"],
        }
        assert body["labels"] == {"team": "t1"}
        assert body["state"] == "global"
        assert body["regions"]["eu"]["failing_agents"] == ["eu-1"]
        assert json.loads(verdict_payload(verdict, {}, None))["transition_id"] is None

        event = json.loads(event_payload(last, {"team": "t1"}))
        assert event["id"] == last.id
        assert event["check"] == "web"
        assert event["previous"] == "unknown"
        assert event["state"] == "global"
        assert event["at"] == served["since"]
        assert event["verdict"] == served

        info = coordinator.fleet.get("eu-1")
        assert info is not None
        listed = await running.queries.ListAgents(query_pb2.ListAgentsRequest())
        assert json.loads(agent_payload(info)) == agent_json(listed.agents[0])
        agent.close()


# -- against a real broker ---------------------------------------------------------------


async def state_of(broker: Mosquitto) -> dict[str, bytes]:
    """The retained messages under the prefix, by topic without the prefix."""
    found = await retained(broker.port, f"{PREFIX}#")
    return {topic.removeprefix(PREFIX): payload for topic, payload in found.items()}


async def published(broker: Mosquitto, running: Running) -> dict[str, bytes] | None:
    """The retained state once every check's verdict is there and carries the latest
    transition (so it is the state after everything recorded so far); else None."""
    state = await state_of(broker)
    verdicts = [state.get(f"verdict/{name}") for name in CHECK_NAMES]
    if not all(verdicts):
        return None
    latest = max(json.loads(raw or b"")["transition_id"] or 0 for raw in verdicts)
    return state if latest == recorded_ids(running)[-1] else None


async def has_topics(broker: Mosquitto, present: set[str], absent: set[str]) -> bool:
    topics = set(await state_of(broker))
    return present <= topics and not absent & topics


async def metric_is(running: Running, sample: str, value: float) -> bool:
    return await running.metric(sample) == value


async def test_verdicts_agents_and_every_transition_reach_the_broker(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        config = write_config(tmp_path, mqtt_section(broker))
        async with (
            subscribed(Subscriber(broker.port, [f"{PREFIX}#"])) as live,
            start(config, reload_on_sighup=False) as running,
        ):
            await until(lambda: live.on(f"{PREFIX}status"), "status online")
            agent = await connected_agent(running)
            await outcomes(agent, *((name, True) for name in CHECK_NAMES))
            await outcomes(agent, ("web", False), ("db", False))
            await outcomes(agent, ("web", True))
            ids = recorded_ids(running)
            assert len(ids) == len(CHECK_NAMES) + 3

            events = f"{PREFIX}events"
            await until(lambda: live.event_ids(events) == ids, "every transition, in order")
            by_id = {item.id: item.transition for item in running.coordinator.transitions.recent()}
            for message in live.on(events):
                event = message.json()
                transition = by_id[event["id"]]
                assert message.retain is False
                assert event["check"] == transition.check
                assert event["state"] == transition.verdict.state.value
                previous = transition.previous
                assert event["previous"] == (previous.value if previous else None)

            # A fresh subscriber gets the current state: status, every verdict, the agent.
            state = await until(lambda: published(broker, running), "every verdict retained")
            assert state["status"] == b"online"
            for name in CHECK_NAMES:
                served = verdict_json(
                    await running.queries.GetVerdict(query_pb2.GetVerdictRequest(check=name))
                )
                body = json.loads(state[f"verdict/{name}"])
                last = max(i for i, transition in by_id.items() if transition.check == name)
                assert body == {**served, "transition_id": last, "transition_at": served["since"]}
            assert json.loads(state["verdict/db"])["state"] == "global"
            assert json.loads(state["verdict/web"])["state"] == "up"
            row = json.loads(state["agent/eu-1"])
            assert (row["name"], row["region"], row["connected"]) == ("eu-1", "eu", True)

            assert await running.metric("vantage_mqtt_connected") == 1
            assert await running.metric('vantage_mqtt_published_total{topic="event"}') == len(ids)
            assert await running.metric("vantage_mqtt_dropped_total") == 0

            # The agent goes: its retained presence says so.
            agent.close()

            async def shown_gone() -> bool:
                raw = (await state_of(broker)).get("agent/eu-1")
                return raw is not None and json.loads(raw)["connected"] is False

            await until(shown_gone, "agent eu-1 shown disconnected")


async def test_a_removed_check_and_unknown_retained_topics_are_cleared(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        # Left by an earlier life: a check and an agent this coordinator does not know.
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            for topic in ("verdict/ghost", "agent/ghost-1"):
                await client.publish(f"{PREFIX}{topic}", b'{"name":"ghost"}', qos=1, retain=True)

        config = write_config(tmp_path, mqtt_section(broker))
        async with (
            subscribed(Subscriber(broker.port, [f"{PREFIX}verdict/+"])) as live,
            start(config, reload_on_sighup=False) as running,
        ):
            await until(
                lambda: has_topics(broker, {"verdict/web"}, {"verdict/ghost", "agent/ghost-1"}),
                "the leftovers cleared",
            )

            names = (*(name for name in CHECK_NAMES if name != "db"), "new")
            (tmp_path / "checks.yaml").write_text(checks_yaml(names))
            assert running.coordinator.reload_checks()
            await until(
                lambda: has_topics(broker, {"verdict/new"}, {"verdict/db"}),
                "db's verdict cleared and the new check's published",
            )
            cleared = [message for message in live.on(f"{PREFIX}verdict/db") if not message.payload]
            assert cleared, "an empty retained payload clears the topic"
            new = live.on(f"{PREFIX}verdict/new")[-1].json()
            assert (new["state"], new["transition_id"]) == ("unknown", None)


async def test_a_broker_restart_gets_the_retained_state_again(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # not persistent: a restart forgets everything
    with broker:
        config = write_config(tmp_path, mqtt_section(broker))
        with structlog.testing.capture_logs() as logs:
            async with start(config, reload_on_sighup=False) as running:
                agent = await connected_agent(running)
                await outcomes(agent, *((name, True) for name in CHECK_NAMES))
                await until(lambda: published(broker, running), "the state published")

                broker.stop()
                await until(
                    lambda: metric_is(running, "vantage_mqtt_connected", 0), "the loss noticed"
                )
                await outcomes(agent, ("web", False), ("db", False))  # while the broker is away
                await until(
                    lambda: running.coordinator.mqtt.failed_attempts >= 2,
                    "attempts at reconnecting to fail",
                )
                assert await running.metric("vantage_mqtt_queued_transitions") == 2

                broker.start()
                state = await until(lambda: published(broker, running), "the state again")
                assert json.loads(state["verdict/web"])["state"] == "global"
                assert json.loads(state["agent/eu-1"])["connected"] is True
                assert state["status"] == b"online"
                await until(
                    lambda: metric_is(running, "vantage_mqtt_queued_transitions", 0),
                    "the queued transitions sent",
                )
                assert await running.metric("vantage_mqtt_connections_total") == 2
                agent.close()
        lost = [entry for entry in logs if entry["event"].startswith("mqtt connection lost")]
        assert len(lost) == 1, "one line per outage, not one per attempt"
        assert lost[0]["log_level"] == "warning"


async def test_a_full_queue_keeps_the_newest_transitions(tmp_path: Path) -> None:
    # A persistent broker and a persistent subscriber session: the broker keeps what is
    # published for the subscriber, whichever of the two reconnects first.
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        config = write_config(tmp_path, mqtt_section(broker, queue_size=3))
        events = f"{PREFIX}events"
        subscriber = Subscriber(broker.port, [events], client_id="queue-test")
        async with subscribed(subscriber), start(config, reload_on_sighup=False) as running:
            agent = await connected_agent(running)
            await outcomes(agent, ("web", True))
            await until(lambda: subscriber.event_ids(events), "the first transition")

            broker.stop()
            await until(lambda: metric_is(running, "vantage_mqtt_connected", 0), "the loss")
            await outcomes(agent, *((name, True) for name in CHECK_NAMES[1:]))  # five more
            ids = recorded_ids(running)
            assert len(ids) == 6
            assert await running.metric("vantage_mqtt_dropped_total") == 2
            assert await running.metric("vantage_mqtt_queued_transitions") == 3

            broker.start()
            await until(
                lambda: subscriber.event_ids(events) == [ids[0], *ids[-3:]],
                "the first transition, then the newest three",
            )
            agent.close()


async def test_a_burst_larger_than_the_feed_is_published_whole(tmp_path: Path) -> None:
    # 1,500 checks turn up in one batch: more transitions at once than the transition
    # feed holds for a watcher (1,024), so the publisher is cut off and catches up from
    # the transition store, without a gap.
    names = tuple(f"c{i}" for i in range(1500))
    with Mosquitto(tmp_path / "broker") as broker:
        config = write_config(tmp_path, mqtt_section(broker), checks=checks_yaml(names))
        events = f"{PREFIX}events"
        async with (
            subscribed(Subscriber(broker.port, [events])) as live,
            start(config, reload_on_sighup=False) as running,
        ):
            agent = await connected_agent(running)
            with structlog.testing.capture_logs() as logs:
                await outcomes(agent, *((name, True) for name in names))
                ids = recorded_ids(running)
                assert len(ids) == len(names)
                await until(lambda: live.event_ids(events) == ids, "all 1,500, in order")
            assert any(entry["event"].startswith("mqtt publisher fell behind") for entry in logs)
            assert await running.metric("vantage_mqtt_dropped_total") == 0
            agent.close()


async def test_a_clean_stop_says_offline(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        config = write_config(tmp_path, mqtt_section(broker))
        async with start(config, reload_on_sighup=False):

            async def online() -> bool:
                return (await state_of(broker)).get("status") == b"online"

            await until(online, "status online")
        assert (await state_of(broker))["status"] == b"offline"


def refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"].startswith("mqtt broker unreachable")]


async def test_username_and_password(tmp_path: Path) -> None:
    (tmp_path / "right").write_text("correct horse\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    with Mosquitto(tmp_path / "broker", users={"vantage": "correct horse"}) as broker:
        section = mqtt_section(broker, username="vantage", password_file="wrong")
        with structlog.testing.capture_logs() as logs:
            async with start(write_config(tmp_path, section), reload_on_sighup=False) as running:
                await until(lambda: refusals(logs), "the refusal logged")
                await until(
                    lambda: running.coordinator.mqtt.failed_attempts >= 3, "more attempts, refused"
                )
                assert await running.metric("vantage_mqtt_connections_total") == 0
        assert len(refusals(logs)) == 1, "one line per outage, not one per attempt"
        assert "not authori" in refusals(logs)[0]["error"].lower()

        section = mqtt_section(broker, username="vantage", password_file="right")
        async with start(write_config(tmp_path, section), reload_on_sighup=False) as running:
            await until(lambda: metric_is(running, "vantage_mqtt_connected", 1), "a connection")


async def test_mqtts_verifies_the_broker(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    with Mosquitto(tmp_path / "broker", tls=tls) as broker:
        url = f"mqtts://localhost:{broker.port}"
        section = mqtt_section(broker, url=url, ca_file=str(tls.ca))
        async with start(write_config(tmp_path, section), reload_on_sighup=False) as running:
            await until(lambda: metric_is(running, "vantage_mqtt_connected", 1), "TLS, trusted")

        section = mqtt_section(broker, url=url)  # the system's CAs do not know the test CA
        with structlog.testing.capture_logs() as logs:
            async with start(write_config(tmp_path, section), reload_on_sighup=False) as running:
                refused = await until(lambda: refusals(logs), "the refusal logged")
                assert "certificate verify failed" in refused[0]["error"]
                assert await running.metric("vantage_mqtt_connected") == 0
