"""The TCP probe against real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.probes import PROBES
from agent.probes.tcp import probe_tcp
from vantage.checks import TcpCheck, parse_check
from vantage.results import FailureClass, TcpDetails


def tcp_check(target: str, **spec: Any) -> TcpCheck:
    check = parse_check({"name": "port", "type": "tcp", "target": target, **spec})
    assert isinstance(check, TcpCheck)
    return check


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


async def test_open_port_is_up_with_peer_and_phases(serve: Any) -> None:
    port = await serve(hold)
    started = time.monotonic()
    outcome = await probe_tcp(tcp_check(f"127.0.0.1:{port}"))
    elapsed = time.monotonic() - started

    assert outcome.success, outcome.message
    assert outcome.details == TcpDetails(peer=f"127.0.0.1:{port}")
    assert outcome.phases.resolve == 0
    assert outcome.phases.connect > 0
    assert outcome.phases.tls == outcome.phases.processing == outcome.phases.transfer == 0
    assert outcome.phases.total == pytest.approx(elapsed, abs=0.05)


async def test_hostname_is_resolved_and_peer_is_the_address(serve: Any) -> None:
    port = await serve(hold)
    outcome = await probe_tcp(tcp_check(f"localhost:{port}"))

    assert outcome.success, outcome.message
    assert outcome.phases.resolve > 0
    assert isinstance(outcome.details, TcpDetails)
    assert outcome.details.peer.endswith(f":{port}")


async def test_ipv6_literal(serve: Any) -> None:
    try:
        port = await serve(hold, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    outcome = await probe_tcp(tcp_check(f"[::1]:{port}"))

    assert outcome.success, outcome.message
    assert outcome.details == TcpDetails(peer=f"[::1]:{port}")


async def test_refused_port_is_connect_refused(free_port: int) -> None:
    outcome = await probe_tcp(tcp_check(f"127.0.0.1:{free_port}"))

    assert outcome.failure is FailureClass.CONNECT_REFUSED
    assert outcome.message == f"connect 127.0.0.1:{free_port}: connection refused"


async def test_nonexistent_name_is_a_dns_failure() -> None:
    # RFC 6761: names under .invalid never resolve.
    outcome = await probe_tcp(tcp_check("nonexistent.invalid:80", timeout="2s", interval="3s"))

    assert outcome.failure in {
        FailureClass.DNS_NXDOMAIN,
        FailureClass.DNS_SERVFAIL,
        FailureClass.DNS_TIMEOUT,
    }
    assert outcome.message.startswith("resolve nonexistent.invalid: ")


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full, so the kernel drops further SYNs."""
    listener = socket.socket()
    clients: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            clients.append(client)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", port))
        yield port
    finally:
        for client in clients:
            client.close()
        listener.close()


async def test_unanswered_connect_is_connect_timeout(full_backlog: int) -> None:
    await asyncio.sleep(0.05)  # let the fillers' handshakes land in the queue
    outcome = await probe_tcp(tcp_check(f"127.0.0.1:{full_backlog}", timeout="300ms"))
    assert outcome.failure is FailureClass.CONNECT_TIMEOUT
    assert outcome.message == f"connect 127.0.0.1:{full_backlog}: timed out after 300ms"
    assert outcome.phases.connect == pytest.approx(0.3, abs=0.1)


async def test_is_registered_and_refuses_other_checks() -> None:
    assert PROBES["tcp"] is probe_tcp
    http = parse_check({"name": "w", "type": "http", "target": "http://127.0.0.1/"})
    with pytest.raises(TypeError):
        await probe_tcp(http)
