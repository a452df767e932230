"""The TCP probe against real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from probe_timing import assert_phases_sane, timed

from agent.probes import PROBES
from agent.probes.tcp import probe_tcp
from vantage.checks import TcpCheck, parse_check
from vantage.results import FailureClass, ProbeOutcome, TcpDetails, TlsDetails


def tcp_check(target: str, **spec: Any) -> TcpCheck:
    check = parse_check({"name": "port", "type": "tcp", "target": target, **spec})
    assert isinstance(check, TcpCheck)
    return check


async def probe(check: TcpCheck) -> ProbeOutcome:
    """Run the probe and check what every outcome must satisfy: phases non-negative,
    summing to the wall time, no HTTP-only phase, no TLS time without TLS."""
    outcome, elapsed = await timed(probe_tcp(check))
    zero = ["transfer"]
    if check.tls is None:
        zero.append("tls")
    if check.send is None and check.expect is None:
        zero.append("processing")
    assert_phases_sane(outcome, elapsed, timeout=check.timeout, zero=zero)
    return outcome


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()


async def test_open_port_is_up_with_peer_and_phases(serve: Any) -> None:
    port = await serve(hold)
    outcome = await probe(tcp_check(f"127.0.0.1:{port}"))

    assert outcome.success, outcome.message
    assert outcome.details == TcpDetails(peer=f"127.0.0.1:{port}")
    assert outcome.phases.resolve == 0
    assert outcome.phases.connect > 0


async def test_hostname_is_resolved_and_peer_is_the_address(serve: Any) -> None:
    port = await serve(hold)
    outcome = await probe(tcp_check(f"localhost:{port}"))

    assert outcome.success, outcome.message
    assert outcome.phases.resolve > 0
    assert isinstance(outcome.details, TcpDetails)
    assert outcome.details.peer.endswith(f":{port}")


async def test_ipv6_literal(serve: Any) -> None:
    try:
        port = await serve(hold, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    outcome = await probe(tcp_check(f"[::1]:{port}"))

    assert outcome.success, outcome.message
    assert outcome.details == TcpDetails(peer=f"[::1]:{port}")


async def test_refused_port_is_connect_refused(free_port: int) -> None:
    outcome = await probe(tcp_check(f"127.0.0.1:{free_port}"))

    assert outcome.failure is FailureClass.CONNECT_REFUSED
    assert outcome.message == f"connect 127.0.0.1:{free_port}: connection refused"


async def test_nonexistent_name_is_a_dns_failure() -> None:
    # RFC 6761: names under .invalid never resolve.
    outcome = await probe(tcp_check("nonexistent.invalid:80", timeout="2s", interval="3s"))

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
    outcome = await probe(tcp_check(f"127.0.0.1:{full_backlog}", timeout="300ms"))
    assert outcome.failure is FailureClass.CONNECT_TIMEOUT
    assert outcome.message == f"connect 127.0.0.1:{full_backlog}: timed out after 300ms"
    assert outcome.phases.connect == pytest.approx(0.3, abs=0.1)


# Send and expect


def banner(*parts: bytes, pause: float = 0.0, then_close: bool = True) -> Any:
    """A server that says ``parts`` (``pause`` apart) on connect, then hangs up or, when
    not ``then_close``, waits for the probe to."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        if not then_close:
            await reader.read()

    return handler


async def test_banner_matching_expect_is_up(serve: Any) -> None:
    port = await serve(banner(b"220 mail.test ESMTP ready\r\n", then_close=False))
    outcome = await probe(tcp_check(f"127.0.0.1:{port}", expect="^220 "))

    assert outcome.success, outcome.message
    assert outcome.details == TcpDetails(
        peer=f"127.0.0.1:{port}", received="220 mail.test ESMTP ready\r\n"
    )
    assert outcome.phases.processing > 0


async def test_expect_reads_until_the_pattern_matches(serve: Any) -> None:
    port = await serve(banner(b"2", b"20 ", b"ready\r\n", pause=0.02, then_close=False))
    outcome = await probe(tcp_check(f"127.0.0.1:{port}", expect=r"^220 ready\r\n"))

    assert outcome.success, outcome.message


async def test_banner_not_matching_expect_is_body_mismatch(serve: Any) -> None:
    port = await serve(banner(b"HELLO"))
    outcome = await probe(tcp_check(f"127.0.0.1:{port}", expect="^220"))

    assert outcome.failure is FailureClass.BODY_MISMATCH
    assert outcome.message == f"read 127.0.0.1:{port}: expected ^220, got 'HELLO'"
    assert isinstance(outcome.details, TcpDetails)
    assert outcome.details.received == "HELLO"


async def test_silence_until_the_deadline_is_timeout_with_what_arrived(serve: Any) -> None:
    port = await serve(banner(b"HEL", then_close=False))
    check = tcp_check(f"127.0.0.1:{port}", expect="^220", timeout="300ms")
    outcome = await probe(check)

    assert outcome.failure is FailureClass.TIMEOUT
    assert outcome.message == (
        f"read 127.0.0.1:{port}: timed out after 300ms waiting for ^220, got 'HEL'"
    )
    assert outcome.phases.processing == pytest.approx(0.3, abs=0.1)


