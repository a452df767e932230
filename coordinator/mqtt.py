"""Publishing verdicts, agent presence and transitions to an MQTT broker (aiomqtt).

On when ``mqtt.url`` is configured (``MqttConfig``). Every message is QoS 1, under the
topic prefix ``topic_prefix`` (default ``vantage/``, PREFIX below)::

    PREFIX/status           retained  "online" while connected; "offline" on a clean stop
                                      and, as the connection's last will, when the
                                      coordinator vanishes without one
    PREFIX/verdict/<check>  retained  the check's current verdict with its evidence: a row
                                      of `vantage status --json`, plus transition_id and
                                      transition_at; an empty payload clears it when the
                                      check is removed
    PREFIX/agent/<name>     retained  the agent's presence: a row of `vantage agents --json`
    PREFIX/events                     every verdict transition, in id order: id, check,
                                      previous, state, at, and the verdict after it

The JSON is ``vantage.public_json``'s, the one converter of every public surface. Check
and agent names are single topic levels by construction: both are restricted to
letters, digits, '.', '_' and '-' (``vantage.checks``, the agent service's Hello), so
they never hold '/', '+', '#' or NUL; ``topic_level`` refuses any name that would.

Lifecycle::

    publisher = MqttPublisher(config.mqtt, ...)  # reads password_file, ca_file: ConfigError
    await publisher.run()                        # until cancelled; the broker never stops it
    publisher.checks_changed(change)             # after the coordinator applied new checks

On every connection ``run()`` publishes ``online``; clears the retained verdict and
agent topics under the prefix that name a check or agent this coordinator does not have
(left by a removed check, or by an earlier run); republishes every retained topic (a
broker restarted without persistence has lost them); then sends the transitions queued
while away, oldest first, and new ones as they come. Up to ``WINDOW`` messages are in
flight at once. A transition leaves the queue when the broker acknowledges it; one still
unacknowledged when the connection drops is sent again on the next connection, before
any newer one (so a consumer may see an id twice: de-duplicate by id).

Never in the way of ingest: transitions reach the publisher through the coordinator's
``TransitionFeed`` (a non-blocking hand-off) and wait in a ``TransitionQueue`` of
``queue_size``; when the broker is away, or slower than the transitions, the oldest are
dropped and counted (``vantage_mqtt_dropped_total``). Should the feed cut the publisher
off (a burst larger than its watcher queue), the missing ones are read back from the
transition store. Retained topics are not queued: a change only marks the topic for a
publish of the *current* state, so they cost nothing while away. Agent presence is read
from the fleet once a second (``FLEET_POLL``).

Broker trouble (``aiomqtt.MqttError``, ``OSError``: refused, unreachable, bad
credentials, TLS) is transient: one warning line when an outage starts, reconnection
with jittered backoff (``BACKOFF_MIN`` doubling up to ``BACKOFF_MAX``), one info line
when connected again. Nothing else is caught: anything else is a bug.

Metrics (on the coordinator's registry): ``vantage_mqtt_connected``,
``vantage_mqtt_connections_total``, ``vantage_mqtt_published_total{topic}`` (``status``,
``verdict``, ``agent``, ``event``; acknowledged by the broker),
``vantage_mqtt_dropped_total``, ``vantage_mqtt_queued_transitions``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vantage.checks import Seconds
from vantage.configfile import ConfigError, resolve_path
from vantage.durations import duration_within
from vantage.logs import get_logger
from vantage.public_json import message_json, timestamp_text

from .engine import VerdictEngine
from .fleet import AgentFleet, AgentInfo
from .registry import CheckChange, CheckRegistry
from .store import RecordedTransition
from .transitions import TransitionFeed, TransitionLog, WatcherOverflow
from .verdicts import Verdict
from .wire import agent_to_pb, timestamp, transition_to_pb, verdict_to_pb

__all__ = [
    "MqttConfig",
    "MqttPublisher",
    "Topics",
    "TransitionQueue",
    "agent_payload",
    "broker_address",
    "event_payload",
    "topic_level",
    "verdict_payload",
]

log = get_logger("coordinator.mqtt")
# paho-mqtt's own lines ("failed to receive on socket...") would repeat, per attempt, what
# the publisher logs once per outage.
_client_log = logging.getLogger("coordinator.mqtt.client")
_client_log.setLevel(logging.CRITICAL)

DEFAULT_PREFIX = "vantage/"
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
WINDOW = 64  # messages in flight (sent, not yet acknowledged) at once
ACK_TIMEOUT = 30.0  # a broker that acknowledges nothing for this long is reconnected to
BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0
STABLE = 30.0  # a connection that lasted this long ends an outage; shorter ones do not
FLEET_POLL = 1.0
SWEEP_QUIET = 0.5  # retained messages come right after SUBACK; this much silence ends them
SWEEP_MAX = 5.0
STOP_GRACE = 1.0  # for "offline" on a clean stop
FLUSH_POLL = 0.05  # while a stopping coordinator waits for the broker to take the rest
CATCH_UP_PAGE = 256
ONLINE = b"online"
OFFLINE = b"offline"
KINDS = ("status", "verdict", "agent", "event")
# Topic separators, wildcards, and control characters (NUL is forbidden in topics).
_UNSAFE_IN_LEVEL = frozenset("/+#") | frozenset(map(chr, [*range(32), 127]))


# -- configuration -----------------------------------------------------------------------


class MqttConfig(BaseModel):
    """The ``mqtt:`` mapping of the coordinator's configuration; off without ``url``.

    ``password_file`` and ``ca_file`` are read when the publisher is made
    (``MqttPublisher``: ``ConfigError`` naming the file); relative paths resolve against
    the configuration file's directory (``resolved``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    url: str | None = None
    topic_prefix: str = DEFAULT_PREFIX
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    username: str | None = Field(default=None, min_length=1)
    password_file: Path | None = None
    ca_file: Path | None = None
    queue_size: int = Field(default=DEFAULT_QUEUE_SIZE, ge=1, le=1_000_000)
    keepalive: Seconds = 60.0

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @field_validator("url")
    @classmethod
    def _is_broker_url(cls, url: str | None) -> str | None:
        if url is not None:
            broker_address(url)
        return url

    @field_validator("topic_prefix")
    @classmethod
    def _is_prefix(cls, prefix: str) -> str:
        for char, what in (("+", "'+'"), ("#", "'#'"), ("\0", "NUL")):
            if char in prefix:
                raise ValueError(f"{prefix!r} holds {what}, a wildcard or forbidden in topics")
        if prefix.startswith("$"):
            raise ValueError(f"{prefix!r}: topics starting with '$' belong to the broker")
        if len(prefix.encode()) > 1024:
            raise ValueError("longer than 1024 bytes")
        # "site/vantage" means the levels under it: "site/vantage/verdict/web".
        return prefix if not prefix or prefix.endswith("/") else prefix + "/"

    @field_validator("client_id", "username")
    @classmethod
    def _no_nul(cls, text: str | None) -> str | None:
        if text is not None and "\0" in text:
            raise ValueError("holds a NUL character")
        return text

    @field_validator("keepalive")
    @classmethod
    def _keepalive_in_range(cls, seconds: float) -> float:
        return float(round(duration_within(seconds, 1, 65535)))

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file is set without a username")
        if self.ca_file is not None and (self.url is None or not broker_address(self.url)[2]):
            raise ValueError("ca_file is only used with an mqtts:// url")
        return self

    def resolved(self, base: Path) -> MqttConfig:
        """The same settings with relative ``password_file`` and ``ca_file`` under ``base``."""
        return self.model_copy(
            update={
                "password_file": resolve_path(base, self.password_file),
                "ca_file": resolve_path(base, self.ca_file),
            }
        )


