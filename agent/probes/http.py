"""The HTTP probe: one request per hop on a fresh connection, timed phase by phase.

Built on asyncio's transports and httptools' parser rather than an HTTP client library,
so that each phase has its own timestamp and the probe stays cheap enough for thousands
of probes a second in one process (uvloop makes the same code faster still).

Contract of ``probe_http``:

- HTTP/1.1 with ``Connection: close``, one fresh TCP connection per request. The request
  carries the check's method, headers and body. The operator's headers replace the
  defaults (User-Agent, Accept) by name, case-insensitively; Host, Content-Length,
  Transfer-Encoding and Connection belong to the probe and are not taken from the check.
  A body is sent as UTF-8 with its Content-Length whatever the method; POST, PUT and
  PATCH without one send ``Content-Length: 0``.
- https: the TLS handshake runs on the connected socket (``loop.start_tls``) so connect
  and tls are separate phases. The context comes from the check's ``tls`` options
  (``tls.py``: verification, CA bundle, client certificate); SNI and host-name
  verification use ``tls.server_name`` when set, else the URL's host.
- Redirects (301, 302, 303, 307 and 308 with a Location) are followed when
  ``follow_redirects`` is set, at most ``max_redirects`` of them, each hop on a new
  connection to the Location resolved against the current URL; a redirect response's
  body is not read. 303 turns any method but HEAD into a GET without body, 301 and 302
  turn a POST into one; 307 and 308 repeat the request as it was. The Authorization
  header is dropped once a hop leaves the target's origin, and ``tls.server_name``
  applies only to hops to the target's own host. Without ``follow_redirects`` a 3xx is
  the final response (3xx is in the default expected range).
- It returns within the check's timeout and leaves no socket or task behind, whatever
  the server does.
- On-demand runs under a guard (``network.ON_DEMAND_GUARD``) screen every hop's
  addresses, redirects included, before connecting (``network.screen``); a refused one
  fails the probe as internal ("guard: 10.0.0.5 (private) is not allowed ...").
- Phases, summed over all hops: resolve (zero for an IP literal), connect, tls (zero for
  plain http), processing (request sent to first response byte) and transfer (first
  byte to end of body). They sum to the probe's duration.
- The body is counted; only when the check has ``body_match`` or ``body_not_match`` are
  its first ``MAX_MATCH_BYTES`` kept (decoded as UTF-8) and searched with the patterns.
  Memory per probe is bounded by that and by the 64 KiB cap on response headers.
- Details (``HttpDetails``) describe the final response: status, HTTP version, URL,
  body size, the number of redirects followed, the peer, and for https the TLS session
  of the last hop. A certificate that expires within ``tls.cert_expiry_warning_days``
  (on any hop) adds a warning; success is unaffected.
- Failure classes: the dns_* and connect classes from ``network``; tls_cert_expired,
  tls_cert_invalid and tls_handshake from ``tls``; http_status for a status outside
  ``expected_status``, too many redirects or an unusable redirect, and also for a reply
  that is not a usable HTTP response (garbage, cut short, oversized headers): the server
  took the connection but did not answer properly; body_mismatch when a body pattern
  says so; timeout once connected.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import functools
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urljoin, urlsplit

import httptools

import vantage
from vantage.checks import AnyCheck, HttpCheck, IpVersion
from vantage.results import FailureClass, HttpDetails, ProbeOutcome, TlsDetails

from . import tls
from .launch import Abort, Done, Launch
from .network import (
    PhaseClock,
    ProbeFailure,
    addresses_for,
    by_ip_version,
    classify_connect_error,
    connect,
    current_guard,
    deadline,
    describe_os_error,
    enter_host,
    format_peer,
    ip_literal,
    per_check,
    start_clock,
    watcher,
)

USER_AGENT = f"vantage-agent/{vantage.__version__}"
MAX_HEADER_BYTES = 64 * 1024
MAX_MATCH_BYTES = 1024 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_PROBE_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_ALPN = ("http/1.1",)
_RECV_SIZE = 256 * 1024
# Direct connections receive into one preallocated buffer per thread: allocating a
# 256 KiB bytes object per recv() cost more than the rest of reading a small response.
# The parser is done with the bytes before the next receive on that thread.
_receive_buffers = threading.local()
# RFC 3986 characters that may stand unescaped in a path or query; '%' keeps an already
# escaped target as it is.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


async def probe_http(check: AnyCheck) -> ProbeOutcome:
    """Run one HTTP(S) request for ``check``, following redirects as it asks, and report
    what happened.

    Never raises for anything the target or the network does; TypeError for a check of
    another type.
    """
    if not isinstance(check, HttpCheck):
        raise TypeError(f"the http probe cannot run a {check.type} check")
    plan = _plan(check)
    if isinstance(plan, ProbeFailure):
        return ProbeOutcome.failed(plan.failure, plan.message)
    # An on-demand run under the guard takes the general path, whose every hop goes
    # through ``addresses_for`` (and so the guard): the direct path's callbacks run
    # outside this task's context. Scheduled runs of direct checks never come here:
    # the scheduler launches them (``prepare_http``).
    if plan.direct is not None and current_guard() is None:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[ProbeOutcome] = loop.create_future()
        run = _DirectRun(loop, check, plan, plan.direct, outcome.set_result)
        try:
            return await outcome
        finally:
            run.abort()
    return await _probe_hops(
        check, plan, start_clock(plan.request.url.host), plan.request, 0, check.timeout
    )


def prepare_http(check: AnyCheck) -> Launch | None:
    """``probe_http`` on loop callbacks, for checks that take the direct path (plain http
    to an IP address); None for the others. See ``agent.probes.Launch``."""
    if not isinstance(check, HttpCheck):
        return None
    plan = _plan(check)
    if isinstance(plan, ProbeFailure) or plan.direct is None:
        return None
    direct = plan.direct

    def launch(loop: asyncio.AbstractEventLoop, done: Done) -> Abort:
        return _DirectRun(loop, check, plan, direct, done).abort

    return launch


class _DirectRun:
    """The common case, plain http to an IP address, without a task, asyncio's
    transports or timeouts: one socket driven by loop callbacks and one timer for the
    deadline. ``done`` gets the outcome exactly once (possibly before the constructor
    returns, when connecting fails at once), unless ``abort`` came first. A redirect to
    follow goes on in a task running ``_probe_hops`` within what is left of the timeout.
    """

    __slots__ = (
        "_check",
        "_clock",
        "_connection",
        "_deadline",
        "_direct",
        "_done",
        "_hops",
        "_loop",
        "_plan",
        "_reader",
        "_timer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        check: HttpCheck,
        plan: _Plan,
        direct: _Direct,
        done: Done,
    ) -> None:
        self._loop = loop
        self._check = check
        self._plan = plan
        self._direct = direct
        self._done: Done | None = done
        self._hops: asyncio.Task[ProbeOutcome] | None = None
        self._deadline = loop.time() + check.timeout
        self._clock = PhaseClock("connect", direct.step)
        self._reader = _ResponseReader(
            self._clock, plan.request, plan.keep_body, check.follow_redirects, self._answered
        )
        self._connection = _PlainConnection(loop, self._reader)
        self._timer = deadline(loop, self._deadline, self._connection.expire)
        self._connection.open(direct.family, direct.address, plan.request.data)

    def abort(self) -> None:
        """Stop without an outcome and release everything; nothing once it has one."""
        self._done = None
        self._timer.cancel()
        self._connection.close()
        if self._hops is not None:
            self._hops.cancel()

    def _answered(self) -> None:
        """The reader is done: the connection goes, and the outcome goes to ``done``."""
        self._timer.cancel()
        self._connection.close()
        if self._done is None:
            return
        try:
            outcome = self._outcome()
        except Exception as exc:  # a bug here must still end the run
            outcome = ProbeOutcome.failed(
                FailureClass.INTERNAL, f"probe failed: {type(exc).__name__}: {exc}"
            )
        if outcome is not None:
            self._finish(outcome)

    def _outcome(self) -> ProbeOutcome | None:
        """The outcome, or None when a redirect goes on in a task that will finish."""
        check, plan, clock, reader = self._check, self._plan, self._clock, self._reader
        connection = self._connection
        request = plan.request
        peer = self._direct.peer if connection.connected else ""
        try:
            if connection.expired:
                raise clock.timed_out(check.timeout)
            if connection.connect_error is not None:
                error = connection.connect_error
                raise ProbeFailure(
                    classify_connect_error(error),
                    f"{self._direct.step}: {describe_os_error(error)}",
                )
            if reader.error is not None:
                raise ProbeFailure(FailureClass.HTTP_STATUS, f"{request.exchange}: {reader.error}")
            if reader.location is not None:
                request = _next_hop(check, request, reader)
                enter_host(clock, request.url.host)
                budget = self._deadline - self._loop.time()
                self._hops = self._loop.create_task(
                    _probe_hops(check, plan, clock, request, 1, budget)
                )
                self._hops.add_done_callback(self._hopped)
                return None
        except ProbeFailure as failure:
            details = _details(reader, request, 0, peer, None)
            return ProbeOutcome.failed(failure.failure, failure.message, clock.phases(), details)
        return _judge(check, plan, clock, request, reader, 0, peer, None, ())

    def _hopped(self, task: asyncio.Task[ProbeOutcome]) -> None:
        if task.cancelled():
            return  # aborted
        error = task.exception()
        if error is None:
            self._finish(task.result())
        else:
            self._finish(
                ProbeOutcome.failed(
                    FailureClass.INTERNAL, f"probe failed: {type(error).__name__}: {error}"
                )
            )

    def _finish(self, outcome: ProbeOutcome) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(outcome)


async def _probe_hops(
    check: HttpCheck,
    plan: _Plan,
    clock: PhaseClock,
    request: _Request,
    redirects: int,
    budget: float,
) -> ProbeOutcome:
    """The general case: every hop on asyncio transports (TLS, names to resolve), from
    ``request`` on, ``redirects`` already followed, within ``budget`` seconds."""
    reader: _ResponseReader | None = None
    peer = ""
    session: TlsDetails | None = None
    warnings: tuple[str, ...] = ()
    transports: list[asyncio.Transport] = []
    deadline = asyncio.timeout(budget)
    try:
        async with deadline:
            while True:
                url = request.url
                addresses = await addresses_for(clock, url.host, url.port, check.ip_version)
                answered = asyncio.get_running_loop().create_future()
                new_reader = functools.partial(
                    _ResponseReader,
                    clock,
                    request,
                    plan.keep_body,
                    check.follow_redirects,
                    functools.partial(answered.set_result, None),
                )
                stream, reader, peer = await connect(clock, addresses, url.port, new_reader)
                transports.append(stream)
                if url.tls:
                    clock.enter("tls", f"tls {peer}")
                    context = tls.client_context(check.tls, _ALPN)
                    server_name = url.host
                    if check.tls.server_name and url.host == plan.request.url.host:
                        server_name = check.tls.server_name
                    stream = await tls.handshake(
                        clock, stream, reader, context, server_name, check.timeout
                    )
                    transports.append(stream)
                    session, warning = tls.inspect(stream, check.tls)
                    if warning is not None and warning not in warnings:
                        warnings = (*warnings, warning)
                else:
                    session = None
                reader.send(stream, request.data)
                await answered
                # The response is complete or no longer wanted: no graceful TLS shutdown,
                # which could keep the socket open after the probe has returned.
                for transport in reversed(transports):
                    transport.abort()
                transports.clear()
                if reader.tls_error is not None:
                    raise tls.failure(f"tls {peer}", reader.tls_error)
                if reader.error is not None:
                    raise ProbeFailure(
                        FailureClass.HTTP_STATUS, f"{request.exchange}: {reader.error}"
                    )
                if reader.location is None:
                    break
                request = _next_hop(check, request, reader, redirects)
                redirects += 1
                reader, peer, session = None, "", None
                enter_host(clock, request.url.host)
    except ProbeFailure as failure:
        details = _details(reader, request, redirects, peer, session)
        return ProbeOutcome.failed(
            failure.failure, failure.message, clock.phases(), details, warnings
        )
    except TimeoutError:
        if not deadline.expired():
            raise
        expired = clock.timed_out(check.timeout)
        details = _details(reader, request, redirects, peer, session)
        return ProbeOutcome.failed(
            expired.failure, expired.message, clock.phases(), details, warnings
        )
    finally:
        for transport in reversed(transports):
            transport.abort()
    return _judge(check, plan, clock, request, reader, redirects, peer, session, warnings)


def _next_hop(
    check: HttpCheck, request: _Request, reader: _ResponseReader, redirects: int = 0
) -> _Request:
    """The request after ``reader``'s redirect; ProbeFailure when there is none to make."""
    assert reader.location is not None
    if redirects == check.max_redirects:
        raise ProbeFailure(
            FailureClass.HTTP_STATUS,
            f"{request.exchange}: too many redirects (more than {check.max_redirects})",
        )
    return _redirect(check, request, reader.status, reader.location)


