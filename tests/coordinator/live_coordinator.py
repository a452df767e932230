"""A real coordinator in-process, on real sockets (port 0), and a scripted agent client.

``start`` runs a ``Coordinator`` from files written to a temporary directory and stops it
when the test ends: by cancellation (at once), or with ``drain=True`` as SIGTERM does.
``FakeAgent`` speaks the real ``AgentService.Connect`` stream through a real grpc.aio
channel.

Not named ``conftest``: several test folders have one, and ``from conftest import``
picks whichever was imported first."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from coordinator.config import load_config
from coordinator.server import Coordinator
from vantage_proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2, query_pb2_grpc

TOKEN = "test-token-0123456789abcdef"
EU_TOKEN = "eu-only-token-0123456789"
WAIT = 10.0  # bounds how long a test waits for something; never asserted on

CHECKS = """\
checks:
  - {name: web, type: http, target: 'http://127.0.0.1:1/', interval: 2s, timeout: 1s}
  - {name: db, type: tcp, target: '127.0.0.1:2', interval: 2s, timeout: 1s}
"""
TOKENS = f"""\
tokens:
  - token: {TOKEN}
  - token: {EU_TOKEN}
    agent: eu-1
"""
# One agent in one region is enough for a verdict, so single-agent tests see transitions.
ENGINE = (
    "engine: {min_agents: 1, min_regions: 1, fail_after: 1, recover_after: 1,"
    " adaptive_confirmation: false}\n"
)


@dataclass
class Running:
    coordinator: Coordinator
    directory: Path
    channel: grpc.aio.Channel
    # Sent with metrics() when set: the coordinator has query tokens.
    query_token: str | None = None

    @property
    def grpc_address(self) -> str:
        assert self.coordinator.bound_ports is not None
        return f"127.0.0.1:{self.coordinator.bound_ports.grpc}"

    @property
    def http_url(self) -> str:
        assert self.coordinator.bound_ports is not None
        return f"http://127.0.0.1:{self.coordinator.bound_ports.http}"

    @property
    def queries(self) -> Any:
        return query_pb2_grpc.QueryServiceStub(self.channel)

    @property
    def checks_file(self) -> Path:
        return self.directory / "checks.yaml"

    async def metrics(self) -> str:
        headers = {"Authorization": f"Bearer {self.query_token}"} if self.query_token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.http_url}/metrics", headers=headers) as response,
        ):
            assert response.status == 200
            return await response.text()

    async def metric(self, sample: str) -> float | None:
        """The value of one exposition line's sample, e.g. 'vantage_x{a="b"}'."""
        for line in (await self.metrics()).splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return None

    def agent(self, name: str = "eu-1", region: str = "eu", **kwargs: Any) -> FakeAgent:
        return FakeAgent(self.channel, name, region, **kwargs)


class FakeAgent:
    """A scripted agent on the real stream: send messages, read replies with a deadline."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        name: str,
        region: str,
        *,
        token: str | None = TOKEN,
        instance_id: str = "instance-a",
        authorization: str | None = None,
    ) -> None:
        """``authorization``, when given, is sent as it is instead of the token."""
        metadata = [("authorization", f"Bearer {token}")] if token is not None else []
        if authorization is not None:
            metadata = [("authorization", authorization)]
        self.name = name
        self.region = region
        self.instance_id = instance_id
        self.call: Any = agent_pb2_grpc.AgentServiceStub(channel).Connect(metadata=metadata)
        self._seq = 0

    async def send(self, **kind: Any) -> None:
        await self.call.write(agent_pb2.AgentMessage(**kind))

    async def hello(self) -> None:
        await self.send(
            hello=agent_pb2.Hello(
                name=self.name,
                region=self.region,
                version="test",
                capabilities=["http", "tcp"],
                instance_id=self.instance_id,
            )
        )

    async def read(self) -> agent_pb2.CoordinatorMessage:
        async with asyncio.timeout(WAIT):
            message = await self.call.read()
        assert message is not grpc.aio.EOF, "the coordinator ended the stream"
        return message  # type: ignore[no-any-return]

    async def handshake(self) -> tuple[agent_pb2.Welcome, agent_pb2.Assignments]:
        await self.hello()
        welcome = await self.read()
        assignments = await self.read()
        assert welcome.WhichOneof("kind") == "welcome"
        assert assignments.WhichOneof("kind") == "assignments"
        return welcome.welcome, assignments.assignments

    def result(self, check: str, *, success: bool = True, seq: int | None = None) -> Any:
        if seq is None:
            self._seq += 1
            seq = self._seq
        return agent_pb2.ProbeResult(
            check=check,
            seq=seq,
            started_unix_us=int(time.time() * 1e6),
            duration_us=1000,
            success=success,
            failure=(
                common_pb2.FAILURE_CLASS_UNSPECIFIED
                if success
                else common_pb2.FAILURE_CLASS_CONNECT_REFUSED
            ),
        )

    async def send_results(self, results: Iterable[Any]) -> int:
        """Send one batch; returns the acknowledged sequence number."""
        await self.send(results=agent_pb2.ResultBatch(results=list(results)))
        reply = await self.read()
        assert reply.WhichOneof("kind") == "ack", reply
        return int(reply.ack.seq)

    async def status(self) -> grpc.StatusCode:
        """Read until the stream ends; the status it ended with."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with asyncio.timeout(WAIT):
                while await self.call.read() is not grpc.aio.EOF:
                    pass
        async with asyncio.timeout(WAIT):
            code: grpc.StatusCode = await self.call.code()
        return code

    def close(self) -> None:
        self.call.cancel()


async def eventually(predicate: Callable[[], Any], what: str, within: float = WAIT) -> Any:
    """Poll an async or sync predicate until truthy; fail naming ``what`` after ``within``
    seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}; last seen: {last!r}")


def write_config(
    directory: Path,
    *,
    checks: str | None = CHECKS,
    tokens: str | None = TOKENS,
    extra: str = ENGINE,
) -> Path:
    lines = ["listen: 127.0.0.1:0", "http_listen: 127.0.0.1:0", "heartbeat_interval: 1s"]
    if checks is not None:
        (directory / "checks.yaml").write_text(checks)
        lines.append("checks_file: checks.yaml")
    if tokens is not None:
        (directory / "tokens.yaml").write_text(tokens)
        lines.append("tokens_file: tokens.yaml")
    config = directory / "coordinator.yaml"
    config.write_text("\n".join(lines) + "\n" + extra)
    return config


@contextlib.asynccontextmanager
async def start(config: Path, *, drain: bool = False, **kwargs: Any) -> AsyncIterator[Running]:
    """``drain``: stop it as SIGTERM does (``Coordinator.stop``) rather than cancel it."""
    coordinator = Coordinator(load_config(config), **kwargs)
    task = asyncio.create_task(coordinator.run())
    try:
        async with asyncio.timeout(WAIT):
            started = asyncio.create_task(coordinator.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                started.cancel()
                task.result()  # raises what run() raised
        assert coordinator.bound_ports is not None
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{coordinator.bound_ports.grpc}")
        try:
            yield Running(coordinator, config.parent, channel)
        finally:
            await channel.close()
    finally:
        if drain and not task.done():
            coordinator.stop()
            async with asyncio.timeout(WAIT + 5):
                await task
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
