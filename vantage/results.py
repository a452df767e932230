"""What a probe reports: success or one failure class from a closed set, phase timings
and type-specific details.

Probes build ``ProbeOutcome`` values; the agent's scheduler stamps them into
``ProbeResult`` (check, revision, sequence number, start time). All are immutable values,
free of protobuf: ``vantage.wire`` converts at the edge.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Final


class FailureClass(enum.StrEnum):
    """Why a probe failed. The closed set of ARCHITECTURE.md, shared by every probe."""

    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_SERVFAIL = "dns_servfail"
    DNS_TIMEOUT = "dns_timeout"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    NETWORK_UNREACHABLE = "network_unreachable"
    TLS_HANDSHAKE = "tls_handshake"
    TLS_CERT_INVALID = "tls_cert_invalid"
    TLS_CERT_EXPIRED = "tls_cert_expired"
    HTTP_STATUS = "http_status"
    BODY_MISMATCH = "body_mismatch"
    DNS_ANSWER_MISMATCH = "dns_answer_mismatch"
    ICMP_LOSS = "icmp_loss"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


PHASES = ("resolve", "connect", "tls", "processing", "transfer")


class _Value:
    """An immutable value: its attributes are ``Final``; it equals another value of its
    type with equal fields, hashes by them and names them in its repr.

    Plain classes rather than frozen dataclasses: these are built for every probe result,
    by the agent and again by the coordinator, and are compiled (``vantage.native``). A
    frozen dataclass's generated ``__init__`` stays interpreted and sets each field
    through ``object.__setattr__``: about 1.6 us per value, where a compiled ``__init__``
    takes 0.06 us.
    """

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def values(self) -> tuple[object, ...]:
        """The fields' values, in ``FIELDS`` order."""
        return tuple(getattr(self, name) for name in self.FIELDS)

    def as_dict(self) -> dict[str, object]:
        """The fields by name (nested values stay values)."""
        return dict(zip(self.FIELDS, self.values(), strict=True))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Value)
        return self.values() == other.values()

    def __hash__(self) -> int:
        return hash(self.values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in self.as_dict().items())
        return f"{type(self).__name__}({fields})"


class Phases(_Value):
    """Seconds spent in each phase; phases a probe type does not have stay zero."""

    __slots__ = PHASES
    FIELDS = PHASES

    def __init__(
        self,
        resolve: float = 0.0,
        connect: float = 0.0,
        tls: float = 0.0,
        processing: float = 0.0,
        transfer: float = 0.0,
    ) -> None:
        self.resolve: Final = resolve
        self.connect: Final = connect
        self.tls: Final = tls
        self.processing: Final = processing
        self.transfer: Final = transfer

    @property
    def total(self) -> float:
        return self.resolve + self.connect + self.tls + self.processing + self.transfer


class TlsDetails(_Value):
    """What a TLS handshake found; ``earliest_expiry`` is the earliest notAfter of the
    presented chain, in seconds since the epoch (0 when unknown)."""

    FIELDS = ("version", "cipher", "earliest_expiry", "subject", "issuer")
    __slots__ = FIELDS

    def __init__(
        self,
        version: str = "",
        cipher: str = "",
        earliest_expiry: float = 0.0,
        subject: str = "",
        issuer: str = "",
    ) -> None:
        self.version: Final = version
        self.cipher: Final = cipher
        self.earliest_expiry: Final = earliest_expiry
        self.subject: Final = subject
        self.issuer: Final = issuer


class HttpDetails(_Value):
    FIELDS = (
        "status_code",
        "http_version",
        "final_url",
        "body_bytes",
        "redirects",
        "peer",
        "tls",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        status_code: int = 0,
        http_version: str = "",
        final_url: str = "",
        body_bytes: int = 0,
        redirects: int = 0,
        peer: str = "",
        tls: TlsDetails | None = None,
    ) -> None:
        self.status_code: Final = status_code
        self.http_version: Final = http_version
        self.final_url: Final = final_url
        self.body_bytes: Final = body_bytes
        self.redirects: Final = redirects
        self.peer: Final = peer
        self.tls: Final = tls


class TcpDetails(_Value):
    FIELDS = ("peer", "tls", "received")
    __slots__ = FIELDS

    def __init__(self, peer: str = "", tls: TlsDetails | None = None, received: str = "") -> None:
        self.peer: Final = peer
        self.tls: Final = tls
        self.received: Final = received  # the first bytes the peer sent, when read


class DnsDetails(_Value):
    FIELDS = ("rcode", "answers", "server", "tcp_fallback")
    __slots__ = FIELDS

    def __init__(
        self,
        rcode: str = "",
        answers: tuple[str, ...] = (),
        server: str = "",
        tcp_fallback: bool = False,
    ) -> None:
        self.rcode: Final = rcode
        self.answers: Final = answers
        self.server: Final = server
        self.tcp_fallback: Final = tcp_fallback


class IcmpDetails(_Value):
    FIELDS = (
        "sent",
        "received",
        "loss_percent",
        "rtt_min",
        "rtt_avg",
        "rtt_max",
        "address",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        sent: int = 0,
        received: int = 0,
        loss_percent: float = 0.0,
        rtt_min: float = 0.0,  # seconds
        rtt_avg: float = 0.0,
        rtt_max: float = 0.0,
        address: str = "",
    ) -> None:
        self.sent: Final = sent
        self.received: Final = received
        self.loss_percent: Final = loss_percent
        self.rtt_min: Final = rtt_min
        self.rtt_avg: Final = rtt_avg
        self.rtt_max: Final = rtt_max
        self.address: Final = address


Details = HttpDetails | TcpDetails | DnsDetails | IcmpDetails | None

_NO_PHASES = Phases()


class ProbeOutcome(_Value):
    """What one probe run found. ``failure`` is None exactly when ``success`` is true
    (ValueError otherwise)."""

    FIELDS = ("success", "failure", "message", "phases", "details", "warnings")
    __slots__ = FIELDS

    def __init__(
        self,
        success: bool,
        failure: FailureClass | None = None,
        message: str = "",
        phases: Phases = _NO_PHASES,
        details: Details = None,
        warnings: tuple[str, ...] = (),
    ) -> None:
        if success != (failure is None):
            raise ValueError("a successful outcome has no failure class, a failed one has one")
        self.success: Final = success
        self.failure: Final = failure
        self.message: Final = message
        self.phases: Final = phases
        self.details: Final = details
        self.warnings: Final = warnings

    @classmethod
    def failed(
        cls,
        failure: FailureClass,
        message: str,
        phases: Phases | None = None,
        details: Details = None,
        warnings: tuple[str, ...] = (),
    ) -> ProbeOutcome:
        return cls(False, failure, message, phases or _NO_PHASES, details, warnings)


class ProbeResult(_Value):
    """One probe run of one check by one agent, as delivered to the coordinator.

    ``seq`` increases strictly per agent instance; ``started_at`` is the agent's wall
    clock (seconds since the epoch) and ``duration`` the probe's wall time in seconds.
    """

    FIELDS = ("check", "check_revision", "seq", "started_at", "duration", "outcome")
    __slots__ = FIELDS

    def __init__(
        self,
        check: str,
        check_revision: int,
        seq: int,
        started_at: float,
        duration: float,
        outcome: ProbeOutcome,
    ) -> None:
        self.check: Final = check
        self.check_revision: Final = check_revision
        self.seq: Final = seq
        self.started_at: Final = started_at
        self.duration: Final = duration
        self.outcome: Final = outcome

    @property
    def success(self) -> bool:
        return self.outcome.success

    @property
    def failure(self) -> FailureClass | None:
        return self.outcome.failure