async def test_send_then_expect(serve: Any) -> None:
    received: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readexactly(len("PING ü".encode())))
        writer.write(b"+PONG\r\n")
        await reader.read()

    port = await serve(echo)
    outcome = await probe(tcp_check(f"127.0.0.1:{port}", send="PING ü", expect=r"^\+PONG"))

    assert outcome.success, outcome.message
    assert received == ["PING ü".encode()]


async def test_send_without_expect_does_not_wait(serve: Any, until: Any) -> None:
    received: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())

    port = await serve(sink)
    outcome = await probe(tcp_check(f"127.0.0.1:{port}", send="QUIT"))

    assert outcome.success, outcome.message
    await until(lambda: bool(received))
    assert received == [b"QUIT"]


async def test_endless_talker_without_a_match_stops_at_64_kib(serve: Any) -> None:
    async def talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(b"\x00\xffnoise " * 1000)
            await writer.drain()

    port = await serve(talker)
    check = tcp_check(f"127.0.0.1:{port}", expect="^220", timeout="5s", interval="10s")
    outcome = await probe(check)

    assert outcome.failure is FailureClass.BODY_MISMATCH
    assert outcome.message.startswith(f"read 127.0.0.1:{port}: expected ^220, got '\\x00\\xffnoise")
    assert isinstance(outcome.details, TcpDetails)
    assert len(outcome.details.received) == 256
    assert outcome.details.received.startswith("\x00\xffnoise")


# TLS


def tls_check(port: int, certs: Any, **spec: Any) -> TcpCheck:
    return tcp_check(f"127.0.0.1:{port}", **{"tls": {"ca_pem": certs["ca"].pem}, **spec})


async def test_tls_is_up_with_its_session(serve: Any, certs: Any) -> None:
    port = await serve(hold, tls=certs["valid"].server_context())
    outcome = await probe(tls_check(port, certs))

    assert outcome.success, outcome.message
    assert outcome.phases.tls > 0
    assert isinstance(outcome.details, TcpDetails)
    session = outcome.details.tls
    assert isinstance(session, TlsDetails)
    assert session.subject == "CN=valid.test"
    assert session.earliest_expiry == certs["valid"].earliest_expiry.timestamp()
    assert outcome.warnings == ()


async def test_banner_over_tls(serve: Any, certs: Any) -> None:
    port = await serve(banner(b"* OK IMAP4rev1\r\n"), tls=certs["expiring"].server_context())
    outcome = await probe(tls_check(port, certs, expect=r"^\* OK"))

    assert outcome.success, outcome.message
    assert outcome.phases.tls > 0
    assert outcome.phases.processing > 0
    [warning] = outcome.warnings
    assert warning.startswith("certificate CN=expiring.test expires in 3 days (")


@pytest.mark.parametrize(
    ("cert", "failure", "reason"),
    [
        ("expired", FailureClass.TLS_CERT_EXPIRED, "certificate has expired"),
        ("self_signed", FailureClass.TLS_CERT_INVALID, "self-signed certificate"),
        ("wrong_host", FailureClass.TLS_CERT_INVALID, "IP address mismatch"),
    ],
)
async def test_tls_failures(
    serve: Any, certs: Any, cert: str, failure: FailureClass, reason: str
) -> None:
    port = await serve(hold, tls=certs[cert].server_context())
    outcome = await probe(tls_check(port, certs))

    assert outcome.failure is failure
    assert outcome.message.startswith(f"tls 127.0.0.1:{port}: {reason}")


async def test_tls_to_a_plain_banner_is_tls_handshake(serve: Any, certs: Any) -> None:
    port = await serve(banner(b"220 plain SMTP, no TLS here\r\n" * 10, then_close=False))
    outcome = await probe(tls_check(port, certs))

    assert outcome.failure is FailureClass.TLS_HANDSHAKE
    assert outcome.message.startswith(f"tls 127.0.0.1:{port}: ")


async def test_tls_client_certificate_rejected_after_the_handshake(
    blocking_tls_server: Any, certs: Any
) -> None:
    context = certs["valid"].server_context(client_ca=certs["ca"].pem)
    port = blocking_tls_server(context, b"220 welcome\r\n")
    outcome = await probe(tls_check(port, certs, expect="^220"))

    assert outcome.failure is FailureClass.TLS_HANDSHAKE
    assert outcome.message == f"tls 127.0.0.1:{port}: tlsv13 alert certificate required"

    client = certs["client"]
    options = {
        "ca_pem": certs["ca"].pem,
        "client_cert_pem": client.pem,
        "client_key_pem": client.key_pem,
    }
    check = tls_check(port, certs, send="hello", expect="^220", tls=options)
    outcome = await probe(check)
    assert outcome.success, outcome.message


async def test_is_registered_and_refuses_other_checks() -> None:
    assert PROBES["tcp"] is probe_tcp
    http = parse_check({"name": "w", "type": "http", "target": "http://127.0.0.1/"})
    with pytest.raises(TypeError):
        await probe_tcp(http)
