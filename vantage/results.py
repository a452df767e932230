"""What a probe reports: success or one failure class from a closed set, phase timings
and type-specific details.

Probes build ``ProbeOutcome`` values; the agent's scheduler stamps them into
``ProbeResult`` (check, revision, sequence number, start time). Both are plain frozen
values, free of protobuf: ``vantage.wire`` converts at the edge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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


@dataclass(frozen=True, slots=True)
class Phases:
    """Seconds spent in each phase; phases a probe type does not have stay zero."""

    resolve: float = 0.0
    connect: float = 0.0
    tls: float = 0.0
    processing: float = 0.0
    transfer: float = 0.0

    @property
    def total(self) -> float:
        return self.resolve + self.connect + self.tls + self.processing + self.transfer


@dataclass(frozen=True, slots=True)
class TlsDetails:
    """What a TLS handshake found; ``earliest_expiry`` is the earliest notAfter of the
    presented chain, in seconds since the epoch (0 when unknown)."""

    version: str = ""
    cipher: str = ""
    earliest_expiry: float = 0.0
    subject: str = ""
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class HttpDetails:
    status_code: int = 0
    http_version: str = ""
    final_url: str = ""
    body_bytes: int = 0
    redirects: int = 0
    peer: str = ""
    tls: TlsDetails | None = None


@dataclass(frozen=True, slots=True)
class TcpDetails:
    peer: str = ""
    tls: TlsDetails | None = None
    received: str = ""  # the first bytes the peer sent, when the check reads any


@dataclass(frozen=True, slots=True)
class DnsDetails:
    rcode: str = ""
    answers: tuple[str, ...] = ()
    server: str = ""
    tcp_fallback: bool = False


@dataclass(frozen=True, slots=True)
class IcmpDetails:
    sent: int = 0
    received: int = 0
    loss_percent: float = 0.0
    rtt_min: float = 0.0  # seconds
    rtt_avg: float = 0.0
    rtt_max: float = 0.0
    address: str = ""


Details = HttpDetails | TcpDetails | DnsDetails | IcmpDetails | None


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """What one probe run found. ``failure`` is None exactly when ``success`` is true."""

    success: bool
    failure: FailureClass | None = None
    message: str = ""
    phases: Phases = field(default_factory=Phases)
    details: Details = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.success != (self.failure is None):
            raise ValueError("a successful outcome has no failure class, a failed one has one")

    @classmethod
    def failed(
        cls,
        failure: FailureClass,
        message: str,
        phases: Phases | None = None,
        details: Details = None,
        warnings: tuple[str, ...] = (),
    ) -> ProbeOutcome:
        return cls(False, failure, message, phases or Phases(), details, warnings)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe run of one check by one agent, as delivered to the coordinator.

    ``seq`` increases strictly per agent instance; ``started_at`` is the agent's wall
    clock (seconds since the epoch) and ``duration`` the probe's wall time in seconds.
    """

    check: str
    check_revision: int
    seq: int
    started_at: float
    duration: float
    outcome: ProbeOutcome

    @property
    def success(self) -> bool:
        return self.outcome.success

    @property
    def failure(self) -> FailureClass | None:
        return self.outcome.failure