def broker_address(url: str) -> tuple[str, int, bool]:
    """``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]`` -> (host, port, TLS or not).

    ValueError, one line, for anything else (the url is not repeated when it carries
    credentials).
    """
    shape = "is not mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port that is no number or out of range, a bad IPv6
        raise ValueError(f"{url!r} {shape} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{url!r} {shape}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "the url carries credentials: set mqtt.username and mqtt.password_file instead"
        )
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a broker url has no path, query or fragment")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is no broker's port")
    return parts.hostname, port or DEFAULT_PORTS[scheme], scheme == "mqtts"


# -- topics and payloads -----------------------------------------------------------------


def topic_level(name: str) -> str:
    """``name`` as one topic level; ValueError when it is empty or holds '/', '+', '#'
    or a control character such as NUL (check and agent names never do: see the module
    docstring)."""
    if not name or not _UNSAFE_IN_LEVEL.isdisjoint(name):
        raise ValueError(f"{name!r} cannot be one MQTT topic level")
    return name


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names under one prefix (``MqttConfig.topic_prefix``, normalised)."""

    prefix: str = DEFAULT_PREFIX

    @property
    def status(self) -> str:
        return f"{self.prefix}status"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    def verdict(self, check: str) -> str:
        return f"{self.prefix}verdict/{topic_level(check)}"

    def agent(self, name: str) -> str:
        return f"{self.prefix}agent/{topic_level(name)}"

    @property
    def retained_filters(self) -> tuple[str, str]:
        """Subscription filters matching every verdict and agent topic."""
        return f"{self.prefix}verdict/+", f"{self.prefix}agent/+"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """``PREFIX/verdict/web`` -> ("verdict", "web"); None for any other topic."""
        if not topic.startswith(self.prefix):
            return None
        kind, _, name = topic[len(self.prefix) :].partition("/")
        if kind not in ("verdict", "agent") or not name or "/" in name:
            return None
        return kind, name


def verdict_payload(
    verdict: Verdict, labels: Mapping[str, str], last: RecordedTransition | None
) -> bytes:
    """The retained verdict: a ``vantage status --json`` row, plus the id and time of
    ``last``, the transition that put the check in its state (null before any)."""
    body = message_json(verdict_to_pb(verdict, labels))
    body["transition_id"] = None if last is None else last.id
    body["transition_at"] = None if last is None else timestamp_text(timestamp(last.transition.at))
    return _dumps(body)


def event_payload(recorded: RecordedTransition, labels: Mapping[str, str]) -> bytes:
    """One transition as the JSON API's watch streams it (id, check, previous, at,
    verdict), plus ``state``: the state entered, the verdict's."""
    body = message_json(transition_to_pb(recorded, labels))
    body["state"] = body["verdict"]["state"]
    return _dumps(body)


