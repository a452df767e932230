"""Shared fixtures: loopback servers on port 0, a fake coordinator and a test PKI."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
from pki import DAY, LOOPBACK, Issued, TestCA, self_signed

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


BlockingTlsServer = Callable[[ssl.SSLContext, bytes], int]


@pytest.fixture
def blocking_tls_server() -> Iterator[BlockingTlsServer]:
    """``port = blocking_tls_server(context, response)``: a TLS server on a thread with
    blocking sockets, answering every request with ``response``.

    asyncio's own TLS server drops the alert OpenSSL queues when a server-side handshake
    fails (it aborts the transport instead of flushing it); a blocking socket sends it,
    as nginx or any other real server does. Tests of client certificates need that alert.
    """
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(listener: socket.socket, context: ssl.SSLContext, response: bytes) -> None:
        with listener:
            while not stop.is_set():
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                # A failed handshake closes the wrapped socket at once; a duplicate
                # keeps the connection open until the client has read the alert and
                # hung up, so that the client sees the alert rather than a reset.
                with connection, connection.dup() as spare:
                    connection.settimeout(5)
                    spare.settimeout(5)
                    try:
                        with context.wrap_socket(connection, server_side=True) as tls:
                            tls.recv(65536)
                            tls.sendall(response)
                    except (ssl.SSLError, OSError):
                        with contextlib.suppress(OSError):
                            while spare.recv(65536):
                                pass

    def start(context: ssl.SSLContext, response: bytes) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.02)
        thread = threading.Thread(target=run, args=(listener, context, response), daemon=True)
        thread.start()
        threads.append(thread)
        return int(listener.getsockname()[1])

    yield start
    stop.set()
    for thread in threads:
        thread.join()


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    """A test PKI (``tests/pki.py``). ``certs["ca"].pem`` is the root every other
    certificate but "self_signed" chains to:

    - "valid": for 127.0.0.1 and localhost, 90 days left;
    - "expired": for 127.0.0.1 and localhost, expired yesterday;
    - "wrong_host": valid, but for wrong.example only;
    - "self_signed": for 127.0.0.1 and localhost, signed by itself;
    - "expiring": for 127.0.0.1 and localhost, 3 days and an hour left;
    - "chained": for 127.0.0.1 and localhost, 90 days left, issued by an intermediate
      that expires in 10 days; servers present both;
    - "client": a client certificate (clientAuth) for CN=probe.
    """
    directory = tmp_path_factory.mktemp("certs")
    root = TestCA(directory)
    intermediate = root.intermediate("Vantage Test Intermediate", lifetime=(-DAY, 10 * DAY))
    return {
        "ca": root.issued,
        "valid": root.issue("valid.test", hosts=LOOPBACK),
        "expired": root.issue("expired.test", hosts=LOOPBACK, lifetime=(-30 * DAY, -DAY)),
        "wrong_host": root.issue("wrong-host.test", hosts=("wrong.example",)),
        "self_signed": self_signed(directory, "self-signed.test"),
        "expiring": root.issue(
            "expiring.test", hosts=LOOPBACK, lifetime=(-DAY, 3 * DAY + timedelta(hours=1))
        ),
        "chained": intermediate.issue("chained.test", hosts=LOOPBACK),
        "client": root.issue("probe", client=True),
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
        # One write at a time on a call (grpc.aio refuses a second while one is pending):
        # replies and the test's own messages (outgoing) take turns.
        lock = asyncio.Lock()

        async def write(message: agent_pb2.CoordinatorMessage) -> None:
            async with lock:
                await context.write(message)

        welcome = agent_pb2.Welcome(
            coordinator_version="test",
            heartbeat_interval_ms=self.heartbeat_ms,
            last_seq=self.last_seq,
        )
        await write(agent_pb2.CoordinatorMessage(welcome=welcome))
        assignments = agent_pb2.Assignments(full=True, checks=self.checks)
        await write(agent_pb2.CoordinatorMessage(assignments=assignments))
        forward = asyncio.create_task(self._forward(write))
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
                        await write(agent_pb2.CoordinatorMessage(heartbeat=answer))
                elif kind == "results":
                    batch = list(message.results.results)
                    self.batches.append(batch)
                    if self.ack:
                        ack = agent_pb2.ResultAck(seq=batch[-1].seq)
                        await write(agent_pb2.CoordinatorMessage(ack=ack))
        finally:
            forward.cancel()

    async def _forward(
        self, write: Callable[[agent_pb2.CoordinatorMessage], Awaitable[None]]
    ) -> None:
        while True:
            await write(await self.outgoing.get())

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