def _judge(
    check: HttpCheck,
    plan: _Plan,
    clock: PhaseClock,
    request: _Request,
    reader: _ResponseReader,
    redirects: int,
    peer: str,
    session: TlsDetails | None,
    warnings: tuple[str, ...],
) -> ProbeOutcome:
    """The outcome of a final response that arrived whole: status and body verdicts."""
    verdict: tuple[FailureClass, str] | None = None
    status = reader.status
    if status not in plan.expected_codes:
        verdict = (
            FailureClass.HTTP_STATUS,
            f"{request.exchange}: status {status} not in {plan.expected_status}",
        )
    elif plan.keep_body:
        # Matching up to 1 MiB takes time too: the clock, still in transfer, counts it.
        body = reader.body_text()
        if plan.body_match is not None and not plan.body_match.search(body):
            mismatch = f"body does not match {plan.body_match.pattern!r}"
            verdict = (FailureClass.BODY_MISMATCH, f"{request.exchange}: {mismatch}")
        elif plan.body_not_match is not None and plan.body_not_match.search(body):
            mismatch = f"body matches {plan.body_not_match.pattern!r} (body_not_match)"
            verdict = (FailureClass.BODY_MISMATCH, f"{request.exchange}: {mismatch}")
    phases = clock.phases()
    details = HttpDetails(
        status, reader.http_version, request.url.text, reader.body_bytes, redirects, peer, session
    )
    if verdict is not None:
        return ProbeOutcome.failed(verdict[0], verdict[1], phases, details, warnings)
    return ProbeOutcome(True, None, "", phases, details, warnings)


