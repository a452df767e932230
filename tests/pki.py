"""A certificate authority made for a test, with cryptography: server and client
certificates signed by it (or by an intermediate), written as PEM files.

Every test that needs TLS -- the probes' own tests, the coordinator's TLS ports, the MQTT
broker, the test bed's HTTPS targets -- gets its certificates here::

    ca = TestCA(tmp_path / "pki")
    server = ca.issue("coordinator", hosts=("localhost", "127.0.0.1"))
    agent = ca.issue("fra-1", client=True)
    ssl_context.load_cert_chain(server.chain, server.key)
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = timedelta(days=1)
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Issued:
    """A certificate, its key, and the files a server or client loads them from.

    ``chain`` is what its holder presents (the leaf, then any intermediates);
    ``earliest_expiry`` is the earliest notAfter in it.
    """

    name: str
    cert: x509.Certificate
    pem: str  # the certificate alone
    key_pem: str
    chain: Path
    key: Path
    subject: str
    earliest_expiry: datetime

    def server_context(
        self, *, client_ca: str | None = None, maximum_version: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        """A server context presenting this certificate; with ``client_ca`` it demands a
        client certificate issued by that CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.chain, self.key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=client_ca)
        if maximum_version is not None:
            context.maximum_version = maximum_version
        return context


class TestCA:
    """A root CA (or, from ``intermediate``, one signed by another) whose certificates
    and keys are files in ``directory``. ``cert_file`` is what clients trust."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        directory: Path,
        name: str = "Vantage Test CA",
        *,
        lifetime: tuple[timedelta, timedelta] = (-DAY, 365 * DAY),
        parent: TestCA | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.parent = parent
        self.cert, self.key = _certificate(name, issuer=parent, lifetime=lifetime, ca=True)
        stem = "ca" if parent is None else _stem(name)
        self.cert_file = directory / f"{stem}.pem"
        self.cert_file.write_text(_pem(self.cert))
        self.key_file = directory / f"{stem}.key"
        self.key_file.write_text(_key_pem(self.key))

    @property
    def pem(self) -> str:
        return _pem(self.cert)

    @property
    def issued(self) -> Issued:
        """The CA's own certificate and key as an ``Issued``."""
        return Issued(
            self.cert.subject.rfc4514_string(), self.cert, self.pem, _key_pem(self.key),
            self.cert_file, self.key_file, self.cert.subject.rfc4514_string(),
            self.cert.not_valid_after_utc,
        )  # fmt: skip

    def intermediate(
        self, name: str, lifetime: tuple[timedelta, timedelta] = (-DAY, 90 * DAY)
    ) -> TestCA:
        """A CA this one signs, writing to the same directory."""
        return TestCA(self.directory, name, lifetime=lifetime, parent=self)

    def issue(
        self,
        name: str,
        *,
        hosts: Iterable[str] = (),
        client: bool = False,
        lifetime: tuple[timedelta, timedelta] = (-DAY, 90 * DAY),
        stem: str | None = None,
    ) -> Issued:
        """A certificate with common name ``name`` (and ``hosts`` as its subject
        alternative names: IP addresses or DNS names), for a server or, with ``client``,
        for a client; written as ``STEM.pem`` (the chain) and ``STEM.key``."""
        cert, key = _certificate(
            name, issuer=self, lifetime=lifetime, hosts=tuple(hosts), client=client
        )
        presented = [cert]
        issuer = self
        while issuer.parent is not None:
            presented.append(issuer.cert)
            issuer = issuer.parent
        stem = stem or _stem(name)
        chain = self.directory / f"{stem}.pem"
        chain.write_text("".join(_pem(each) for each in presented))
        key_file = self.directory / f"{stem}.key"
        key_file.write_text(_key_pem(key))
        return Issued(
            name=name,
            cert=cert,
            pem=_pem(cert),
            key_pem=_key_pem(key),
            chain=chain,
            key=key_file,
            subject=cert.subject.rfc4514_string(),
            earliest_expiry=min(each.not_valid_after_utc for each in presented),
        )


def self_signed(directory: Path, name: str, hosts: Iterable[str] = LOOPBACK) -> Issued:
    """A server certificate signed by its own key (chains to nothing)."""
    cert, key = _certificate(name, issuer=None, lifetime=(-DAY, 90 * DAY), hosts=tuple(hosts))
    directory.mkdir(parents=True, exist_ok=True)
    chain = directory / f"{_stem(name)}.pem"
    chain.write_text(_pem(cert))
    key_file = directory / f"{_stem(name)}.key"
    key_file.write_text(_key_pem(key))
    return Issued(
        name, cert, _pem(cert), _key_pem(key), chain, key_file,
        cert.subject.rfc4514_string(), cert.not_valid_after_utc,
    )  # fmt: skip


def _stem(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-." else "-" for char in name)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    common_name: str,
    *,
    issuer: TestCA | None,
    lifetime: tuple[timedelta, timedelta],
    hosts: tuple[str, ...] = (),
    ca: bool = False,
    client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An EC P-256 certificate valid from now + lifetime[0] to now + lifetime[1], signed
    by ``issuer`` or, without one, by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    signing_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + lifetime[0])
        .not_valid_after(now + lifetime[1])
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), False
        )
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        builder = builder.add_extension(usage, critical=True)
    else:
        purpose = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
