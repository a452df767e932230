"""TLS contexts, failure classes and session details, with the test PKI and in-memory
handshakes (the probes' tests cover the same code over real sockets)."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.probes import tls
from agent.probes.network import ProbeFailure
from vantage.checks import TlsOptions
from vantage.results import FailureClass, TlsDetails


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> ssl.SSLObject:
    """Run a TLS handshake between two in-memory endpoints; the client's end."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client_end = client.wrap_bio(client_in, client_out, server_hostname=name)
    server_end = server.wrap_bio(server_in, server_out, server_side=True)
    done: set[str] = set()
    for _ in range(10):
        for label, end in (("client", client_end), ("server", server_end)):
            if label not in done:
                try:
                    end.do_handshake()
                    done.add(label)
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if len(done) == 2:
            return client_end
    raise AssertionError("the in-memory handshake did not finish")


def options(**fields: Any) -> TlsOptions:
    return TlsOptions(**fields)


# Contexts


def test_contexts_are_cached_per_options_and_alpn(certs: Any) -> None:
    first = tls.client_context(options(ca_pem=certs["ca"].pem))
    assert tls.client_context(options(ca_pem=certs["ca"].pem)) is first
    assert tls.client_context(options(ca_pem=certs["ca"].pem), ("http/1.1",)) is not first
    assert tls.client_context(options()) is not first


def test_ca_pem_replaces_the_system_cas(certs: Any) -> None:
    context = tls.client_context(options(ca_pem=certs["ca"].pem))

    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 1


def test_without_verification_nothing_is_checked() -> None:
    context = tls.client_context(options(verify=False))

    assert context.verify_mode is ssl.CERT_NONE
    assert not context.check_hostname


def test_client_certificate_is_loaded_and_its_file_removed(
    certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    client = certs["client"]
    context = tls.client_context(
        options(ca_pem=certs["ca"].pem, client_cert_pem=client.pem, client_key_pem=client.key_pem)
    )

    assert list(tmp_path.iterdir()) == []
    server = certs["valid"].server_context(client_ca=certs["ca"].pem)
    assert handshake(server, context, "localhost").version() == "TLSv1.3"


def test_pem_that_openssl_rejects_is_internal(certs: Any) -> None:
    broken = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    with pytest.raises(ProbeFailure) as raised:
        tls.client_context(options(ca_pem=broken))
    assert raised.value.failure is FailureClass.INTERNAL
    assert raised.value.message.startswith("tls options: ")

    with pytest.raises(ProbeFailure):
        tls.client_context(
            options(client_cert_pem=certs["client"].pem, client_key_pem=certs["valid"].key_pem)
        )


# Failure classes


def verification_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code = code
    error.verify_message = message
    return error


@pytest.mark.parametrize(
    ("error", "failure", "message"),
    [
        (
            verification_error(10, "certificate has expired"),
            FailureClass.TLS_CERT_EXPIRED,
            "tls 192.0.2.1:443: certificate has expired",
        ),
        (
            verification_error(18, "self-signed certificate"),
            FailureClass.TLS_CERT_INVALID,
            "tls 192.0.2.1:443: self-signed certificate",
        ),
        (
            verification_error(62, "Hostname mismatch, certificate is not valid for 'a.test'."),
            FailureClass.TLS_CERT_INVALID,
            "tls 192.0.2.1:443: hostname mismatch, certificate is not valid for 'a.test'",
        ),
    ],
)
def test_verification_errors(error: ssl.SSLError, failure: FailureClass, message: str) -> None:
    result = tls.failure("tls 192.0.2.1:443", error)
    assert (result.failure, result.message) == (failure, message)


def test_other_tls_errors_are_tls_handshake(certs: Any) -> None:
    server = certs["valid"].server_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    client = tls.client_context(options(ca_pem=certs["ca"].pem))
    client_only_13 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_only_13.load_verify_locations(cadata=certs["ca"].pem)
    client_only_13.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(ssl.SSLError) as raised:
        handshake(server, client_only_13, "localhost")

    result = tls.failure("tls 192.0.2.1:443", raised.value)
    assert result.failure is FailureClass.TLS_HANDSHAKE
    assert result.message == "tls 192.0.2.1:443: unsupported protocol"
    assert handshake(server, client, "localhost").version() == "TLSv1.2"


def test_closing_without_close_notify_is_no_tls_failure() -> None:
    assert tls.is_tls_close(ssl.SSLEOFError())
    assert tls.is_tls_close(ssl.SSLZeroReturnError())
    assert not tls.is_tls_close(ssl.SSLError())
    assert not tls.is_tls_close(None)


# Session details and the expiry warning


def inspect(certs: Any, cert: str, **fields: Any) -> tuple[TlsDetails, str | None]:
    settings = options(**fields)
    client = tls.client_context(settings)
    sslobj = handshake(certs[cert].server_context(), client, "localhost")
    return tls.inspect(asyncio.BaseTransport({"ssl_object": sslobj}), settings)


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_details_of_a_verified_session(certs: Any) -> None:
    details, warning = inspect(certs, "valid", ca_pem=certs["ca"].pem)

    assert details.version == "TLSv1.3"
    assert details.cipher.startswith("TLS_")
    assert details.subject == "CN=valid.test"
    assert details.issuer == "CN=Vantage Test CA"
    assert details.earliest_expiry == certs["valid"].earliest_expiry.timestamp()
    assert warning is None


def test_earliest_expiry_is_the_earliest_in_the_presented_chain(certs: Any) -> None:
    details, warning = inspect(certs, "chained", ca_pem=certs["ca"].pem)
    expiry = certs["chained"].earliest_expiry

    assert details.subject == "CN=chained.test"
    assert details.issuer == "CN=Vantage Test Intermediate"
    assert details.earliest_expiry == expiry.timestamp()
    days = (expiry - datetime.now(UTC)).days
    assert warning == (
        f"certificate CN=Vantage Test Intermediate expires in {days} days ({stamp(expiry)})"
    )


def test_warning_threshold(certs: Any) -> None:
    ca = certs["ca"].pem
    expiry = certs["expiring"].earliest_expiry

    _, warning = inspect(certs, "expiring", ca_pem=ca, cert_expiry_warning_days=4)
    assert warning == f"certificate CN=expiring.test expires in 3 days ({stamp(expiry)})"
    _, warning = inspect(certs, "expiring", ca_pem=ca, cert_expiry_warning_days=3)
    assert warning is None
    _, warning = inspect(certs, "expiring", ca_pem=ca, cert_expiry_warning_days=0)
    assert warning is None


def test_unverified_sessions_still_report_expiry(certs: Any) -> None:
    details, warning = inspect(certs, "expired", verify=False, cert_expiry_warning_days=0)
    expiry = certs["expired"].earliest_expiry

    assert details.earliest_expiry == expiry.timestamp()
    assert warning == f"certificate CN=expired.test expired 1 day ago ({stamp(expiry)})"

    details, warning = inspect(certs, "self_signed", verify=False)
    assert details.subject == details.issuer == "CN=self-signed.test"
    assert details.earliest_expiry == certs["self_signed"].earliest_expiry.timestamp()
    assert warning is None


def test_a_transport_without_tls_has_no_details() -> None:
    assert tls.inspect(asyncio.BaseTransport(), options()) == (TlsDetails(), None)