def _details(
    reader: _ResponseReader | None,
    request: _Request,
    redirects: int,
    peer: str,
    session: TlsDetails | None,
) -> HttpDetails | None:
    """Details for a failed probe; None when it learned nothing about the target."""
    status = reader.status if reader is not None else 0
    if not status and not redirects and session is None:
        return None
    return HttpDetails(
        status_code=status,
        http_version=reader.http_version if reader is not None else "",
        final_url=request.url.text,
        body_bytes=reader.body_bytes if reader is not None else 0,
        redirects=redirects,
        peer=peer,
        tls=session,
    )


@dataclass(frozen=True, slots=True)
class _Url:
    """An http(s) URL taken apart for one request."""

    text: str
    tls: bool
    host: str  # what to resolve, verify and send as SNI: ASCII, no brackets
    port: int
    authority: str  # the Host header
    target: str  # the request-target: escaped path and query

    @classmethod
    def parse(cls, text: str) -> _Url:
        """ValueError (saying why) for a URL the probe cannot request; ProbeFailure
        (dns_nxdomain) for a host name that IDNA cannot encode."""
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http:// or https:// URL")
        tls_ = parts.scheme == "https"
        default_port = 443 if tls_ else 80
        port = parts.port or default_port  # ValueError for a bad port
        hostname = parts.hostname
        try:
            host = hostname if hostname.isascii() else hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise ProbeFailure(
                FailureClass.DNS_NXDOMAIN, f"resolve {hostname}: not a valid host name"
            ) from None
        authority = f"[{host}]" if ":" in host else host
        if port != default_port:
            authority = f"{authority}:{port}"
        target = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            target = f"{target}?{quote(parts.query, safe=_QUERY_SAFE)}"
        return cls(text, tls_, host, port, authority, target)

    @property
    def origin(self) -> tuple[bool, str, int]:
        return (self.tls, self.host, self.port)


