"""The HTTP probe against real loopback servers, plain and TLS, with test certificates."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from probe_timing import assert_phases_sane, timed

import vantage
from agent.probes import PROBES
from agent.probes.http import prepare_http, probe_http
from vantage.checks import HttpCheck, parse_check
from vantage.results import FailureClass, HttpDetails, ProbeOutcome, TlsDetails


def http_check(target: str, **spec: Any) -> HttpCheck:
    check = parse_check({"name": "web", "type": "http", "target": target, **spec})
    assert isinstance(check, HttpCheck)
    return check


@pytest.fixture(autouse=True, params=["coroutine", "launcher"])
def probe_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test here runs twice: with the probe as a coroutine, and through its
    launcher (loop callbacks, as the scheduler runs it) for the checks that have one."""
    global _path
    _path = request.param
    yield _path
    _path = "coroutine"


_path = "coroutine"


async def run_probe(check: HttpCheck) -> ProbeOutcome:
    """``probe_http``, or its launcher when the test runs that path and the check has one."""
    launch = prepare_http(check) if _path == "launcher" else None
    if launch is None:
        return await probe_http(check)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[ProbeOutcome] = loop.create_future()
    abort = launch(loop, done.set_result)
    try:
        return await done
    finally:
        abort()


async def probe(check: HttpCheck, *, tls_used: bool | None = None) -> ProbeOutcome:
    """Run the probe and check what every outcome must satisfy: phases non-negative and
    summing to the wall time, and no TLS time unless TLS was spoken (by default: when the
    target is https)."""
    outcome, elapsed = await timed(run_probe(check))
    if tls_used is None:
        tls_used = check.target.startswith("https:")
    zero = () if tls_used else ("tls",)
    assert_phases_sane(outcome, elapsed, timeout=check.timeout, zero=zero)
    return outcome


@dataclass
class Request:
    head: str
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split("\r\n", 1)[0]

    def header(self, name: str) -> list[str]:
        values = []
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.lower() == name.lower():
                values.append(value.strip())
        return values


