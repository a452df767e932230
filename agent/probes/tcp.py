"""The TCP probe: connect, optionally speak TLS, optionally send and expect text.

Contract of ``probe_tcp``:

- Resolves the host (no resolve phase for an IP literal) and opens one TCP connection to
  the first address that accepts; the peer it reached goes in ``TcpDetails.peer``.
- With ``tls``, runs the TLS handshake on that connection (phase ``tls``) with the same
  context, verification, failure classes and certificate-expiry warning as the HTTP
  probe (``tls.py``, no ALPN); the session goes in ``TcpDetails.tls``. A TLS 1.3 server
  that rejects the client's certificate says so only after the client's handshake has
  finished: without ``expect`` the probe does not read, and so does not notice.
- With ``send``, writes that text as UTF-8 once connected (and after TLS). Without
  ``expect`` the probe then closes the connection at once: what the kernel has taken
  is delivered, which for a text that fits the socket buffer is all of it.
- With ``expect``, reads until the text received (decoded as Latin-1, so any bytes
  decode; at most ``MAX_RECEIVED`` characters) contains a match of the pattern
  (``re.search``): up. When the peer closes first, or the cap is reached without a match,
  it is body_mismatch ("read 192.0.2.1:25: expected ^220, got 'HELLO'"); when the
  deadline comes first, timeout, with what arrived in the message.
  ``TcpDetails.received`` holds the first ``RECEIVED_DETAIL`` characters received.
- Phases: resolve, connect, tls; the time spent sending and reading counts as
  ``processing`` (the service thinking and answering), so phases still sum to the
  probe's duration.
- It returns within the check's timeout and leaves no socket behind.
- Failure classes: dns_nxdomain / dns_servfail / dns_timeout while resolving,
  connect_refused / network_unreachable / connect_timeout while connecting,
  tls_cert_expired / tls_cert_invalid / tls_handshake for TLS, body_mismatch and timeout
  for ``expect``.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl

from vantage.checks import AnyCheck, TcpCheck, split_host_port
from vantage.durations import format_duration
from vantage.results import FailureClass, ProbeOutcome, TcpDetails, TlsDetails

from . import tls
from .network import ProbeFailure, addresses_for, connect, describe_os_error, start_clock

MAX_RECEIVED = 64 * 1024
RECEIVED_DETAIL = 256
_SHOWN = 100  # characters of what was received quoted in a message


async def probe_tcp(check: AnyCheck) -> ProbeOutcome:
    """Connect (and speak TLS, send, expect) for ``check`` and report what happened.

    Never raises for anything the target or the network does; TypeError for a check of
    another type.
    """
    if not isinstance(check, TcpCheck):
        raise TypeError(f"the tcp probe cannot run a {check.type} check")
    host, port = split_host_port(check.target)
    clock = start_clock(host)
    transports: list[asyncio.Transport] = []
    conversation = _Conversation()
    peer = ""
    session: TlsDetails | None = None
    warnings: tuple[str, ...] = ()
    deadline = asyncio.timeout(check.timeout)

    def details() -> TcpDetails:
        return TcpDetails(peer=peer, tls=session, received=conversation.text()[:RECEIVED_DETAIL])

    try:
        async with deadline:
            addresses = await addresses_for(clock, host, port, check.ip_version)
            stream, _, peer = await connect(clock, addresses, port, lambda: conversation)
            transports.append(stream)
            if check.tls is not None:
                clock.enter("tls", f"tls {peer}")
                context = tls.client_context(check.tls)
                server_name = check.tls.server_name or host
                stream = await tls.handshake(
                    clock, stream, conversation, context, server_name, check.timeout
                )
                transports.append(stream)
                session, warning = tls.inspect(stream, check.tls)
                if warning is not None:
                    warnings = (warning,)
            if check.send is not None or check.expect is not None:
                clock.enter("processing", f"read {peer}")
            if check.send is not None:
                stream.write(check.send.encode())
            if check.expect is not None:
                await _expect(peer, conversation, _pattern(check.expect))
    except ProbeFailure as failure:
        return ProbeOutcome.failed(
            failure.failure,
            failure.message,
            clock.phases(),
            details() if peer else None,
            warnings,
        )
    except TimeoutError:
        if not deadline.expired():
            raise
        expired = clock.timed_out(check.timeout)
        message = expired.message
        if clock.phase == "processing" and check.expect is not None:
            message = (
                f"{clock.step}: timed out after {format_duration(check.timeout)} "
                f"waiting for {check.expect}, got {_shown(conversation.text())}"
            )
        return ProbeOutcome.failed(
            expired.failure, message, clock.phases(), details() if peer else None, warnings
        )
    finally:
        for transport in reversed(transports):
            transport.abort()
    return ProbeOutcome(success=True, phases=clock.phases(), details=details(), warnings=warnings)


async def _expect(peer: str, conversation: _Conversation, pattern: re.Pattern[str]) -> None:
    """Return once what was received matches ``pattern``; ProbeFailure (body_mismatch, or
    a TLS class for a TLS alert) once it cannot any more (peer gone, cap reached). Runs
    until the caller's deadline cancels it."""
    while True:
        text = conversation.text()
        if pattern.search(text):
            return
        if conversation.tls_error is not None:
            raise tls.failure(f"tls {peer}", conversation.tls_error)
        if conversation.closed or len(text) >= MAX_RECEIVED:
            why = f"read {peer}: expected {pattern.pattern}, got {_shown(text)}"
            if conversation.error is not None:
                why = f"{why} ({conversation.error})"
            raise ProbeFailure(FailureClass.BODY_MISMATCH, why)
        await conversation.changed()


def _shown(text: str) -> str:
    # ascii(): one line of plain ASCII whatever the peer sent.
    return ascii(text[:_SHOWN]) + ("..." if len(text) > _SHOWN else "")


@functools.lru_cache(maxsize=1024)
def _pattern(expect: str) -> re.Pattern[str]:
    return re.compile(expect)


class _Conversation(asyncio.Protocol):
    """Collects what the peer sends (up to MAX_RECEIVED bytes) and whether it has gone."""

    def __init__(self) -> None:
        self.closed = False
        self.error: str | None = None  # why the connection was lost, if not a clean close
        self.tls_error: ssl.SSLError | None = None
        self._received = bytearray()
        self._text = ""
        self._waiter: asyncio.Future[None] | None = None

    def text(self) -> str:
        """What was received so far, decoded as Latin-1."""
        if len(self._text) != len(self._received):
            self._text = self._received.decode("latin-1")
        return self._text

    async def changed(self) -> None:
        """Wait until more data arrives or the connection is lost."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def data_received(self, data: bytes) -> None:
        room = MAX_RECEIVED - len(self._received)
        if room > 0:
            self._received += data[:room]
            self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if tls.is_tls_close(exc):
            exc = None
        if isinstance(exc, ssl.SSLError):
            self.tls_error = exc
        elif isinstance(exc, OSError):
            self.error = describe_os_error(exc)
        elif exc is not None:
            self.error = str(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
