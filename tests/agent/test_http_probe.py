"""The HTTP probe against real loopback servers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

import vantage
from agent.probes import PROBES
from agent.probes.http import probe_http
from vantage.checks import HttpCheck, parse_check
from vantage.results import FailureClass, HttpDetails, ProbeOutcome


def http_check(target: str, **spec: Any) -> HttpCheck:
    check = parse_check({"name": "web", "type": "http", "target": target, **spec})
    assert isinstance(check, HttpCheck)
    return check


async def read_head(reader: asyncio.StreamReader) -> bytes:
    with contextlib.suppress(asyncio.IncompleteReadError):
        return await reader.readuntil(b"\r\n\r\n")
    return b""


def respond(raw: bytes, *, linger: bool = False) -> Any:
    """A handler that reads the request, writes ``raw`` and hangs up (or waits for the
    probe to hang up when ``linger``)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(raw)
        await writer.drain()
        if linger:
            await reader.read()

    return handler


def assert_sane_phases(outcome: ProbeOutcome, elapsed: float) -> None:
    phases = outcome.phases
    values = [phases.resolve, phases.connect, phases.tls, phases.processing, phases.transfer]
    assert all(value >= 0 for value in values), phases
    # The phases cover the probe's whole run and nothing outside it.
    assert phases.total <= elapsed
    assert phases.total == pytest.approx(elapsed, abs=0.05)


async def timed(check: HttpCheck, **kwargs: Any) -> tuple[ProbeOutcome, float]:
    started = time.monotonic()
    outcome = await probe_http(check, **kwargs)
    return outcome, time.monotonic() - started


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


async def test_200_is_up_with_phases_and_details(serve: Any) -> None:
    port = await serve(respond(OK))
    outcome, elapsed = await timed(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.success, outcome.message
    assert outcome.failure is None
    assert outcome.details == HttpDetails(
        status_code=200, http_version="1.1", final_url=f"http://127.0.0.1:{port}/", body_bytes=5
    )
    assert_sane_phases(outcome, elapsed)
    assert outcome.phases.resolve == 0  # an IP literal is not resolved
    assert outcome.phases.tls == 0  # plain http
    assert outcome.phases.connect > 0
    assert outcome.phases.processing > 0


async def test_sends_one_well_formed_request(serve: Any) -> None:
    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        writer.write(OK)

    port = await serve(handler)
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/a b/ü?q=1&r=ö#frag"))

    assert outcome.success, outcome.message
    lines = heads[0].decode("ascii").split("\r\n")
    assert lines[0] == "GET /a%20b/%C3%BC?q=1&r=%C3%B6 HTTP/1.1"
    assert f"Host: 127.0.0.1:{port}" in lines
    assert f"User-Agent: vantage-agent/{vantage.__version__}" in lines
    assert "Connection: close" in lines


async def test_hostname_is_resolved(serve: Any) -> None:
    port = await serve(respond(OK))
    outcome, elapsed = await timed(http_check(f"http://localhost:{port}/"))

    assert outcome.success, outcome.message
    assert outcome.phases.resolve > 0
    assert_sane_phases(outcome, elapsed)


async def test_status_outside_expected_is_http_status(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"))
    target = f"http://127.0.0.1:{port}/"
    outcome = await probe_http(http_check(target))

    assert not outcome.success
    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message == f"GET {target}: status 503 not in 200-399"
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.status_code == 503


async def test_expected_status_ranges_are_honoured(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"))
    check = http_check(f"http://127.0.0.1:{port}/", expected_status=[200, "500-503"])
    assert (await probe_http(check)).success

    check = http_check(f"http://127.0.0.1:{port}/", expected_status=[200, 204])
    outcome = await probe_http(check)
    assert outcome.message.endswith("status 503 not in 200, 204")


async def test_redirect_is_reported_not_followed(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 301 Moved\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n"))
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.success  # 3xx is in the default 200-399
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.status_code == 301
    assert outcome.details.final_url == f"http://127.0.0.1:{port}/"


async def test_refused_port_is_connect_refused(free_port: int) -> None:
    outcome = await probe_http(http_check(f"http://127.0.0.1:{free_port}/"))

    assert outcome.failure is FailureClass.CONNECT_REFUSED
    assert outcome.message == f"connect 127.0.0.1:{free_port}: connection refused"
    assert outcome.details is None


async def test_silent_server_times_out_within_the_timeout(serve: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the probe hangs up

    port = await serve(silent)
    check = http_check(f"http://127.0.0.1:{port}/", timeout="300ms", interval="1s")
    outcome, elapsed = await timed(check)

    assert outcome.failure is FailureClass.TIMEOUT
    assert outcome.message == f"GET {check.target}: waiting for the response: timed out after 300ms"
    assert outcome.phases.processing > 0
    assert_sane_phases(outcome, elapsed)
    assert outcome.phases.total == pytest.approx(0.3, abs=0.1)


async def test_slow_body_times_out_in_transfer(serve: Any) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await reader.read()

    port = await serve(trickle)
    check = http_check(f"http://127.0.0.1:{port}/", timeout="300ms", interval="1s")
    outcome = await probe_http(check)

    assert outcome.failure is FailureClass.TIMEOUT
    assert "reading the response: timed out" in outcome.message
    assert outcome.phases.transfer > 0
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.body_bytes == 5


async def test_close_mid_body_is_a_failure(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"))
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))

    assert not outcome.success
    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message.endswith("connection closed after 10 bytes of the body")


async def test_close_without_response_is_a_failure(serve: Any) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    port = await serve(hang_up)
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message.endswith("connection closed without a response")


async def test_garbage_response_is_a_failure(serve: Any) -> None:
    port = await serve(respond(b"SSH-2.0-OpenSSH_9.6\r\n", linger=True))
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))

    assert not outcome.success
    assert outcome.failure is FailureClass.HTTP_STATUS
    assert "invalid HTTP response" in outcome.message


async def test_endless_headers_are_cut_off(serve: Any) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(2000):
            writer.write(b"X-Filler: " + b"x" * 100 + b"\r\n")
            await writer.drain()

    port = await serve(flood)
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message.endswith("response headers exceed 64 KiB")


async def test_body_until_close_and_chunked_bodies_are_counted(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 70_000))
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))
    assert outcome.success, outcome.message
    assert outcome.details == HttpDetails(200, "1.0", f"http://127.0.0.1:{port}/", 70_000)

    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    port = await serve(respond(chunked, linger=True))
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))
    assert outcome.success, outcome.message
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.body_bytes == 5