@dataclass
class Recorder:
    """Requests a server received, in order."""

    requests: list[Request] = field(default_factory=list)

    async def read(self, reader: asyncio.StreamReader) -> Request:
        with contextlib.suppress(asyncio.IncompleteReadError):
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = re.search(r"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            request = Request(head, body)
            self.requests.append(request)
            return request
        return Request("", b"")


def respond(raw: bytes, *, linger: bool = False, recorder: Recorder | None = None) -> Any:
    """A handler that reads the request, writes ``raw`` and hangs up (or waits for the
    probe to hang up when ``linger``)."""
    recorder = recorder or Recorder()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await recorder.read(reader)
        writer.write(raw)
        await writer.drain()
        if linger:
            await reader.read()

    return handler


def redirect(status: int, location: str) -> bytes:
    return (
        f"HTTP/1.1 {status} Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
    )


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


# Plain HTTP


async def test_200_is_up_with_phases_and_details(serve: Any) -> None:
    port = await serve(respond(OK))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.success, outcome.message
    assert outcome.failure is None
    assert outcome.details == HttpDetails(
        status_code=200,
        http_version="1.1",
        final_url=f"http://127.0.0.1:{port}/",
        body_bytes=5,
        peer=f"127.0.0.1:{port}",
    )
    assert outcome.warnings == ()
    assert outcome.phases.resolve == 0  # an IP literal is not resolved
    assert outcome.phases.connect > 0
    assert outcome.phases.processing > 0


async def test_sends_one_well_formed_request(serve: Any) -> None:
    recorder = Recorder()
    port = await serve(respond(OK, recorder=recorder))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/a b/ü?q=1&r=ö#frag"))

    assert outcome.success, outcome.message
    [request] = recorder.requests
    assert request.request_line == "GET /a%20b/%C3%BC?q=1&r=%C3%B6 HTTP/1.1"
    assert request.header("Host") == [f"127.0.0.1:{port}"]
    assert request.header("User-Agent") == [f"vantage-agent/{vantage.__version__}"]
    assert request.header("Connection") == ["close"]
    assert request.header("Content-Length") == []


async def test_method_headers_and_body_reach_the_server(serve: Any) -> None:
    recorder = Recorder()
    port = await serve(respond(OK, recorder=recorder))
    check = http_check(
        f"http://127.0.0.1:{port}/submit",
        method="PUT",
        headers={
            "user-agent": "custom/1",  # replaces the default, whatever the case
            "X-Token": "abc",
            "Host": "evil.example",  # the probe owns Host and Content-Length
            "Content-Length": "999",
        },
        body='{"ok": "ü"}',
    )
    outcome = await probe(check)

    assert outcome.success, outcome.message
    [request] = recorder.requests
    assert request.request_line == "PUT /submit HTTP/1.1"
    assert request.header("User-Agent") == ["custom/1"]
    assert request.header("X-Token") == ["abc"]
    assert request.header("Host") == [f"127.0.0.1:{port}"]
    assert request.header("Content-Length") == [str(len('{"ok": "ü"}'.encode()))]
    assert request.body == '{"ok": "ü"}'.encode()


async def test_any_method_may_carry_a_body_and_post_without_one_says_so(serve: Any) -> None:
    recorder = Recorder()
    port = await serve(respond(OK, recorder=recorder))
    assert (await probe(http_check(f"http://127.0.0.1:{port}/", body="q"))).success
    assert (await probe(http_check(f"http://127.0.0.1:{port}/", method="POST"))).success

    get, post = recorder.requests
    assert get.request_line.startswith("GET ")
    assert (get.header("Content-Length"), get.body) == (["1"], b"q")
    assert (post.header("Content-Length"), post.body) == (["0"], b"")


async def test_hostname_is_resolved(serve: Any) -> None:
    port = await serve(respond(OK))
    outcome = await probe(http_check(f"http://localhost:{port}/"))

    assert outcome.success, outcome.message
    assert outcome.phases.resolve > 0


async def test_status_outside_expected_is_http_status(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"))
    target = f"http://127.0.0.1:{port}/"
    outcome = await probe(http_check(target))

    assert not outcome.success
    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message == f"GET {target}: status 503 not in 200-399"
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.status_code == 503


async def test_expected_status_ranges_are_honoured(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"))
    check = http_check(f"http://127.0.0.1:{port}/", expected_status=[200, "500-503"])
    assert (await probe(check)).success

    check = http_check(f"http://127.0.0.1:{port}/", expected_status=[200, 204])
    outcome = await probe(check)
    assert outcome.message.endswith("status 503 not in 200, 204")


# Body patterns


async def test_body_match(serve: Any) -> None:
    page = b"<html><title>Shop</title>status: all good</html>"
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(page)}\r\n\r\n".encode()
    port = await serve(respond(head + page))
    target = f"http://127.0.0.1:{port}/"

    assert (await probe(http_check(target, body_match=r"status: \w+ good"))).success
    outcome = await probe(http_check(target, body_match="Checkout"))
    assert outcome.failure is FailureClass.BODY_MISMATCH
    assert outcome.message == f"GET {target}: body does not match 'Checkout'"
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.body_bytes == len(page)


async def test_body_not_match(serve: Any) -> None:
    page = b"Fatal error: database unavailable"
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(page)}\r\n\r\n".encode()
    port = await serve(respond(head + page))
    target = f"http://127.0.0.1:{port}/"

    assert (await probe(http_check(target, body_not_match="(?i)exception"))).success
    outcome = await probe(http_check(target, body_not_match="(?i)fatal ERROR"))
    assert outcome.failure is FailureClass.BODY_MISMATCH
    assert outcome.message == f"GET {target}: body matches '(?i)fatal ERROR' (body_not_match)"


async def test_body_patterns_see_the_first_mebibyte_and_every_byte_is_counted(
    serve: Any,
) -> None:
    body = b"a" * (1024 * 1024 - 3) + b"MARK" + b"b" * 1000  # MARK straddles the cut
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    port = await serve(respond(head + body))
    target = f"http://127.0.0.1:{port}/"

    outcome = await probe(http_check(target, body_match="MARK"))
    assert outcome.failure is FailureClass.BODY_MISMATCH
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.body_bytes == len(body)
    assert (await probe(http_check(target, body_match="aMAR$"))).success


# Redirects


async def test_redirects_are_followed_to_the_final_url(serve: Any) -> None:
    final = await serve(respond(OK))
    middle = await serve(respond(redirect(302, f"http://127.0.0.1:{final}/end?x=1")))
    recorder = Recorder()

    async def first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await recorder.read(reader)
        if request.request_line.startswith("GET /hop"):
            writer.write(redirect(307, f"http://127.0.0.1:{middle}/middle"))
        else:
            writer.write(redirect(301, "/hop"))  # relative: back to this server

    start = await serve(first)
    outcome = await probe(http_check(f"http://127.0.0.1:{start}/"))

    assert outcome.success, outcome.message
    assert outcome.details == HttpDetails(
        status_code=200,
        http_version="1.1",
        final_url=f"http://127.0.0.1:{final}/end?x=1",
        body_bytes=5,
        redirects=3,
        peer=f"127.0.0.1:{final}",
    )
    assert [r.request_line for r in recorder.requests] == ["GET / HTTP/1.1", "GET /hop HTTP/1.1"]


async def test_303_turns_post_into_get_and_307_keeps_it(serve: Any) -> None:
    recorder = Recorder()
    landing = await serve(respond(OK, recorder=recorder))
    see_other = await serve(respond(redirect(303, f"http://127.0.0.1:{landing}/done")))
    temporary = await serve(respond(redirect(307, f"http://127.0.0.1:{landing}/again")))
    spec = {"method": "POST", "body": "form=1", "headers": {"Content-Type": "text/plain"}}

    assert (await probe(http_check(f"http://127.0.0.1:{see_other}/", **spec))).success
    assert (await probe(http_check(f"http://127.0.0.1:{temporary}/", **spec))).success

    after_303, after_307 = recorder.requests
    assert after_303.request_line == "GET /done HTTP/1.1"
    assert (after_303.header("Content-Length"), after_303.body) == ([], b"")
    assert after_307.request_line == "POST /again HTTP/1.1"
    assert after_307.body == b"form=1"


async def test_authorization_is_not_sent_to_another_origin(serve: Any) -> None:
    recorder = Recorder()
    other = await serve(respond(OK, recorder=recorder))
    port = await serve(respond(redirect(302, f"http://127.0.0.1:{other}/")))
    check = http_check(
        f"http://127.0.0.1:{port}/", headers={"Authorization": "Bearer x", "X-Keep": "1"}
    )

    assert (await probe(check)).success
    [request] = recorder.requests
    assert request.header("Authorization") == []
    assert request.header("X-Keep") == ["1"]


async def test_redirect_loop_is_too_many_redirects(serve: Any) -> None:
    port = await serve(respond(redirect(302, "/again")))
    check = http_check(f"http://127.0.0.1:{port}/", max_redirects=3)
    outcome = await probe(check)

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message == (
        f"GET http://127.0.0.1:{port}/again: too many redirects (more than 3)"
    )
    assert isinstance(outcome.details, HttpDetails)
    assert (outcome.details.status_code, outcome.details.redirects) == (302, 3)


async def test_redirect_is_reported_not_followed_when_asked(serve: Any) -> None:
    port = await serve(respond(redirect(301, "/x")))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/", follow_redirects=False))

    assert outcome.success  # 3xx is in the default 200-399
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.status_code == 301
    assert outcome.details.redirects == 0
    assert outcome.details.final_url == f"http://127.0.0.1:{port}/"

    check = http_check(f"http://127.0.0.1:{port}/", follow_redirects=False, expected_status=[200])
    assert (await probe(check)).message.endswith("status 301 not in 200")


async def test_redirect_to_a_refused_port_fails_there(serve: Any, free_port: int) -> None:
    port = await serve(respond(redirect(302, f"http://127.0.0.1:{free_port}/")))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.CONNECT_REFUSED
    assert outcome.message == f"connect 127.0.0.1:{free_port}: connection refused"
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.redirects == 1
    assert outcome.details.final_url == f"http://127.0.0.1:{free_port}/"


async def test_redirect_to_another_scheme_is_http_status(serve: Any) -> None:
    port = await serve(respond(redirect(302, "ftp://127.0.0.1/file")))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message == (
        f"GET http://127.0.0.1:{port}/: redirect to 'ftp://127.0.0.1/file': "
        "not an http:// or https:// URL"
    )


# Servers that misbehave


async def test_refused_port_is_connect_refused(free_port: int) -> None:
    outcome = await probe(http_check(f"http://127.0.0.1:{free_port}/"))

    assert outcome.failure is FailureClass.CONNECT_REFUSED
    assert outcome.message == f"connect 127.0.0.1:{free_port}: connection refused"
    assert outcome.details is None


async def test_silent_server_times_out_within_the_timeout(serve: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the probe hangs up

    port = await serve(silent)
    check = http_check(f"http://127.0.0.1:{port}/", timeout="300ms", interval="1s")
    outcome = await probe(check)

    assert outcome.failure is FailureClass.TIMEOUT
    assert outcome.message == f"GET {check.target}: waiting for the response: timed out after 300ms"
    assert outcome.phases.processing > 0
    assert outcome.phases.total == pytest.approx(0.3, abs=0.1)


async def test_slow_body_times_out_in_transfer(serve: Any) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Recorder().read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await reader.read()

    port = await serve(trickle)
    check = http_check(f"http://127.0.0.1:{port}/", timeout="300ms", interval="1s")
    outcome = await probe(check)

    assert outcome.failure is FailureClass.TIMEOUT
    assert "reading the response: timed out" in outcome.message
    assert outcome.phases.transfer > 0
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.body_bytes == 5


async def test_endless_body_times_out_within_the_timeout(serve: Any) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Recorder().read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        while True:
            writer.write(chunk)
            await writer.drain()

    port = await serve(endless)
    check = http_check(
        f"http://127.0.0.1:{port}/", timeout="300ms", interval="1s", body_match="never"
    )
    outcome = await probe(check)

    assert outcome.failure is FailureClass.TIMEOUT
    assert outcome.message.endswith("reading the response: timed out after 300ms")
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.body_bytes > 1024 * 1024  # counted, not kept


async def test_close_mid_body_is_a_failure(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert not outcome.success
    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message.endswith("connection closed after 10 bytes of the body")


async def test_close_without_response_is_a_failure(serve: Any) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Recorder().read(reader)

    port = await serve(hang_up)
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message.endswith("connection closed without a response")


async def test_close_on_accept_is_a_failure(serve: Any) -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass  # the fixture closes the connection at once

    port = await serve(slam)
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert re.search(
        r"connection (closed without a response|lost: connection reset)", outcome.message
    )


async def test_garbage_response_is_a_failure(serve: Any) -> None:
    port = await serve(respond(b"SSH-2.0-OpenSSH_9.6\r\n", linger=True))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert not outcome.success
    assert outcome.failure is FailureClass.HTTP_STATUS
    assert "invalid HTTP response" in outcome.message


async def test_endless_headers_are_cut_off(serve: Any) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Recorder().read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(2000):
            writer.write(b"X-Filler: " + b"x" * 100 + b"\r\n")
            await writer.drain()
        await reader.read()

    port = await serve(flood)
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message.endswith("response headers exceed 64 KiB")


async def test_one_endless_header_line_is_cut_off(serve: Any) -> None:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Recorder().read(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        while True:
            writer.write(b"y" * 65536)
            await writer.drain()

    port = await serve(flood)
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/", timeout="5s", interval="10s"))

    assert outcome.failure is FailureClass.HTTP_STATUS
    assert outcome.message.endswith("response headers exceed 64 KiB")


async def test_body_until_close_and_chunked_bodies_are_counted(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 70_000))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))
    assert outcome.success, outcome.message
    assert isinstance(outcome.details, HttpDetails)
    assert (outcome.details.http_version, outcome.details.body_bytes) == ("1.0", 70_000)

    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    port = await serve(respond(chunked, linger=True))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/", body_match="^abcde$"))
    assert outcome.success, outcome.message
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.body_bytes == 5


async def test_interim_response_is_skipped(serve: Any) -> None:
    port = await serve(respond(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK))
    outcome = await probe(http_check(f"http://127.0.0.1:{port}/"))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.status_code == 200


async def test_head_response_ends_with_its_headers(serve: Any) -> None:
    # A HEAD answer announces the length of a body it does not send; the server keeps
    # the connection open, so the probe must not wait for those bytes.
    port = await serve(respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", linger=True))
    check = http_check(f"http://127.0.0.1:{port}/", method="HEAD", timeout="2s", interval="3s")
    outcome = await probe(check)

    assert outcome.success, outcome.message


# HTTPS


def https_check(port: int, certs: Any, *, host: str = "127.0.0.1", **tls: Any) -> HttpCheck:
    options = {"ca_pem": certs["ca"].pem, **tls}
    return http_check(f"https://{host}:{port}/", tls=options, timeout="3s", interval="5s")


async def test_https_with_a_certificate_from_the_given_ca_is_up(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["valid"].server_context())
    outcome = await probe(https_check(port, certs))

    assert outcome.success, outcome.message
    assert outcome.phases.tls > 0
    assert outcome.warnings == ()
    assert isinstance(outcome.details, HttpDetails)
    session = outcome.details.tls
    assert isinstance(session, TlsDetails)
    assert session.version.startswith("TLSv1.")
    assert session.cipher
    assert session.subject == "CN=valid.test"
    assert session.issuer == "CN=Vantage Test CA"
    assert session.earliest_expiry == certs["valid"].earliest_expiry.timestamp()


async def test_https_by_name_verifies_the_name(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["valid"].server_context())
    outcome = await probe(https_check(port, certs, host="localhost"))

    assert outcome.success, outcome.message
    assert outcome.phases.resolve > 0


async def test_earliest_expiry_covers_the_presented_chain(serve: Any, certs: Any) -> None:
    # The leaf has 90 days left, the intermediate the server sends along only 10.
    port = await serve(respond(OK), tls=certs["chained"].server_context())
    outcome = await probe(https_check(port, certs))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.tls is not None
    assert outcome.details.tls.subject == "CN=chained.test"
    assert outcome.details.tls.earliest_expiry == certs["chained"].earliest_expiry.timestamp()
    [warning] = outcome.warnings
    assert warning.startswith("certificate CN=Vantage Test Intermediate expires in 9 days (")

    outcome = await probe(https_check(port, certs, cert_expiry_warning_days=7))
    assert outcome.success
    assert outcome.warnings == ()


async def test_certificate_expiring_soon_is_up_with_a_warning(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["expiring"].server_context())
    outcome = await probe(https_check(port, certs))

    assert outcome.success, outcome.message
    expiry = certs["expiring"].earliest_expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert outcome.warnings == (f"certificate CN=expiring.test expires in 3 days ({expiry})",)


async def test_self_signed_certificate_is_tls_cert_invalid(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["self_signed"].server_context())
    outcome = await probe(https_check(port, certs))

    assert outcome.failure is FailureClass.TLS_CERT_INVALID
    assert outcome.message == f"tls 127.0.0.1:{port}: self-signed certificate"
    assert outcome.phases.tls > 0
    assert outcome.details is None


async def test_unknown_ca_is_tls_cert_invalid(serve: Any, certs: Any) -> None:
    # Without ca_pem the system CAs apply, and they do not know the test CA.
    port = await serve(respond(OK), tls=certs["valid"].server_context())
    outcome = await probe(http_check(f"https://127.0.0.1:{port}/"))

    assert outcome.failure is FailureClass.TLS_CERT_INVALID
    assert outcome.message == f"tls 127.0.0.1:{port}: unable to get local issuer certificate"


async def test_expired_certificate_is_tls_cert_expired(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["expired"].server_context())
    outcome = await probe(https_check(port, certs))

    assert outcome.failure is FailureClass.TLS_CERT_EXPIRED
    assert outcome.message == f"tls 127.0.0.1:{port}: certificate has expired"


async def test_wrong_host_name_is_tls_cert_invalid(serve: Any, certs: Any) -> None:
    port = await serve(respond(OK), tls=certs["wrong_host"].server_context())
    outcome = await probe(https_check(port, certs))

    assert outcome.failure is FailureClass.TLS_CERT_INVALID
    assert outcome.message.startswith(f"tls 127.0.0.1:{port}: ")
    assert "mismatch" in outcome.message


async def test_server_name_sets_sni_and_the_verified_name(serve: Any, certs: Any) -> None:
    names: list[str | None] = []
    context = certs["wrong_host"].server_context()
    context.sni_callback = lambda sslobj, name, ctx: names.append(name)  # type: ignore[assignment,func-returns-value]
    port = await serve(respond(OK), tls=context)
    outcome = await probe(https_check(port, certs, server_name="wrong.example"))

    assert outcome.success, outcome.message
    assert names == ["wrong.example"]


async def test_no_verification_accepts_any_certificate_and_reports_expiry(
    serve: Any, certs: Any
) -> None:
    port = await serve(respond(OK), tls=certs["self_signed"].server_context())
    outcome = await probe(http_check(f"https://127.0.0.1:{port}/", tls={"verify": False}))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.tls is not None
    assert outcome.details.tls.earliest_expiry == certs["self_signed"].earliest_expiry.timestamp()
    assert outcome.warnings == ()

    port = await serve(respond(OK), tls=certs["expired"].server_context())
    outcome = await probe(http_check(f"https://127.0.0.1:{port}/", tls={"verify": False}))
    assert outcome.success, outcome.message
    [warning] = outcome.warnings
    assert warning.startswith("certificate CN=expired.test expired 1 day ago (")


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_client_certificate(
    blocking_tls_server: Any, certs: Any, maximum: ssl.TLSVersion
) -> None:
    # TLS 1.2 rejects a missing certificate in the handshake; TLS 1.3 only after the
    # client's handshake is over, with an alert the probe reads instead of a response.
    context = certs["valid"].server_context(client_ca=certs["ca"].pem, maximum_version=maximum)
    port = blocking_tls_server(context, OK)

    outcome = await probe(https_check(port, certs))
    assert outcome.failure is FailureClass.TLS_HANDSHAKE
    alert = "certificate required" if maximum is ssl.TLSVersion.TLSv1_3 else "handshake failure"
    assert outcome.message.startswith(f"tls 127.0.0.1:{port}: ")
    assert outcome.message.endswith(f"alert {alert}")

    client = certs["client"]
    check = https_check(port, certs, client_cert_pem=client.pem, client_key_pem=client.key_pem)
    outcome = await probe(check)
    assert outcome.success, outcome.message


async def test_tls_to_a_plain_server_is_tls_handshake(serve: Any, certs: Any) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # a ClientHello is no HTTP request
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    port = await serve(plain)
    outcome = await probe(https_check(port, certs))

    assert outcome.failure is FailureClass.TLS_HANDSHAKE
    assert outcome.message.startswith(f"tls 127.0.0.1:{port}: ")


async def test_garbage_on_the_tls_port_is_tls_handshake(serve: Any, certs: Any) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(range(256)) * 8)
        await reader.read()

    port = await serve(garbage)
    outcome = await probe(https_check(port, certs))

    assert outcome.failure is FailureClass.TLS_HANDSHAKE
    assert outcome.message.startswith(f"tls 127.0.0.1:{port}: ")


async def test_stalled_handshake_times_out_in_tls(serve: Any, certs: Any) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    port = await serve(stall)
    check = http_check(
        f"https://127.0.0.1:{port}/", tls={"ca_pem": certs["ca"].pem}, timeout="300ms"
    )
    outcome = await probe(check)

    assert outcome.failure is FailureClass.TIMEOUT
    assert outcome.message == f"tls 127.0.0.1:{port}: timed out after 300ms"
    assert outcome.phases.tls == pytest.approx(0.3, abs=0.1)


async def test_redirect_from_http_to_https(serve: Any, certs: Any) -> None:
    secure = await serve(respond(OK), tls=certs["expiring"].server_context())
    port = await serve(respond(redirect(301, f"https://localhost:{secure}/")))
    check = http_check(f"http://127.0.0.1:{port}/", tls={"ca_pem": certs["ca"].pem})
    outcome = await probe(check, tls_used=True)

    assert outcome.success, outcome.message
    assert outcome.phases.tls > 0
    assert isinstance(outcome.details, HttpDetails)
    assert outcome.details.final_url == f"https://localhost:{secure}/"
    assert outcome.details.tls is not None
    assert len(outcome.warnings) == 1


async def test_is_registered_and_refuses_other_checks() -> None:
    assert PROBES["http"] is probe_http
    tcp = parse_check({"name": "t", "type": "tcp", "target": "127.0.0.1:1"})
    with pytest.raises(TypeError):
        await probe_http(tcp)


# Resources


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_probes_leave_no_socket_behind(serve: Any, free_port: int) -> None:
    up = await serve(respond(OK))
    silent = await serve(lambda reader, writer: asyncio.Event().wait())
    checks = [
        http_check(f"http://127.0.0.1:{up}/"),
        http_check(f"http://127.0.0.1:{free_port}/"),
        http_check(f"http://127.0.0.1:{silent}/", timeout="100ms", interval="1s"),
    ]
    for check in checks:  # warm up: the first probe on a loop sets up what later ones share
        await probe(check)
    before = open_descriptors()

    outcomes = [await probe(check) for check in checks for _ in range(5)]

    assert [o.success for o in outcomes] == [True] * 5 + [False] * 10
    # The test's own servers still hold their side of the silent connections.
    assert open_descriptors() <= before + 5


async def test_a_finished_probe_leaves_no_reference_cycles(serve: Any, free_port: int) -> None:
    """Probes are freed by reference counting as they finish: at thousands a second, a
    cycle per probe would hand the garbage collector most of the agent's CPU."""
    port = await serve(respond(OK))
    checks = [http_check(f"http://127.0.0.1:{port}/"), http_check(f"http://127.0.0.1:{free_port}/")]
    await probe(checks[0])
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for check in checks:
            for _ in range(10):
                await probe(check)
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith("agent.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert ours == []
