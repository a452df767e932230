"""TLS for both ends of every Vantage connection, from grpcio's own credentials and
Python's ``ssl`` (no cryptography of our own).

**The coordinator** serves TLS on its gRPC and HTTP ports from ``tls:`` in its settings::

    tls:
      cert_file: /etc/letsencrypt/live/vantage.example.net/fullchain.pem
      key_file: /etc/letsencrypt/live/vantage.example.net/privkey.pem
      client_ca_file: agents-ca.pem    # optional: mutual TLS on the gRPC port

Lifecycle::

    certificates = ServerCertificates(config)   # reads and checks the files: TlsError
    server.add_secure_port(address, certificates.grpc_credentials())
    loop.create_server(..., ssl=certificates.ssl_context())
    await certificates.run()                    # until cancelled: reloads changed files

``run()`` looks at the files every ``RELOAD_POLL`` seconds; when one changed (an ACME
client such as certbot renewed it), the new pair is read and checked, and every new
connection on both ports is served with it (connections already open keep theirs). A
pair that does not load (half written, key and certificate apart) is logged and the old
one stays. With ``client_ca_file`` every gRPC client must present a certificate that CA
signed (grpcio offers no "request but do not require"); the HTTP port asks for none.

**Agents and the CLI** dial with ``ClientTls``: TLS verifying the server against the
system's CAs or ``ca_file``, optionally presenting a client certificate; or plaintext.
Without an explicit choice it is plaintext for a loopback address and TLS for any other.

Errors: ``TlsError``, one line naming the setting or flag and the file.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
from cryptography import x509
from pydantic import BaseModel, ConfigDict

from .configfile import is_loopback_host, resolve_path, split_host_port
from .logs import get_logger

log = get_logger("vantage.tls")

RELOAD_POLL = 5.0
# The system's CA bundle where Debian (and most others) keep it, when ssl does not say.
_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)


class TlsError(Exception):
    """A TLS file or setting is unusable; ``str()`` is one line naming it."""


class ServerTlsConfig(BaseModel):
    """The coordinator's ``tls:`` mapping."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def resolved(self, base: Path) -> ServerTlsConfig:
        """Relative paths resolved against ``base`` (the settings file's directory)."""
        return self.model_copy(
            update={
                "cert_file": resolve_path(base, self.cert_file),
                "key_file": resolve_path(base, self.key_file),
                "client_ca_file": resolve_path(base, self.client_ca_file),
            }
        )


@dataclass(frozen=True, slots=True)
class _Pair:
    """One reading of the files, checked: what both ports serve."""

    signature: tuple[object, ...]
    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext
    not_after: float
    subject: str