async def test_interim_response_is_skipped(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK))
    outcome = await probe_http(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.status_code == 200


async def test_head_response_ends_with_its_headers(serve: Any) -> None:
    # A HEAD answer announces the length of a body it does not send; the server keeps
    # the connection open, so the probe must not wait for those bytes.
    port = await serve(respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", linger=True))
    check = http_check(f"http://127.0.0.1:{port}/", method="HEAD", timeout="2s", interval="3s")
    outcome = await probe_http(check)

    assert outcome.success, outcome.message


async def test_https_with_trusted_certificate_is_up(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["valid"].server_context())
    check = http_check(f"https://127.0.0.1:{port}/")
    outcome, elapsed = await timed(check, tls=certs["valid"].client_context())

    assert outcome.success, outcome.message
    assert outcome.phases.tls > 0
    assert_sane_phases(outcome, elapsed)


async def test_https_by_name_verifies_the_name(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["valid"].server_context())
    check = http_check(f"https://localhost:{port}/")
    outcome = await probe_http(check, tls=certs["valid"].client_context())

    assert outcome.success, outcome.message


async def test_self_signed_certificate_is_tls_cert_invalid(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["valid"].server_context())
    outcome = await probe_http(http_check(f"https://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.TLS_CERT_INVALID
    assert outcome.message.startswith(f"TLS handshake with 127.0.0.1:{port}: ")
    assert "self-signed" in outcome.message
    assert outcome.phases.tls > 0


async def test_expired_certificate_is_tls_cert_expired(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["expired"].server_context())
    check = http_check(f"https://127.0.0.1:{port}/")
    outcome = await probe_http(check, tls=certs["expired"].client_context())

    assert outcome.failure is FailureClass.TLS_CERT_EXPIRED
    assert "expired" in outcome.message


async def test_tls_to_a_plain_server_is_tls_handshake(serve: Any) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # a ClientHello is no HTTP request
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    port = await serve(plain)
    check = http_check(f"https://127.0.0.1:{port}/", timeout="2s", interval="3s")
    outcome = await probe_http(check)

    assert outcome.failure is FailureClass.TLS_HANDSHAKE
    assert outcome.message.startswith(f"TLS handshake with 127.0.0.1:{port}: ")


async def test_is_registered_and_refuses_other_checks() -> None:
    assert PROBES["http"] is probe_http
    tcp = parse_check({"name": "t", "type": "tcp", "target": "127.0.0.1:1"})
    with pytest.raises(TypeError):
        await probe_http(tcp)
