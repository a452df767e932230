"""A real MQTT broker (Debian's mosquitto) and aiomqtt subscribers, for the MQTT tests.

``Mosquitto`` runs a private broker on a free loopback port with a configuration of its
own in a temporary directory (never the system service): optionally persistent (the
broker keeps retained messages and persistent sessions across a restart), with
password authentication, or with TLS. ``stop()`` then ``start()`` restarts it on the same
port. It is always stopped when its ``with`` block ends, however the test ended.

``Subscriber`` collects every message on its topics in the background and reconnects by
itself; given a client id it holds a persistent session (clean_session false), so the
broker keeps QoS 1 messages for it while it is away. ``retained()`` reads what a fresh
subscriber gets: the broker's retained messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from pki import TestCA

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, hosts: Iterable[str] = ("localhost", "127.0.0.1")) -> TlsFiles:
    """A CA made for the test and a server certificate it signed for ``hosts``."""
    ca = TestCA(directory, "vantage mqtt test CA")
    broker = ca.issue("broker", hosts=hosts)
    return TlsFiles(ca.cert_file, broker.chain, broker.key)


class Mosquitto:
    """A private mosquitto on 127.0.0.1:``port`` (a free one by default)."""

    def __init__(
        self,
        directory: Path,
        *,
        persistence: bool = False,
        users: dict[str, str] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        lines = [f"listener {self.port} 127.0.0.1", "log_dest stderr", "log_type all"]
        # mosquitto queues at most 1,000 QoS 1 messages for a subscriber that reads slower
        # than they come and drops the rest; the tests count on receiving every one.
        lines.append("max_queued_messages 100000")
        if os.geteuid() == 0:
            lines.append("user root")  # else it would switch to the "mosquitto" user
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/"]
        if users:
            passwords = self.dir / "passwords"
            passwords.write_text("".join(f"{user}:{pw}\n" for user, pw in users.items()))
            passwords.chmod(0o600)
            subprocess.run([MOSQUITTO_PASSWD, "-U", str(passwords)], check=True)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        with self.log.open("ab") as out:
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not accepts(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mosquitto did not start: {self.log.read_text(errors='replace')}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGTERM (a persistent broker saves its state), then wait; SIGKILL if stuck."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """Every message on ``topics`` (QoS 1) in ``messages``, in arrival order.

    ``run()`` until cancelled, reconnecting by itself. With ``client_id``, a persistent
    session: messages published while it is away are kept for it by the broker.
    """

    def __init__(
        self, port: int, topics: Iterable[str] = ("#",), client_id: str | None = None
    ) -> None:
        self.port = port
        self.topics = list(topics)
        self.client_id = client_id
        self.messages: list[Received] = []
        self.connections = 0

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.client_id,
                    clean_session=self.client_id is None,
                ) as client:
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    self.connections += 1
                    async for message in client.messages:
                        payload = message.payload
                        assert isinstance(payload, bytes)
                        self.messages.append(Received(message.topic.value, payload, message.retain))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def on(self, topic: str) -> list[Received]:
        return [message for message in list(self.messages) if message.topic == topic]

    def event_ids(self, topic: str) -> list[int]:
        """The ids of the transitions on ``topic`` (an events topic), in arrival order."""
        return [message.json()["id"] for message in self.on(topic)]


class SubscriberThread:
    """A ``Subscriber`` on an event loop of its own, for tests that block (e2e)."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.subscriber.run())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    def __enter__(self) -> Subscriber:
        self._thread.start()
        return self.subscriber

    def __exit__(self, *exc_info: object) -> None:
        def cancel() -> None:
            if self._task is not None:
                self._task.cancel()

        self._loop.call_soon_threadsafe(cancel)
        self._thread.join(timeout=10)


async def retained(port: int, topic: str = "#", quiet: float = 0.5) -> dict[str, bytes]:
    """What a fresh subscriber to ``topic`` gets: the retained messages, by topic."""
    found: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic, qos=1)
        messages = aiter(client.messages)
        while True:
            try:
                message = await asyncio.wait_for(anext(messages), quiet)
            except TimeoutError:
                return found
            if message.retain:
                payload = message.payload
                assert isinstance(payload, bytes)
                found[message.topic.value] = payload