@dataclass(frozen=True, slots=True)
class _Request:
    """One hop's request, ready to write."""

    url: _Url
    method: str
    body: bytes | None
    authorization: bool  # whether the check's Authorization header goes with it
    exchange: str  # "GET https://example.org/", the prefix of messages
    data: bytes  # head and body
    waiting: str  # the steps of the processing and transfer phases
    reading: str

    @classmethod
    def build(
        cls, check: HttpCheck, url: _Url, method: str, body: bytes | None, authorization: bool
    ) -> _Request:
        headers = {"user-agent": f"User-Agent: {USER_AGENT}", "accept": "Accept: */*"}
        for name, value in check.headers.items():
            key = name.lower()
            if key in _PROBE_HEADERS or (key == "authorization" and not authorization):
                continue
            headers[key] = f"{name}: {value}"
        lines = [f"{method} {url.target} HTTP/1.1", f"Host: {url.authority}", *headers.values()]
        lines.append("Connection: close")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        elif method in _BODY_METHODS:
            lines.append("Content-Length: 0")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode()
        if body:
            data += body
        exchange = f"{method} {url.text}"
        return cls(
            url,
            method,
            body,
            authorization,
            exchange,
            data,
            f"{exchange}: waiting for the response",
            f"{exchange}: reading the response",
        )


