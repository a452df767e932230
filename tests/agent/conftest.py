"""Shared fixtures: loopback servers on port 0 and test certificates made with openssl."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from vantage_proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not built for every platform
    uvloop = None

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[..., Awaitable[int]]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every agent test on asyncio's own loop and on uvloop, which the agent uses
    in production when it is installed."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start asyncio servers on port 0: ``port = await serve(handler, tls=None, host=...)``.

    Every server, connection and handler is closed when the test ends, so no socket
    outlives it (filterwarnings=error would turn a ResourceWarning into a failure).
    """
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def start(
        handler: Handler, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> int:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            writers.append(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, ssl.SSLError):
                pass  # the probe hung up first, as probes do
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, host, 0, ssl=tls)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for writer in writers:
        writer.close()
    for server in servers:
        await server.wait_closed()
    # Let transports closed above run their connection_lost callbacks.
    for _ in range(3):
        await asyncio.sleep(0)


Until = Callable[[Callable[[], bool]], Awaitable[None]]


@pytest.fixture
def until() -> Until:
    """``await until(condition)``: poll state owned by the code under test until the
    condition holds; the test fails after 5 seconds."""

    async def poll(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not condition():  # noqa: ASYNC110 - nothing to wait on but state
                await asyncio.sleep(0.01)

    return poll


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying context that trusts exactly this (self-signed) certificate."""
        context = ssl.create_default_context(cafile=str(self.cert))
        return context


_CA_CONFIG = """\
[ca]
default_ca = test
[test]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = anything
copy_extensions = copy
unique_subject = no
[anything]
commonName = supplied
"""


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    """Self-signed certificates for 127.0.0.1 and localhost: "valid" and "expired"."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command makes the test certificates: `make test` installs it")
    directory = tmp_path_factory.mktemp("certs")
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(directory, "req", "-x509", *newkey, "-keyout", "valid.key", "-out", "valid.pem",
             "-days", "2", *subject)  # fmt: skip
    # `req -x509` cannot back-date; `ca -selfsign` takes explicit validity dates.
    (directory / "ca.cnf").write_text(_CA_CONFIG)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    _openssl(directory, "req", "-new", *newkey, "-keyout", "expired.key", "-out", "expired.csr",
             *subject)  # fmt: skip
    _openssl(directory, "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile",
             "expired.key", "-in", "expired.csr", "-out", "expired.pem", "-notext",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z")  # fmt: skip
    return {
        name: Cert(directory / f"{name}.pem", directory / f"{name}.key")
        for name in ("valid", "expired")
    }


class FakeCoordinator(agent_pb2_grpc.AgentServiceServicer):
    """A real gRPC AgentService on 127.0.0.1 that records what agents send.

    Checks the token, answers Hello with Welcome(last_seq) and the full assignment set;
    when ``ack`` is set it acknowledges every result batch and answers every heartbeat,
    as the real coordinator does, and otherwise stays silent.
    """

    def __init__(
        self,
        *,
        token: str,
        checks: list[common_pb2.Check],
        ack: bool,
        last_seq: int,
        heartbeat_ms: int,
    ) -> None:
        self.token = token
        self.checks = checks
        self.ack = ack
        self.last_seq = last_seq
        self.heartbeat_ms = heartbeat_ms
        self.hellos: list[agent_pb2.Hello] = []
        self.batches: list[list[agent_pb2.ProbeResult]] = []
        self.heartbeats = 0
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self.outgoing: asyncio.Queue[agent_pb2.CoordinatorMessage] = asyncio.Queue()

    @property
    def results(self) -> list[agent_pb2.ProbeResult]:
        return [result for batch in self.batches for result in batch]

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        first = await context.read()
        self.hellos.append(first.hello)
        welcome = agent_pb2.Welcome(
            coordinator_version="test",
            heartbeat_interval_ms=self.heartbeat_ms,
            last_seq=self.last_seq,
        )
        await context.write(agent_pb2.CoordinatorMessage(welcome=welcome))
        assignments = agent_pb2.Assignments(full=True, checks=self.checks)
        await context.write(agent_pb2.CoordinatorMessage(assignments=assignments))
        forward = asyncio.create_task(self._forward(context))
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                kind = message.WhichOneof("kind")
                if kind == "heartbeat":
                    self.heartbeats += 1
                    if self.ack:
                        answer = agent_pb2.Heartbeat(sent_unix_us=1)
                        await context.write(agent_pb2.CoordinatorMessage(heartbeat=answer))
                elif kind == "results":
                    batch = list(message.results.results)
                    self.batches.append(batch)
                    if self.ack:
                        ack = agent_pb2.ResultAck(seq=batch[-1].seq)
                        await context.write(agent_pb2.CoordinatorMessage(ack=ack))
        finally:
            forward.cancel()

    async def _forward(self, context: Any) -> None:
        while True:
            await context.write(await self.outgoing.get())

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


StartCoordinator = Callable[..., Awaitable[FakeCoordinator]]


@pytest.fixture
async def coordinator() -> AsyncIterator[StartCoordinator]:
    """``fake = await coordinator(token=..., checks=[...], ack=True, last_seq=0,
    heartbeat_ms=10_000, port=0)`` starts a FakeCoordinator; all stop at teardown."""
    started: list[FakeCoordinator] = []

    async def start(
        *,
        token: str = "s3cret",
        checks: list[common_pb2.Check] | None = None,
        ack: bool = True,
        last_seq: int = 0,
        heartbeat_ms: int = 10_000,
        port: int = 0,
    ) -> FakeCoordinator:
        fake = FakeCoordinator(
            token=token, checks=checks or [], ack=ack, last_seq=last_seq, heartbeat_ms=heartbeat_ms
        )
        server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(fake, server)
        fake.port = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        fake.server = server
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()