class ServerCertificates:
    """The coordinator's certificate and key (and client CA), served on both ports and
    reloaded when the files change. ``not_after`` is the served certificate's expiry
    (Unix seconds); ``on_reload(result)`` hears of every reload: "applied" or "failed".
    """

    def __init__(
        self,
        config: ServerTlsConfig,
        *,
        on_reload: Callable[[str], None] = lambda result: None,
    ) -> None:
        self.config = config
        self._on_reload = on_reload
        self._pair = self._load()
        self._refused: tuple[object, ...] | None = None
        self._generation = 0
        log.info(
            "TLS certificate loaded",
            cert_file=str(config.cert_file),
            subject=self._pair.subject,
            not_after=_rfc3339(self._pair.not_after),
            client_ca_file=_str(config.client_ca_file),
        )

    @property
    def mutual(self) -> bool:
        """True when gRPC clients must present a certificate (``client_ca_file``)."""
        return self.config.client_ca_file is not None

    @property
    def not_after(self) -> float:
        return self._pair.not_after

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` that follow reloads."""
        served = [self._generation]  # the generation these credentials last handed out

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC's core, on its own thread, before each new handshake.
            generation = self._generation
            if served[0] == generation:
                return None
            served[0] = generation
            return self._grpc_configuration()

        # grpcio documents None as "unchanged"; its stubs say otherwise.
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_configuration(), fetcher, require_client_authentication=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server ``SSLContext`` for the HTTP port that follows reloads."""
        outer = _server_context()

        def select(connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: Any) -> None:
            # Called with or without SNI: each handshake takes the pair current now.
            connection.context = self._pair.context

        outer.sni_callback = select
        return outer

    def reload(self) -> bool:
        """Re-read the files if they changed; True when a new pair is served now. A pair
        that does not load is logged (error) and changes nothing."""
        signature = _signature(self.config)
        if signature in (self._pair.signature, self._refused):
            return False
        try:
            pair = self._load()
        except TlsError as exc:
            self._refused = signature  # said once, not at every look
            log.error("TLS files refused, the served certificate stays", error=str(exc))
            self._on_reload("failed")
            return False
        self._pair = pair
        self._generation += 1
        self._on_reload("applied")
        log.info(
            "TLS certificate reloaded",
            subject=pair.subject,
            not_after=_rfc3339(pair.not_after),
        )
        return True

    async def run(self, poll: float = RELOAD_POLL) -> None:
        """Reload changed files every ``poll`` seconds until cancelled."""
        while True:
            await asyncio.sleep(poll)
            self.reload()

    def _grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = self._pair
        return grpc.ssl_server_certificate_configuration(
            [(pair.key, pair.cert)], root_certificates=pair.client_ca
        )

    def _load(self) -> _Pair:
        config = self.config
        # The signature first: a change after it is seen again at the next look.
        signature = _signature(config)
        cert = _read(config.cert_file, "tls.cert_file")
        key = _read(config.key_file, "tls.key_file")
        client_ca = (
            _read(config.client_ca_file, "tls.client_ca_file")
            if config.client_ca_file is not None
            else None
        )
        try:
            chain = x509.load_pem_x509_certificates(cert)
        except ValueError:
            raise TlsError(
                f"tls.cert_file {config.cert_file}: not a PEM certificate chain"
            ) from None
        context = _server_context()
        try:
            context.load_cert_chain(config.cert_file, config.key_file)
        except ssl.SSLError as exc:
            raise TlsError(
                f"tls.key_file {config.key_file}: cannot be used with tls.cert_file "
                f"{config.cert_file} ({exc.reason or exc})"
            ) from None
        except OSError as exc:
            raise TlsError(f"tls.cert_file/key_file: {exc.strerror or exc}") from None
        if client_ca is not None:
            try:
                context.load_verify_locations(cadata=client_ca.decode(errors="replace"))
            except (ssl.SSLError, ValueError):
                raise TlsError(
                    f"tls.client_ca_file {config.client_ca_file}: not a PEM certificate"
                ) from None
        leaf = chain[0]
        return _Pair(
            signature=signature,
            cert=cert,
            key=key,
            client_ca=client_ca,
            context=context,
            not_after=leaf.not_valid_after_utc.timestamp(),
            subject=leaf.subject.rfc4514_string(),
        )


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{setting} {path}: cannot read: {exc.strerror}") from None


def _signature(config: ServerTlsConfig) -> tuple[object, ...]:
    """What tells a changed file: modification time, size and inode of each (certbot
    replaces the symlinks' targets)."""
    stats: list[object] = []
    for path in (config.cert_file, config.key_file, config.client_ca_file):
        if path is None:
            continue
        try:
            stat = os.stat(path)
        except OSError:
            stats.append(None)
            continue
        stats.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(stats)


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a client dials the coordinator: ``enabled`` TLS (verifying the server
    against ``ca_file`` or the system's CAs, presenting ``cert_file``/``key_file`` when
    given) or plaintext. ``server_name`` overrides the name the certificate must carry
    (for an address that is an IP)."""

    enabled: bool
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @classmethod
    def choose(
        cls,
        address: str,
        *,
        tls: bool | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        """The TLS a client of ``address`` uses: ``tls`` True or False when asked for,
        else TLS when a TLS file is given or the host is not a loopback address.
        TlsError when the flags contradict each other."""
        if (cert_file is None) != (key_file is None):
            raise TlsError("--cert-file and --key-file go together")
        files = ca_file is not None or cert_file is not None or server_name is not None
        if tls is False and files:
            raise TlsError("--plaintext cannot go with --ca-file, --cert-file or --server-name")
        if tls is None:
            host, _ = split_host_port(address)
            tls = files or not is_loopback_host(host)
        return cls(tls, ca_file, cert_file, key_file, server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials, read from the files now (so renewed files are used
        at the next connection). TlsError naming a file that cannot be read."""
        roots = _read(self.ca_file, "--ca-file") if self.ca_file is not None else system_roots()
        key = _read(self.key_file, "--key-file") if self.key_file is not None else None
        chain = _read(self.cert_file, "--cert-file") if self.cert_file is not None else None
        return grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.enabled and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to ``address``."""
        options = [*options, *self.options()]
        if not self.enabled:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, self.credentials(), options=options)

    def aio_channel(
        self, address: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``address``."""
        options = [*options, *self.options()]
        if not self.enabled:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, self.credentials(), options=options)

    def describe(self) -> str:
        """For log lines: 'plaintext', 'TLS', 'TLS (CA ca.pem)', 'mutual TLS (...)'."""
        if not self.enabled:
            return "plaintext"
        kind = "mutual TLS" if self.cert_file is not None else "TLS"
        return f"{kind} (CA {self.ca_file})" if self.ca_file is not None else kind


def system_roots() -> bytes | None:
    """The system's CA certificates as PEM (what ``ssl`` trusts by default); None where
    none is found, and gRPC then uses the roots it ships."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *_SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            try:
                return Path(candidate).read_bytes()
            except OSError:
                continue
    return None


def connection_problem(details: str, tls: ClientTls) -> str | None:
    """What gRPC's "failed to connect" details mean for a TLS set-up, in words, with
    the flag that would fix it; None when they are not about TLS."""
    if "WRONG_VERSION_NUMBER" in details:
        return "TLS handshake failed: the coordinator does not speak TLS there (--plaintext?)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        why = details.split("CERTIFICATE_VERIFY_FAILED:", 1)[-1].split(":", 1)[0].strip()
        return (
            f"TLS: the coordinator's certificate is not trusted ({why}); "
            "name the CA that signed it with --ca-file"
        )
    if "Hostname Verification" in details or "No match found for server name" in details:
        return (
            "TLS: the coordinator's certificate is not issued for this address "
            "(dial the name it carries, or --server-name NAME)"
        )
    if "Socket closed" in details or "Connection reset" in details:
        if not tls.enabled:
            return "the coordinator closed the connection: it may serve TLS only (--tls, --ca-file)"
        if tls.cert_file is None:
            return (
                "the coordinator closed the connection during the TLS handshake: it may "
                "require a client certificate (--cert-file, --key-file)"
            )
        return (
            "the coordinator closed the connection during the TLS handshake: it may not "
            "trust this client certificate"
        )
    return None