@dataclass(frozen=True, slots=True)
class _Plan:
    """What every run of one check needs, derived once per check object."""

    request: _Request
    body_match: re.Pattern[str] | None
    body_not_match: re.Pattern[str] | None
    expected_status: str  # "200-399", for messages
    expected_codes: frozenset[int]  # the same, spelled out
    direct: _Direct | None  # plain http to an IP address: the fast path

    @property
    def keep_body(self) -> bool:
        return self.body_match is not None or self.body_not_match is not None


@dataclass(frozen=True, slots=True)
class _Direct:
    """Where a plain-http check to an IP address connects, worked out once."""

    family: socket.AddressFamily
    address: tuple[str, int]
    peer: str  # "192.0.2.1:80"
    step: str  # "connect 192.0.2.1:80"

    @classmethod
    def of(cls, url: _Url, ip_version: IpVersion) -> _Direct | None:
        literal = ip_literal(url.host)
        if url.tls or literal is None or not by_ip_version([literal], ip_version):
            return None
        family, address = literal
        peer = format_peer(address, url.port)
        return cls(family, (address, url.port), peer, f"connect {peer}")


@per_check
def _plan(check: HttpCheck) -> _Plan | ProbeFailure:
    try:
        url = _Url.parse(check.target)
    except ProbeFailure as failure:
        return failure
    except ValueError as exc:  # the check's validation makes this unreachable
        return ProbeFailure(FailureClass.INTERNAL, f"target {check.target!r}: {exc}")
    body = check.body.encode() if check.body is not None else None
    request = _Request.build(check, url, check.method, body, authorization=True)
    expected = ", ".join(
        str(low) if low == high else f"{low}-{high}" for low, high in check.expected_status
    )
    return _Plan(
        request=request,
        body_match=re.compile(check.body_match) if check.body_match is not None else None,
        body_not_match=(
            re.compile(check.body_not_match) if check.body_not_match is not None else None
        ),
        expected_status=expected,
        expected_codes=frozenset(
            code for low, high in check.expected_status for code in range(low, high + 1)
        ),
        direct=_Direct.of(url, check.ip_version),
    )


def _redirect(check: HttpCheck, request: _Request, status: int, location: str) -> _Request:
    """The request that follows ``request``'s redirect to ``location``."""
    text = urljoin(request.url.text, location)
    try:
        url = _Url.parse(text)
    except ValueError as exc:
        raise ProbeFailure(
            FailureClass.HTTP_STATUS, f"{request.exchange}: redirect to {location!r}: {exc}"
        ) from None
    method, body = request.method, request.body
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, body = "GET", None
    authorization = request.authorization and url.origin == request.url.origin
    return _Request.build(check, url, method, body, authorization)


