"""vantage/tls.py (tests/agent/test_tls.py is the probes' TLS): the coordinator's
certificate files (checked, reloaded) and how clients dial. Real files from a test CA,
real TLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from pathlib import Path

import grpc
import pytest
from pki import TestCA

from vantage.tls import ClientTls, ServerCertificates, ServerTlsConfig, TlsError, connection_problem


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def config(ca: TestCA, name: str = "coordinator", **extra: Path) -> ServerTlsConfig:
    issued = ca.issue(name, hosts=("localhost", "127.0.0.1"), stem="server")
    return ServerTlsConfig(cert_file=issued.chain, key_file=issued.key, **extra)


def served_name(context: ssl.SSLContext, ca: TestCA) -> str:
    """The common name of the certificate a TLS server with ``context`` presents."""

    async def exchange() -> str:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=ca.cert_file)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            subject = dict(item[0] for item in writer.get_extra_info("peercert")["subject"])
            writer.close()
            return str(subject["commonName"])
        finally:
            server.close()

    return asyncio.run(exchange())


def test_the_served_certificate_follows_the_files(ca: TestCA) -> None:
    results: list[str] = []
    certificates = ServerCertificates(config(ca, "first"), on_reload=results.append)
    context = certificates.ssl_context()
    assert served_name(context, ca) == "first"
    assert not certificates.reload()  # nothing changed
    renewed = ca.issue("second", hosts=("localhost", "127.0.0.1"), stem="server")
    assert renewed.chain == certificates.config.cert_file
    assert certificates.reload()
    assert served_name(context, ca) == "second"
    assert results == ["applied"]
    assert certificates.not_after == pytest.approx(renewed.cert.not_valid_after_utc.timestamp())


def test_a_bad_renewal_keeps_the_served_pair(ca: TestCA) -> None:
    results: list[str] = []
    certificates = ServerCertificates(config(ca, "first"), on_reload=results.append)
    context = certificates.ssl_context()
    # The key of another certificate: a renewal caught half way.
    other = ca.issue("other", stem="other")
    certificates.config.key_file.write_bytes(other.key.read_bytes())
    assert not certificates.reload()
    assert results == ["failed"]
    assert served_name(context, ca) == "first"
    # Refused once, not at every look.
    assert not certificates.reload()
    assert results == ["failed"]


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("missing_cert", "tls.cert_file {cert}: cannot read: No such file or directory"),
        ("garbage_cert", "tls.cert_file {cert}: not a PEM certificate chain"),
        ("other_key", "tls.key_file {key}: cannot be used with tls.cert_file {cert}"),
        ("garbage_ca", "tls.client_ca_file {ca}: not a PEM certificate"),
    ],
)
def test_unusable_files_are_one_line(ca: TestCA, tmp_path: Path, spoil: str, message: str) -> None:
    settings = config(ca)
    client_ca = tmp_path / "clients.pem"
    client_ca.write_text(ca.pem)
    if spoil == "missing_cert":
        settings.cert_file.unlink()
    elif spoil == "garbage_cert":
        settings.cert_file.write_text("not a certificate\n")
    elif spoil == "other_key":
        settings.key_file.write_bytes(ca.issue("other", stem="other").key.read_bytes())
    elif spoil == "garbage_ca":
        client_ca.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    settings = settings.model_copy(update={"client_ca_file": client_ca})
    with pytest.raises(TlsError) as caught:
        ServerCertificates(settings)
    expected = message.format(cert=settings.cert_file, key=settings.key_file, ca=client_ca)
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_clients_choose_tls_by_the_address_unless_told() -> None:
    assert not ClientTls.choose("127.0.0.1:7400").enabled
    assert not ClientTls.choose("localhost:7400").enabled
    assert not ClientTls.choose("[::1]:7400").enabled
    assert ClientTls.choose("coordinator.example.net:7400").enabled
    assert ClientTls.choose("192.0.2.1:7400").enabled
    assert ClientTls.choose("127.0.0.1:7400", tls=True).enabled
    assert not ClientTls.choose("192.0.2.1:7400", tls=False).enabled
    assert ClientTls.choose("127.0.0.1:7400", ca_file=Path("ca.pem")).enabled
    with pytest.raises(TlsError, match="--plaintext cannot go with --ca-file"):
        ClientTls.choose("127.0.0.1:7400", tls=False, ca_file=Path("ca.pem"))
    with pytest.raises(TlsError, match="--cert-file and --key-file go together"):
        ClientTls.choose("127.0.0.1:7400", cert_file=Path("a.pem"))


def test_client_files_are_read_at_each_dial_and_named_when_missing(
    ca: TestCA, tmp_path: Path
) -> None:
    tls = ClientTls.choose("127.0.0.1:7400", ca_file=tmp_path / "absent.pem")
    with pytest.raises(TlsError, match=r"--ca-file .*absent.pem: cannot read"):
        tls.credentials()
    tls = ClientTls.choose("127.0.0.1:7400", ca_file=ca.cert_file)
    assert isinstance(tls.credentials(), grpc.ChannelCredentials)


def test_tls_trouble_reads_as_the_flag_that_fixes_it() -> None:
    plain, tls = ClientTls(False), ClientTls(True)
    mutual = ClientTls(True, cert_file=Path("c.pem"), key_file=Path("c.key"))
    prefix = "failed to connect to all addresses; last error: "
    wrong_version = prefix + "UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed: WRONG_VERSION_NUMBER"
    assert "--plaintext" in str(connection_problem(wrong_version, tls))
    untrusted = prefix + (
        "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
        "unable to get local issuer certificate: OK"
    )
    assert connection_problem(untrusted, tls) == (
        "TLS: the coordinator's certificate is not trusted (unable to get local issuer "
        "certificate); name the CA that signed it with --ca-file"
    )
    wrong_name = prefix + "Custom verification check failed: Hostname Verification Check failed."
    assert "--server-name" in str(connection_problem(wrong_name, tls))
    closed = prefix + "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert "--tls" in str(connection_problem(closed, plain))
    assert "--cert-file" in str(connection_problem(closed, tls))
    assert "may not trust this client certificate" in str(connection_problem(closed, mutual))
    assert connection_problem(prefix + "Connection refused", tls) is None


def test_gRPC_serves_the_reloaded_certificate_to_new_connections(ca: TestCA) -> None:
    """grpcio calls the credentials' fetcher before each handshake."""
    from vantage_proto.v1 import query_pb2, query_pb2_grpc

    certificates = ServerCertificates(config(ca, "first"))

    async def scenario() -> list[str]:
        server = grpc.aio.server()
        query_pb2_grpc.add_QueryServiceServicer_to_server(
            query_pb2_grpc.QueryServiceServicer(), server
        )
        port = server.add_secure_port("127.0.0.1:0", certificates.grpc_credentials())
        await server.start()
        seen = []
        try:
            for name in ("first", "second"):
                if name == "second":
                    ca.issue("second", hosts=("localhost", "127.0.0.1"), stem="server")
                    assert certificates.reload()
                seen.append(await asyncio.to_thread(_peer_name, port, ca))
        finally:
            await server.stop(0)
        return seen

    assert asyncio.run(scenario()) == ["first", "second"]
    del query_pb2


def _peer_name(port: int, ca: TestCA) -> str:
    context = ssl.create_default_context(cafile=ca.cert_file)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        return str(subject["commonName"])


def test_private_key_files_are_not_required_to_be_readable_by_others(ca: TestCA) -> None:
    settings = config(ca)
    os.chmod(settings.key_file, 0o600)
    assert ServerCertificates(settings).not_after > 0
