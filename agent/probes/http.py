"""The HTTP probe: one request on a fresh connection, timed phase by phase.

Built on asyncio's transports and httptools' parser rather than an HTTP client library,
so that each phase has its own timestamp and the probe stays cheap enough for thousands
of probes a second in one process (uvloop makes the same code faster still).

Contract of ``probe_http``:

- One fresh TCP connection per probe, HTTP/1.1 with ``Connection: close``; for https the
  TLS handshake runs on the connected socket (``loop.start_tls``) so connect and tls are
  separate phases. TLS verifies against the system CAs with SNI, like a browser.
- It returns within the check's timeout and leaves no socket or task behind.
- Phases: resolve (zero for an IP literal), connect, tls (zero for http), processing
  (request sent to first response byte), transfer (first byte to end of body). They sum to
  the probe's duration.
- The body is counted and discarded, so memory per probe is bounded by the 64 KiB cap on
  response headers. Redirects are reported, not followed (3xx is in the default
  expected range).
- Failure classes: the dns_* and connect classes from ``network``; tls_cert_expired /
  tls_cert_invalid for a certificate that does not verify, tls_handshake for any other TLS
  failure; http_status for a status outside ``expected_status`` and also for a reply that
  is not a usable HTTP response (garbage, cut short, oversized headers): the server took
  the connection but did not answer properly; timeout once connected.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httptools

import vantage
from vantage.checks import AnyCheck, HttpCheck
from vantage.results import FailureClass, HttpDetails, ProbeOutcome

from .network import (
    PhaseClock,
    ProbeFailure,
    addresses_for,
    connect,
    describe_os_error,
    start_clock,
)

USER_AGENT = f"vantage-agent/{vantage.__version__}"
MAX_HEADER_BYTES = 64 * 1024
# X509_V_ERR_CERT_HAS_EXPIRED in OpenSSL's x509_vfy.h; the ssl module does not export it.
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# RFC 3986 characters that may stand unescaped in a path or query; '%' keeps an already
# escaped target as it is.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


async def probe_http(check: AnyCheck, *, tls: ssl.SSLContext | None = None) -> ProbeOutcome:
    """Run one HTTP(S) request for ``check`` and report what happened.

    ``tls`` replaces the default verifying context (system CAs); tests pass one that
    trusts their own certificate. Never raises for anything the target or the network
    does; TypeError for a check of another type.
    """
    if not isinstance(check, HttpCheck):
        raise TypeError(f"the http probe cannot run a {check.type} check")
    exchange = f"{check.method} {check.target}"
    try:
        request = _Request.build(check)
    except ProbeFailure as failure:
        return ProbeOutcome.failed(failure.failure, failure.message)
    clock = start_clock(request.host)
    reader: _ResponseReader | None = None
    transports: list[asyncio.Transport] = []
    deadline = asyncio.timeout(check.timeout)
    try:
        async with deadline:
            addresses = await addresses_for(clock, request.host, request.port, check.ip_version)

            def new_reader() -> _ResponseReader:
                return _ResponseReader(clock, exchange, head_only=check.method == "HEAD")

            stream, reader, peer = await connect(clock, addresses, request.port, new_reader)
            transports.append(stream)
            if request.tls:
                clock.enter("tls", f"TLS handshake with {peer}")
                stream = await _handshake(
                    clock, stream, reader, tls or _default_tls(), request.host, check.timeout
                )
                transports.append(stream)
            clock.enter("processing", f"{exchange}: waiting for the response")
            stream.write(request.head)
            await reader.done
    except ProbeFailure as failure:
        details = reader.details(check.target) if reader else None
        return ProbeOutcome.failed(failure.failure, failure.message, clock.phases(), details)
    except TimeoutError:
        if not deadline.expired():
            raise
        expired = clock.timed_out(check.timeout)
        details = reader.details(check.target) if reader else None
        return ProbeOutcome.failed(expired.failure, expired.message, clock.phases(), details)
    finally:
        # The response is complete or no longer wanted: no graceful TLS shutdown, which
        # could keep the socket open after the probe has returned.
        for transport in reversed(transports):
            transport.abort()
    phases = clock.phases()
    details = reader.details(check.target)
    if reader.error is not None:
        return ProbeOutcome.failed(
            FailureClass.HTTP_STATUS, f"{exchange}: {reader.error}", phases, details
        )
    if not any(low <= reader.status <= high for low, high in check.expected_status):
        expected = ", ".join(
            str(low) if low == high else f"{low}-{high}" for low, high in check.expected_status
        )
        return ProbeOutcome.failed(
            FailureClass.HTTP_STATUS,
            f"{exchange}: status {reader.status} not in {expected}",
            phases,
            details,
        )
    return ProbeOutcome(success=True, phases=phases, details=details)


@dataclass(frozen=True, slots=True)
class _Request:
    tls: bool
    host: str  # what to resolve, verify and send as SNI: ASCII, no brackets
    port: int
    head: bytes

    @classmethod
    def build(cls, check: HttpCheck) -> _Request:
        parts = urlsplit(check.target)
        tls = parts.scheme == "https"
        default_port = 443 if tls else 80
        port = parts.port or default_port
        hostname = parts.hostname or ""
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
        lines = [
            f"{check.method} {target} HTTP/1.1",
            f"Host: {authority}",
            f"User-Agent: {USER_AGENT}",
            "Accept: */*",
            "Connection: close",
        ]
        if check.method in _BODY_METHODS:
            lines.append("Content-Length: 0")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return cls(tls=tls, host=host, port=port, head=head)


async def _handshake(
    clock: PhaseClock,
    transport: asyncio.Transport,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    host: str,
    limit: float,
) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    try:
        upgraded = await loop.start_tls(
            transport, protocol, context, server_hostname=host, ssl_handshake_timeout=limit
        )
    except ssl.SSLCertVerificationError as exc:
        failure = (
            FailureClass.TLS_CERT_EXPIRED
            if exc.verify_code == _X509_V_ERR_CERT_HAS_EXPIRED
            else FailureClass.TLS_CERT_INVALID
        )
        raise ProbeFailure(failure, f"{clock.step}: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        reason = (exc.reason or type(exc).__name__).lower().replace("_", " ")
        raise ProbeFailure(FailureClass.TLS_HANDSHAKE, f"{clock.step}: {reason}") from None
    except TimeoutError:
        # start_tls's own handshake timer, which can fire a hair before the deadline.
        raise clock.timed_out(limit) from None
    except OSError as exc:
        raise ProbeFailure(
            FailureClass.TLS_HANDSHAKE, f"{clock.step}: {describe_os_error(exc)}"
        ) from None
    if upgraded is None:  # only for a transport closed under our feet
        raise ProbeFailure(FailureClass.TLS_HANDSHAKE, f"{clock.step}: connection closed")
    return upgraded


@functools.cache
def _default_tls() -> ssl.SSLContext:
    # Loading the system CA bundle takes milliseconds: do it once per process.
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class _ResponseReader(asyncio.Protocol):
    """Reads one HTTP/1.x response, keeping counts rather than bytes.

    ``done`` resolves (always with None) once the response is complete or cannot
    complete; ``error`` then says why not. On the first response byte it moves the clock
    into the transfer phase.
    """

    def __init__(self, clock: PhaseClock, exchange: str, *, head_only: bool) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: str | None = None
        self.status = 0
        self.http_version = ""
        self.body_bytes = 0
        self._clock = clock
        self._exchange = exchange
        self._head_only = head_only
        self._parser = httptools.HttpResponseParser(self)
        self._received_any = False
        self._header_bytes = 0
        self._headers_complete = False
        self._interim = False
        self._framed = False  # Content-Length or chunked: the body's end is known

    def details(self, url: str) -> HttpDetails | None:
        if not self.status:
            return None
        return HttpDetails(
            status_code=self.status,
            http_version=self.http_version,
            final_url=url,
            body_bytes=self.body_bytes,
        )

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        if not self._received_any:
            self._received_any = True
            self._clock.enter("transfer", f"{self._exchange}: reading the response")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish("the server switched protocols")
        except httptools.HttpParserError as exc:
            self._finish(f"invalid HTTP response: {exc}")
        if not self.done.done() and not self._headers_complete:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._finish(f"response headers exceed {MAX_HEADER_BYTES // 1024} KiB")

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost decides what the EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if isinstance(exc, OSError):
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

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_complete = True
        self.status = self._parser.get_status_code()
        self.http_version = self._parser.get_http_version()
        if 100 <= self.status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the answer follows
        elif self._head_only:
            # httptools cannot be told that a HEAD response has no body although it
            # may announce a Content-Length: the headers are the whole answer.
            self._finish(None)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._headers_complete = False
            return
        self._finish(None)

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.error = error
            self.done.set_result(None)