def agent_payload(agent: AgentInfo) -> bytes:
    """The retained presence: a ``vantage agents --json`` row."""
    return _dumps(message_json(agent_to_pb(agent)))


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


# -- the queue ---------------------------------------------------------------------------


class TransitionQueue:
    """Transitions on their way to the broker, in id order: waiting, then in flight.

    At most ``capacity`` wait; ``put`` on a full queue drops the oldest waiting one.
    ``take`` hands out the next to send, which is in flight until ``acked``. When a
    connection ends, ``requeue`` puts every unacknowledged one back in front of the
    waiting ones (they are older), dropping the oldest if that overfills the queue.
    ``dropped`` counts every drop.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a queue holds at least one transition")
        self.capacity = capacity
        self.dropped = 0
        self._waiting: deque[RecordedTransition] = deque()
        self._in_flight: dict[int, RecordedTransition] = {}

    def __len__(self) -> int:
        """Waiting and in flight."""
        return len(self._waiting) + len(self._in_flight)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def put(self, recorded: RecordedTransition) -> int:
        """Queue ``recorded`` (newer than any queued); returns how many were dropped."""
        dropped = 0
        if len(self._waiting) >= self.capacity:
            self._waiting.popleft()
            dropped = 1
        self._waiting.append(recorded)
        self.dropped += dropped
        return dropped

    def take(self) -> RecordedTransition | None:
        """The oldest waiting transition, now in flight; None when none waits."""
        if not self._waiting:
            return None
        recorded = self._waiting.popleft()
        self._in_flight[recorded.id] = recorded
        return recorded

    def acked(self, transition_id: int) -> None:
        self._in_flight.pop(transition_id, None)

    def requeue(self) -> int:
        """Unacknowledged transitions wait again, first; returns how many were dropped."""
        for recorded in sorted(self._in_flight.values(), key=lambda r: r.id, reverse=True):
            self._waiting.appendleft(recorded)
        self._in_flight.clear()
        dropped = max(0, len(self._waiting) - self.capacity)
        for _ in range(dropped):
            self._waiting.popleft()
        self.dropped += dropped
        return dropped


# -- metrics -----------------------------------------------------------------------------


class MqttMetrics:
    """The publisher's series, on the coordinator's registry."""

    def __init__(self, registry: CollectorRegistry, queue: TransitionQueue) -> None:
        self.connected = Gauge(
            "vantage_mqtt_connected",
            "1 while the coordinator is connected to its MQTT broker, else 0.",
            registry=registry,
        )
        self.connections = Counter(
            "vantage_mqtt_connections",
            "Connections made to the MQTT broker (the first and every reconnection).",
            registry=registry,
        )
        self.published = Counter(
            "vantage_mqtt_published",
            "MQTT messages the broker acknowledged, by topic (status, verdict, agent, event).",
            ["topic"],
            registry=registry,
        )
        for kind in KINDS:
            self.published.labels(kind)
        self.dropped = Counter(
            "vantage_mqtt_dropped",
            "Transitions never published to MQTT: the oldest, dropped from a full queue "
            "while the broker was away or slow.",
            registry=registry,
        )
        queued = Gauge(
            "vantage_mqtt_queued_transitions",
            "Transitions waiting for the MQTT broker or in flight to it.",
            registry=registry,
        )
        queued.set_function(lambda: len(queue))


# -- the publisher -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    kind: str  # one of KINDS
    topic: str
    payload: bytes
    retain: bool
    name: str = ""  # the check or agent of a retained topic
    transition_id: int = 0  # of an event


class MqttPublisher:
    """Keeps an MQTT broker up to date with verdicts, agents and transitions.

    Reads the coordinator's live state: ``engine`` (verdicts, impaired agents),
    ``fleet``, ``checks`` (labels), ``history`` (transition ids, and the store to catch
    up from) and ``feed`` (new transitions). Raises ``ConfigError`` (one line) when
    ``password_file`` or ``ca_file`` cannot be used. Single-threaded: event loop only.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        engine: VerdictEngine,
        fleet: AgentFleet,
        checks: CheckRegistry,
        history: TransitionLog,
        feed: TransitionFeed,
        registry: CollectorRegistry,
    ) -> None:
        if config.url is None:
            raise ValueError("MQTT is off without a url")
        self.config = config
        self._host, self._port, tls = broker_address(config.url)
        self._password = _read_password(config.password_file)
        self._tls = _tls_context(config.ca_file) if tls else None
        # Unique by default: two clients with one id take the connection from each other.
        self._client_id = config.client_id or (
            f"vantage-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        )
        self.topics = Topics(config.topic_prefix)
        self._engine = engine
        self._fleet = fleet
        self._checks = checks
        self._history = history
        self._feed = feed
        self.queue = TransitionQueue(config.queue_size)
        self._metrics = MqttMetrics(registry, self.queue)

        self._taken = history.last_id  # transitions up to this id are not ours to publish
        self._last_transition: dict[str, RecordedTransition] = {}
        # Retained topics, as (kind, name) with kind "verdict" or "agent", to publish the
        # current state of; a dict as an ordered set.
        self._dirty: dict[tuple[str, str], None] = {}
        # Retained topics the broker may hold for a name this coordinator does not know
        # (any more): cleared with an empty payload.
        self._stale: set[tuple[str, str]] = set()
        self._presence: dict[str, tuple[object, ...]] = {}
        self._wake = asyncio.Event()
        self._connected = False
        self._down_since: float | None = None  # monotonic, while an outage lasts
        self._failures = 0  # in a row, for the backoff (a short-lived connection ends none)
        self._failed_attempts = 0  # attempts to connect that failed, this outage
        self._dropping = False

    # -- what the coordinator calls ------------------------------------------------------

    @property
    def failed_attempts(self) -> int:
        """Attempts to connect that failed in the current outage (0 while connected)."""
        return self._failed_attempts

    async def run(self) -> None:
        """Publish until cancelled (then say ``offline`` if connected)."""
        log.info(
            "mqtt publishing",
            broker=f"{self._host}:{self._port}",
            tls=self._tls is not None,
            topic_prefix=self.topics.prefix,
            client_id=self._client_id,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_transitions())
            tasks.create_task(self._follow_fleet())
            tasks.create_task(self._stay_connected())

    async def flush(self, within: float) -> bool:
        """Wait until every transition recorded so far is acknowledged by the broker and
        every retained topic is up to date, for at most ``within`` seconds; False when
        something is still waiting then (or the broker is away: it stays queued, and is
        lost with the process)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self._taken < self._history.last_id or len(self.queue) or self._dirty:
                    if not self._connected:
                        return False
                    # Polled: what is left is spread over the feed, the queue, the broker's
                    # acknowledgements and the retained topics; this runs once, at a stop.
                    await asyncio.sleep(FLUSH_POLL)
                return True
        return False

    def checks_changed(self, change: CheckChange) -> None:
        """A new check set was applied: removed checks' verdicts are cleared, new and
        changed ones (their labels) published."""
        for name in change.removed:
            self._last_transition.pop(name, None)
            self._stale.add(("verdict", name))
            self._dirty["verdict", name] = None
        for check in change.upserts:
            self._dirty["verdict", check.name] = None
        self._wake.set()

    # -- transitions and presence in -----------------------------------------------------

    async def _follow_transitions(self) -> None:
        while True:
            # Subscribing and reading the last id in one step: the watcher has everything
            # after it, the store everything up to it that is not queued yet.
            with self._feed.subscribe(counted=False) as watcher:
                await self._catch_up(self._history.last_id)
                try:
                    async for recorded in watcher:
                        self._take(recorded)
                except WatcherOverflow:
                    log.warning(
                        "mqtt publisher fell behind the transition feed; reading the "
                        "rest from the store",
                        after_id=self._taken,
                    )

    async def _catch_up(self, upto: int) -> None:
        store = self._history.store
        while self._taken < upto:
            page = store.after(self._taken, upto=upto, limit=CATCH_UP_PAGE)
            first = page[0].id if page else upto + 1
            if first > self._taken + 1:  # not kept (pruned, or a failed store write)
                self._metrics.dropped.inc(first - self._taken - 1)
                self._taken = first - 1
            for recorded in page:
                self._take(recorded)
            await asyncio.sleep(0)

    def _take(self, recorded: RecordedTransition) -> None:
        if recorded.id <= self._taken:
            return
        self._taken = recorded.id
        check = recorded.transition.check
        if check in self._checks:  # else removed since: its topic is cleared, not set
            self._last_transition[check] = recorded
            self._dirty["verdict", check] = None
        dropped = self.queue.put(recorded)
        if dropped:
            self._dropped(dropped)
        self._wake.set()

    def _dropped(self, count: int) -> None:
        self._metrics.dropped.inc(count)
        if not self._dropping:
            self._dropping = True
            log.warning(
                "mqtt queue full: dropping the oldest transitions",
                queue_size=self.queue.capacity,
                connected=self._connected,
            )

    async def _follow_fleet(self) -> None:
        while True:
            self._poll_fleet()
            await asyncio.sleep(FLEET_POLL)

    def _poll_fleet(self) -> None:
        changed = False
        for agent in self._fleet.agents(self._engine.impaired()):
            seen = (agent.region, agent.connected, agent.impaired, agent.connected_since)
            if self._presence.get(agent.name) != seen:
                self._presence[agent.name] = seen
                self._dirty["agent", agent.name] = None
                changed = True
        if changed:
            self._wake.set()

    # -- the connection ------------------------------------------------------------------

    async def _stay_connected(self) -> None:
        while True:
            connected_at: float | None = None
            failure: BaseException | None = None
            try:
                async with self._connection() as client:
                    connected_at = time.monotonic()
                    self._on_connected()
                    await self._session(client)
            except* (aiomqtt.MqttError, OSError) as group:
                failure = _first_leaf(group)
            finally:
                self._connected = False
                self._metrics.connected.set(0)
                dropped = self.queue.requeue()
                if dropped:
                    self._dropped(dropped)
            if _cancelling():
                # Closing the connection failed while stopping: stop all the same.
                raise asyncio.CancelledError
            self._on_failure(failure, connected_at)
            await asyncio.sleep(self._backoff())

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiomqtt.Client]:
        """A connected client, closed on the way out; stopped (cancelled), it says
        ``offline`` first. An attempt cut short by a stop is let finish and closed:
        aiomqtt would leave its socket open."""
        client = self._client()
        attempt = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                async with asyncio.timeout(STOP_GRACE):
                    await attempt
                    client.timeout = STOP_GRACE
                    await client.__aexit__(None, None, None)
            raise
        try:
            yield client
        except asyncio.CancelledError:
            await self._say_offline(client)
            client.timeout = STOP_GRACE  # how long to wait for the broker to see us off
            raise
        finally:
            await client.__aexit__(None, None, None)

    def _client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=self.config.username,
            password=self._password,
            identifier=self._client_id,
            will=aiomqtt.Will(self.topics.status, OFFLINE, qos=1, retain=True),
            clean_session=True,
            keepalive=int(self.config.keepalive),
            timeout=ACK_TIMEOUT,
            max_inflight_messages=WINDOW,
            tls_context=self._tls,
            logger=_client_log,
        )
        client.pending_calls_threshold = WINDOW + 1  # aiomqtt warns above it
        return client

    def _on_connected(self) -> None:
        self._connected = True
        self._metrics.connections.inc()
        self._metrics.connected.set(1)
        down_for = None if self._down_since is None else time.monotonic() - self._down_since
        log.info(
            "mqtt connected",
            broker=f"{self._host}:{self._port}",
            down_s=None if down_for is None else round(down_for, 1),
            failed_attempts=self._failed_attempts,
            queued=len(self.queue),
            dropped_total=self.queue.dropped,
        )
        self._down_since = None
        self._failed_attempts = 0
        self._dropping = False

    def _on_failure(self, failure: BaseException | None, connected_at: float | None) -> None:
        now = time.monotonic()
        if connected_at is not None and now - connected_at >= STABLE:
            self._failures = 0
        self._failures += 1
        if connected_at is None:
            self._failed_attempts += 1
        # aiomqtt's "Disconnected during message iteration" names its cause beneath.
        cause = None if failure is None else failure.__cause__ or failure
        error = str(cause) if cause is not None else "the connection ended"
        if self._down_since is None:
            self._down_since = now
            what = "mqtt connection lost" if connected_at is not None else "mqtt broker unreachable"
            log.warning(
                f"{what}; retrying in the background",
                broker=f"{self._host}:{self._port}",
                error=error,
                queued=len(self.queue),
            )
        else:
            log.debug("mqtt connection attempt failed", error=error, failed=self._failed_attempts)

    def _backoff(self) -> float:
        ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(self._failures - 1, 16))
        return ceiling * random.uniform(0.5, 1.0)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        # On a clean stop only: the last will says it when the coordinator vanishes.
        with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                await client.publish(self.topics.status, OFFLINE, qos=1, retain=True)

    # -- one connection ------------------------------------------------------------------

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topics.status, ONLINE, qos=1, retain=True)
        self._metrics.published.labels("status").inc()
        await self._sweep(client)
        self._mark_everything()
        window = asyncio.Semaphore(WINDOW)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._until_disconnected(client))
            while True:
                await window.acquire()
                message = await self._next_message()
                tasks.create_task(self._deliver(client, message, window))

    async def _sweep(self, client: aiomqtt.Client) -> None:
        """Mark retained verdict and agent topics of unknown names for clearing."""
        filters = self.topics.retained_filters
        granted = await client.subscribe([(topic, 1) for topic in filters])
        if any(_refused(code) for code in granted):  # an ACL that allows publishing only
            await client.unsubscribe(list(filters))
            log.info("mqtt broker refused the subscription; stale retained topics stay")
            return
        found: list[tuple[str, str]] = []
        messages = aiter(client.messages)
        deadline = time.monotonic() + SWEEP_MAX
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(anext(messages), min(SWEEP_QUIET, left))
            except TimeoutError:
                break
            parsed = self.topics.parse(message.topic.value)
            if message.retain and message.payload and parsed is not None:
                found.append(parsed)
        await client.unsubscribe(list(filters))
        self._stale.update(retained for retained in found if not self._known(*retained))

    def _mark_everything(self) -> None:
        self._dirty.update(dict.fromkeys(("verdict", name) for name in self._checks.names()))
        self._dirty.update(dict.fromkeys(("agent", agent.name) for agent in self._fleet.agents()))
        self._dirty.update(dict.fromkeys(self._stale))

    async def _until_disconnected(self, client: aiomqtt.Client) -> None:
        # Nothing is subscribed after the sweep: iterating only waits for the connection
        # to end (MqttError), ignoring a straggler of the sweep.
        async for _ in client.messages:
            pass

    async def _next_message(self) -> _Message:
        while True:
            self._wake.clear()
            message = self._pending_message()
            if message is not None:
                return message
            await self._wake.wait()

    def _pending_message(self) -> _Message | None:
        """The next message to send: retained state first, then transitions in order."""
        while self._dirty:
            (kind, name), _ = self._dirty.popitem()
            message = self._retained_message(kind, name)
            if message is not None:
                return message
        recorded = self.queue.take()
        if recorded is None:
            return None
        transition = recorded.transition
        return _Message(
            "event",
            self.topics.events,
            event_payload(recorded, self._labels(transition.check)),
            retain=False,
            transition_id=recorded.id,
        )

    def _retained_message(self, kind: str, name: str) -> _Message | None:
        """The retained topic of ``kind`` ("verdict" or "agent") for ``name``: its current
        state, an empty payload that clears it when ``name`` is stale, None when it is
        neither known nor stale or cannot be a topic."""
        payload = self._payload(kind, name)
        if payload is None and (kind, name) not in self._stale:
            return None
        try:
            topic = self.topics.verdict(name) if kind == "verdict" else self.topics.agent(name)
        except ValueError as exc:
            log.error("mqtt: retained topic not published", kind=kind, name=name, error=str(exc))
            return None
        return _Message(kind, topic, payload or b"", retain=True, name=name)

    def _payload(self, kind: str, name: str) -> bytes | None:
        """The JSON of ``name``'s current state; None when this coordinator does not
        know it."""
        if kind == "verdict":
            verdict = self._engine.verdict(name)
            if verdict is None:
                return None
            return verdict_payload(verdict, self._labels(name), self._last_transition.get(name))
        agent = self._fleet.get(name)
        if agent is None:
            return None
        return agent_payload(replace(agent, impaired=name in self._engine.impaired()))

    def _known(self, kind: str, name: str) -> bool:
        if kind == "verdict":
            return self._engine.verdict(name) is not None
        return self._fleet.get(name) is not None

    def _labels(self, check: str) -> Mapping[str, str]:
        spec = self._checks.get(check)
        return {} if spec is None else spec.labels

    async def _deliver(
        self, client: aiomqtt.Client, message: _Message, window: asyncio.Semaphore
    ) -> None:
        # An error ends the connection (the TaskGroup); the message is sent again on the
        # next one: a transition from the queue, retained state as part of everything.
        await client.publish(message.topic, message.payload, qos=1, retain=message.retain)
        window.release()
        self._metrics.published.labels(message.kind).inc()
        if message.kind == "event":
            self.queue.acked(message.transition_id)
        elif not message.payload and not self._known(message.kind, message.name):
            self._stale.discard((message.kind, message.name))  # cleared, and still unknown


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"mqtt.password_file {path}: cannot read: {why}") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"mqtt.password_file {path}: empty")
    return password


class _TlsSocket(ssl.SSLSocket):
    """Closes itself when its handshake fails: paho-mqtt (2.2) drops such a socket
    without closing it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verifying the broker's certificate and name: against ``ca_file``, or the
    system's CAs without one."""
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except ssl.SSLError as exc:  # an OSError too: first
        why = exc.reason or str(exc)
        raise ConfigError(f"mqtt.ca_file {ca_file}: not a PEM CA certificate ({why})") from None
    except OSError as exc:
        raise ConfigError(f"mqtt.ca_file {ca_file}: cannot read: {exc.strerror}") from None
    context.sslsocket_class = _TlsSocket
    return context


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _refused(code: int | ReasonCode) -> bool:
    """A SUBACK's failure: 0x80 and up (a plain int with MQTT 3.1.1)."""
    return code.is_failure if isinstance(code, ReasonCode) else code >= 0x80


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