class _ResponseReader(asyncio.Protocol):
    """Reads one HTTP/1.x response, keeping counts rather than bytes.

    ``on_done`` is called once, when the response is complete or cannot complete
    (``finished`` is then true); ``error`` (or, for a TLS alert after the handshake,
    ``tls_error``) then says why not. ``location`` is set when the response is a redirect
    to follow: the reader stops at its headers. Once the request is sent (``send``) the
    first response byte moves the clock into the transfer phase.
    """

    def __init__(
        self,
        clock: PhaseClock,
        request: _Request,
        keep_body: bool,
        follow_redirects: bool,
        on_done: Callable[[], None],
    ) -> None:
        self.finished = False
        self._on_done = on_done
        self.error: str | None = None
        self.tls_error: ssl.SSLError | None = None
        self.status = 0
        self.http_version = ""
        self.body_bytes = 0
        self.location: str | None = None
        self._clock = clock
        self._request = request
        self._head_only = request.method == "HEAD"
        self._follow = follow_redirects
        self._kept: list[bytes] | None = [] if keep_body else None
        self._kept_bytes = 0
        self._parser: httptools.HttpResponseParser | _Finished = httptools.HttpResponseParser(self)
        self._sent = False
        self._received_any = False
        self._header_bytes = 0
        self._headers_complete = False
        self._interim = False
        self._framed = False  # Content-Length or chunked: the body's end is known
        self._location: bytes | None = None

    def send(self, transport: _Writer, data: bytes) -> None:
        """Write the request and start the processing phase."""
        if not self._received_any:  # a server that speaks first is already in transfer
            self._clock.enter("processing", self._request.waiting)
        self._sent = True
        transport.write(data)

    def body_text(self) -> str:
        """The kept part of the body (see MAX_MATCH_BYTES), decoded as UTF-8."""
        return b"".join(self._kept or ()).decode("utf-8", "replace")

    # asyncio.Protocol

    def data_received(self, data: bytes | memoryview) -> None:
        if self.finished:
            return
        if not self._received_any:
            self._received_any = True
            if self._sent:
                self._clock.enter("transfer", self._request.reading)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish("the server switched protocols")
        except httptools.HttpParserError as exc:
            self._finish(f"invalid HTTP response: {exc}")
        if not self.finished and not self._headers_complete:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._finish(f"response headers exceed {MAX_HEADER_BYTES // 1024} KiB")

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        if self.finished:
            return
        if tls.is_tls_close(exc):
            exc = None
        if isinstance(exc, ssl.SSLError):
            self.tls_error = exc
            self._finish("TLS error")
        elif isinstance(exc, OSError):
            self._finish(f"connection lost: {describe_os_error(exc)}")
        elif exc is not None:
            self._finish(f"connection lost: {exc}")
        elif self._headers_complete and not self._framed and not self._interim:
            self._finish(None)  # a body delimited by the end of the connection
        elif not self._received_any:
            self._finish("connection closed without a response")
        elif not self._headers_complete:
            self._finish("connection closed in the middle of the response headers")
        else:
            self._finish(f"connection closed after {self.body_bytes} bytes of the body")

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers_complete = False
        self._framed = False
        self._location = None

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.lower()
        if key in (b"content-length", b"transfer-encoding"):
            self._framed = True
        elif key == b"location":
            self._location = value

    def on_headers_complete(self) -> None:
        self._headers_complete = True
        self.status = self._parser.get_status_code()
        self.http_version = self._parser.get_http_version()
        if 100 <= self.status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the answer follows
        elif self._follow and self.status in _REDIRECTS and self._location:
            self.location = self._location.decode("utf-8", "replace").strip()
            self._finish(None)  # the next hop is all that matters now
        elif self._head_only:
            # httptools cannot be told that a HEAD response has no body although it
            # may announce a Content-Length: the headers are the whole answer.
            self._finish(None)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self._kept is not None and self._kept_bytes < MAX_MATCH_BYTES:
            part = bytes(body[: MAX_MATCH_BYTES - self._kept_bytes])
            self._kept.append(part)
            self._kept_bytes += len(part)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._headers_complete = False
            return
        self._finish(None)

    def abandon(self) -> None:
        """Finish without a verdict on the response: the caller knows why."""
        self._finish(None)

    def _finish(self, error: str | None) -> None:
        if not self.finished:
            self.finished = True
            self.error = error
            # The parser and the callback refer back to this reader: dropping them lets
            # reference counting free a finished probe at once instead of leaving a
            # cycle per probe to the garbage collector.
            on_done, self._on_done = self._on_done, _nothing
            self._parser = _FINISHED_PARSER
            on_done()


