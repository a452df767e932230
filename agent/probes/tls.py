"""TLS for probes: client contexts built from a check's ``TlsOptions``, the handshake as
the ``tls`` phase, and what the handshake found.

- ``client_context(options, alpn)`` builds an ``ssl.SSLContext`` once per distinct
  (options, ALPN) value and caches it: loading CAs costs milliseconds, a cache hit costs a
  hash. ``verify: false`` checks neither chain nor name; ``ca_pem`` replaces the system
  CAs; a client certificate and key are loaded from a private temporary file (the ssl
  module reads them only from files) that is deleted as soon as they are loaded.
  Protocol versions and ciphers are OpenSSL's defaults (TLS 1.2 and later); sessions
  are never resumed, so every probe runs a full handshake.
- ``handshake`` upgrades a connected transport with ``loop.start_tls``, sending
  ``server_name`` (or the host) as SNI and verifying the certificate against it.
- ``inspect`` reports the session (``TlsDetails``: version, cipher, the leaf's subject and
  issuer, the earliest notAfter of the chain the server presented, verified or not) and
  the expiry warning when that date is less than ``cert_expiry_warning_days`` away.
- ``failure`` maps an ``ssl`` error to the closed set: a certificate that failed
  verification because it expired is ``tls_cert_expired``; any other verification
  failure (self-signed, unknown CA, wrong host name) is ``tls_cert_invalid``; everything
  else the TLS layer reports is ``tls_handshake``. The message keeps OpenSSL's words:
  ``tls 127.0.0.1:8443: certificate has expired``.

A TLS 1.3 client finishes its handshake before the server has checked the client's
certificate, so a server that rejects it says so with an alert the client only reads
later: probes that read after the handshake pass such errors to ``failure`` too.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509

from vantage.checks import TlsOptions
from vantage.results import FailureClass, TlsDetails

from .network import PhaseClock, ProbeFailure, describe_os_error

# X509_V_ERR_CERT_HAS_EXPIRED in OpenSSL's x509_vfy.h; the ssl module does not export it.
X509_V_ERR_CERT_HAS_EXPIRED = 10
_DAY = 86_400.0
# _ssl.ENCODING_DER, which the ssl module does not re-export (Certificate.public_bytes).
_ENCODING_DER = 2


def client_context(options: TlsOptions, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """The client context for ``options`` offering ``alpn``; the same object for equal
    arguments. ProbeFailure (internal) for PEM text that OpenSSL rejects."""
    try:
        return _client_context(options, alpn)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ProbeFailure(FailureClass.INTERNAL, f"tls options: {reason}") from None


@functools.lru_cache(maxsize=256)
def _client_context(options: TlsOptions, alpn: tuple[str, ...]) -> ssl.SSLContext:
    if not options.verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif options.ca_pem is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name
        context.load_verify_locations(cadata=options.ca_pem)
    else:
        context = ssl.create_default_context()
    if options.client_cert_pem is not None and options.client_key_pem is not None:
        _load_client_certificate(context, options.client_cert_pem, options.client_key_pem)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def _load_client_certificate(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # mkstemp creates the file readable by this user only (0600).
    descriptor, path = tempfile.mkstemp(prefix="vantage-client-", suffix=".pem")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(key_pem.rstrip("\n") + "\n" + cert_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)


async def handshake(
    clock: PhaseClock,
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    server_name: str,
    limit: float,
) -> asyncio.Transport:
    """Run the TLS handshake on ``transport`` and return the TLS transport, which then
    feeds ``protocol``. The caller owns both transports and closes them.

    ``server_name`` is sent as SNI (not for an IP address) and verified against the
    certificate when ``context`` checks host names. ``limit`` bounds the handshake on its
    own; the caller's deadline still applies. ProbeFailure (see ``failure``) when the
    handshake fails, with ``clock.step`` as the message's prefix.
    """
    loop = asyncio.get_running_loop()
    try:
        upgraded = await loop.start_tls(
            transport, protocol, context, server_hostname=server_name, ssl_handshake_timeout=limit
        )
    except ssl.SSLError as exc:
        raise failure(clock.step, exc) from None
    except TimeoutError:
        # start_tls's own handshake timer, which can fire a hair before the deadline.
        raise clock.timed_out(limit) from None
    except OSError as exc:
        # The peer hung up or reset the connection in the middle of the handshake.
        raise ProbeFailure(
            FailureClass.TLS_HANDSHAKE, f"{clock.step}: {describe_os_error(exc)}"
        ) from None
    if upgraded is None:  # only for a transport closed under our feet
        raise ProbeFailure(FailureClass.TLS_HANDSHAKE, f"{clock.step}: connection closed")
    return upgraded


def failure(step: str, exc: ssl.SSLError) -> ProbeFailure:
    """The failure class and message ("{step}: {what OpenSSL said}") for a TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        failure_class = (
            FailureClass.TLS_CERT_EXPIRED
            if exc.verify_code == X509_V_ERR_CERT_HAS_EXPIRED
            else FailureClass.TLS_CERT_INVALID
        )
        reason = exc.verify_message or exc.reason or "certificate verify failed"
    else:
        failure_class = FailureClass.TLS_HANDSHAKE
        reason = (exc.reason or type(exc).__name__).lower().replace("_", " ")
    reason = reason.rstrip(".")
    if reason[1:2].islower():  # "Hostname mismatch" -> "hostname mismatch"; keep "IP"
        reason = reason[:1].lower() + reason[1:]
    return ProbeFailure(failure_class, f"{step}: {reason}")