def _nothing() -> None:
    pass


class _Finished:
    """Stands in for the parser of a finished reader: nothing more is parsed."""

    def feed_data(self, data: bytes | memoryview) -> None:
        pass

    def get_status_code(self) -> int:
        return 0

    def get_http_version(self) -> str:
        return ""


_FINISHED_PARSER = _Finished()


class _Writer(Protocol):
    def write(self, data: bytes) -> None: ...


class _PlainConnection:
    """One plain TCP connection driven by event-loop callbacks for ``_probe_direct``:
    connect, write the request once connected (``reader.send``, which starts the
    processing phase), feed what arrives to the reader and end with it.

    Every outcome finishes the reader: the response's (the reader's ``error``),
    ``connect_error`` when connecting failed, ``expired`` when ``expire`` (the probe's
    deadline) came first. ``close`` releases the socket; call it whatever happened.
    """

    __slots__ = (
        "_data",
        "_fd",
        "_pending",
        "_reader",
        "_reading",
        "_sock",
        "_watcher",
        "_writing",
        "connect_error",
        "connected",
        "expired",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: _ResponseReader) -> None:
        self._watcher = watcher(loop)
        self._reader = reader
        # The C socket type: ``socket.socket`` adds a Python __init__ and close() that cost
        # about 1 us per probe and offer nothing used here.
        self._sock: _socket.socket | None = None
        self._fd = -1
        self._data = b""
        self._pending = b""  # what the kernel did not take yet
        self._reading = False
        self._writing = False
        self.connected = False
        self.connect_error: OSError | None = None
        self.expired = False

    def open(self, family: socket.AddressFamily, address: tuple[str, int], data: bytes) -> None:
        """Start connecting to ``address``; ``data`` goes out once connected."""
        self._data = data
        try:
            sock = self._sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self._fd = sock.fileno()
            code = sock.connect_ex(address)
        except OSError as exc:  # no descriptors left, no such family
            self._connect_failed(exc)
            return
        if code == errno.EINPROGRESS:
            # On loopback (and to a listening local address in general) the handshake
            # completes within connect(): no need to wait for the socket to be writable.
            try:
                sock.getpeername()
            except OSError:
                self._writing = True
                self._watcher.add_writer(self._fd, self._on_connect)
                return
        elif code:
            self._connect_failed(OSError(code, os.strerror(code)))
            return
        self._on_connected()

    def expire(self) -> None:
        self.expired = True
        self._reader.abandon()

    def close(self) -> None:
        if self._reading or self._writing:
            self._reading = self._writing = False
            self._watcher.discard(self._fd)
        if self._sock is not None:
            self._sock.close()

    def write(self, data: bytes) -> None:
        if self._pending:
            self._pending += data
            return
        assert self._sock is not None
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._pending = data[sent:]
            self._writing = True
            self._watcher.add_writer(self._fd, self._flush)

    def _on_connect(self) -> None:
        assert self._sock is not None
        self._writing = False
        self._watcher.remove_writer(self._fd)
        code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_failed(OSError(code, os.strerror(code)))
        else:
            self._on_connected()

    def _on_connected(self) -> None:
        self.connected = True
        self._reading = True
        self._watcher.add_reader(self._fd, self._on_readable)
        self._reader.send(self, self._data)

    def _connect_failed(self, exc: OSError) -> None:
        self.connect_error = exc
        self._reader.abandon()

    def _flush(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        self._pending = self._pending[sent:]
        if not self._pending:
            self._writing = False
            self._watcher.remove_writer(self._fd)

    def _on_readable(self) -> None:
        assert self._sock is not None
        buffer = _receive_buffer()
        try:
            size = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if size:
            self._reader.data_received(buffer[:size])
        else:
            self._lost(None)

    def _lost(self, exc: OSError | None) -> None:
        self._unwatch()
        self._reader.connection_lost(exc)

    def _unwatch(self) -> None:
        if self._reading:
            self._reading = False
            self._watcher.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._watcher.remove_writer(self._fd)


def _receive_buffer() -> memoryview:
    try:
        buffer: memoryview = _receive_buffers.buffer
    except AttributeError:
        buffer = _receive_buffers.buffer = memoryview(bytearray(_RECV_SIZE))
    return buffer