def is_tls_close(exc: BaseException | None) -> bool:
    """Whether ``exc`` (from ``connection_lost``) is the peer closing the TCP connection
    without a TLS close_notify: the same thing as a plain close, not a TLS failure."""
    return isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)


def inspect(transport: asyncio.BaseTransport, options: TlsOptions) -> tuple[TlsDetails, str | None]:
    """What a completed handshake found, and the expiry warning when one is due.

    ``earliest_expiry`` is the earliest notAfter of the chain the server presented (the
    same whether or not it was verified); subject and issuer are the leaf's, in RFC 4514
    form. The warning names the certificate that expires first: "certificate CN=foo
    expires in 5 days (2026-12-01T00:00:00Z)", or "expired 3 days ago" for one that a
    check without verification accepted.
    """
    sslobj = transport.get_extra_info("ssl_object")
    if not isinstance(sslobj, ssl.SSLObject | ssl.SSLSocket):
        return TlsDetails(), None
    cipher = sslobj.cipher()
    certificates = [facts for der in _presented_chain(sslobj) if (facts := _facts(der))]
    leaf = certificates[0] if certificates else None
    earliest = min(certificates, key=lambda facts: facts.not_after, default=None)
    details = TlsDetails(
        version=sslobj.version() or "",
        cipher=cipher[0] if cipher else "",
        earliest_expiry=earliest.not_after if earliest else 0.0,
        subject=leaf.subject if leaf else "",
        issuer=leaf.issuer if leaf else "",
    )
    warning = None
    if earliest is not None:
        left = earliest.not_after - time.time()
        if left < options.cert_expiry_warning_days * _DAY:
            when = datetime.fromtimestamp(earliest.not_after, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            days = int(abs(left) // _DAY)
            unit = "day" if days == 1 else "days"
            span = f"expires in {days} {unit}" if left >= 0 else f"expired {days} {unit} ago"
            warning = f"certificate {earliest.subject or '(no subject)'} {span} ({when})"
    return details, warning


def _presented_chain(sslobj: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """DER certificates the peer sent, leaf first."""
    public = getattr(sslobj, "get_unverified_chain", None)
    if public is not None:  # Python 3.13+: a list of DER bytes
        return list(public() or ())
    private = getattr(getattr(sslobj, "_sslobj", None), "get_unverified_chain", None)
    if private is not None:  # Python 3.10-3.12: _ssl.Certificate objects
        return [certificate.public_bytes(_ENCODING_DER) for certificate in private() or ()]
    leaf = sslobj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


@dataclass(frozen=True, slots=True)
class _CertificateFacts:
    not_after: float
    subject: str
    issuer: str


@functools.lru_cache(maxsize=1024)
def _facts(der: bytes) -> _CertificateFacts | None:
    # A server presents the same chain probe after probe: parse each certificate once.
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return _CertificateFacts(
        not_after=certificate.not_valid_after_utc.timestamp(),
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
    )
