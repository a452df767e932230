"""Conversions between protobuf messages and the domain values, in one place.

Wire types stop here: the agent's link and the coordinator's servicers convert once,
everything behind them works on ``vantage.checks`` and ``vantage.results`` values.
Messages from the network are validated on the way in: ``WireError`` (one line) when a
message does not describe a valid value.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from vantage_proto.v1 import agent_pb2, common_pb2

from .checks import AnyCheck, DnsCheck, HttpCheck, TcpCheck, TlsOptions, parse_check
from .results import (
    Details,
    DnsDetails,
    FailureClass,
    HttpDetails,
    IcmpDetails,
    Phases,
    ProbeOutcome,
    ProbeResult,
    TcpDetails,
    TlsDetails,
)


class WireError(ValueError):
    """A message from the network does not describe a valid value."""


_FAILURE_TO_PB: dict[FailureClass, common_pb2.FailureClass.ValueType] = {
    failure: common_pb2.FailureClass.Value(f"FAILURE_CLASS_{failure.name}")
    for failure in FailureClass
}
_FAILURE_FROM_PB = {number: failure for failure, number in _FAILURE_TO_PB.items()}
_US = 1_000_000


def failure_to_pb(failure: FailureClass | None) -> common_pb2.FailureClass.ValueType:
    return common_pb2.FAILURE_CLASS_UNSPECIFIED if failure is None else _FAILURE_TO_PB[failure]


def failure_from_pb(number: int) -> FailureClass | None:
    if number == common_pb2.FAILURE_CLASS_UNSPECIFIED:
        return None
    try:
        return _FAILURE_FROM_PB[number]  # type: ignore[index]
    except KeyError:
        raise WireError(f"unknown failure class number {number}") from None


_IP_VERSION_TO_PB: dict[str, common_pb2.IpVersion.ValueType] = {
    "any": common_pb2.IP_VERSION_UNSPECIFIED,
    "ipv4": common_pb2.IP_VERSION_IPV4,
    "ipv6": common_pb2.IP_VERSION_IPV6,
    "prefer_ipv4": common_pb2.IP_VERSION_PREFER_IPV4,
    "prefer_ipv6": common_pb2.IP_VERSION_PREFER_IPV6,
}
_IP_VERSION_FROM_PB = {number: name for name, number in _IP_VERSION_TO_PB.items()}


def _tls_to_pb(tls: TlsOptions, message: common_pb2.TlsOptions) -> None:
    message.SetInParent()
    message.insecure_skip_verify = not tls.verify
    message.ca_pem = tls.ca_pem or ""
    message.server_name = tls.server_name or ""
    message.client_cert_pem = tls.client_cert_pem or ""
    message.client_key_pem = tls.client_key_pem or ""
    message.cert_expiry_warning_days = tls.cert_expiry_warning_days


def _tls_from_pb(message: common_pb2.TlsOptions) -> dict[str, Any]:
    data: dict[str, Any] = {
        "verify": not message.insecure_skip_verify,
        "cert_expiry_warning_days": message.cert_expiry_warning_days,
    }
    for key in ("ca_pem", "server_name", "client_cert_pem", "client_key_pem"):
        if value := getattr(message, key):
            data[key] = value
    return data


def check_to_pb(check: AnyCheck) -> common_pb2.Check:
    message = common_pb2.Check(
        name=check.name,
        revision=check.revision,
        target=check.target,
        interval_ms=round(check.interval * 1000),
        timeout_ms=round(check.timeout * 1000),
        labels=check.labels,
    )
    if isinstance(check, HttpCheck):
        http = message.http
        http.method = check.method
        http.expected_status.extend(
            common_pb2.StatusRange(low=low, high=high) for low, high in check.expected_status
        )
        http.headers.update(check.headers)
        http.body = check.body or ""
        http.body_match = check.body_match or ""
        http.body_not_match = check.body_not_match or ""
        http.follow_redirects = check.follow_redirects
        http.max_redirects = check.max_redirects
        http.ip_version = _IP_VERSION_TO_PB[check.ip_version]
        _tls_to_pb(check.tls, http.tls)
    elif isinstance(check, TcpCheck):
        tcp = message.tcp
        tcp.SetInParent()
        if check.tls is not None:
            _tls_to_pb(check.tls, tcp.tls)
        tcp.send = check.send or ""
        tcp.expect = check.expect or ""
        tcp.ip_version = _IP_VERSION_TO_PB[check.ip_version]
    elif isinstance(check, DnsCheck):
        dns = message.dns
        dns.record_type = check.record_type
        dns.server = check.server or ""
        dns.tcp = check.tcp
        dns.expected_rcode = check.expected_rcode
        dns.has_expected_answers = check.expected_answers is not None
        dns.expected_answers.extend(check.expected_answers or ())
        dns.answer_match = check.answer_match or ""
    else:
        icmp = message.icmp
        icmp.count = check.count
        icmp.packet_interval_ms = round(check.packet_interval * 1000)
        icmp.max_loss_percent = check.max_loss_percent
        icmp.ip_version = _IP_VERSION_TO_PB[check.ip_version]
        icmp.payload_size = check.payload_size
    return message


def _optional(**fields: Any) -> dict[str, Any]:
    """Keep the fields that are set: proto3 sends empty strings for unset text."""
    return {key: value for key, value in fields.items() if value not in ("", None)}


def check_from_pb(message: common_pb2.Check) -> AnyCheck:
    """Validate an assigned check exactly as the coordinator validates its file."""
    kind = message.WhichOneof("probe")
    data: dict[str, Any] = {
        "name": message.name,
        "type": kind,
        "target": message.target,
        "interval": message.interval_ms / 1000,
        "timeout": message.timeout_ms / 1000,
        "labels": dict(message.labels),
    }
    if kind == "http":
        http = message.http
        data |= _optional(
            method=http.method,
            body=http.body,
            body_match=http.body_match,
            body_not_match=http.body_not_match,
        )
        if http.expected_status:
            data["expected_status"] = [f"{r.low}-{r.high}" for r in http.expected_status]
        data["headers"] = dict(http.headers)
        data["follow_redirects"] = http.follow_redirects
        data["max_redirects"] = http.max_redirects
        data["ip_version"] = _IP_VERSION_FROM_PB.get(http.ip_version, "?")
        data["tls"] = _tls_from_pb(http.tls)
    elif kind == "tcp":
        tcp = message.tcp
        data |= _optional(send=tcp.send, expect=tcp.expect)
        data["ip_version"] = _IP_VERSION_FROM_PB.get(tcp.ip_version, "?")
        if tcp.HasField("tls"):
            data["tls"] = _tls_from_pb(tcp.tls)
    elif kind == "dns":
        dns = message.dns
        data |= _optional(
            record_type=dns.record_type,
            server=dns.server,
            expected_rcode=dns.expected_rcode,
            answer_match=dns.answer_match,
        )
        data["tcp"] = dns.tcp
        if dns.has_expected_answers:
            data["expected_answers"] = list(dns.expected_answers)
    elif kind == "icmp":
        icmp = message.icmp
        data |= {
            "count": icmp.count,
            "packet_interval": icmp.packet_interval_ms / 1000,
            "max_loss_percent": icmp.max_loss_percent,
            "ip_version": _IP_VERSION_FROM_PB.get(icmp.ip_version, "?"),
            "payload_size": icmp.payload_size,
        }
    try:
        check = parse_check(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"])
        raise WireError(f"check {message.name!r}: {field}: {error['msg']}") from None
    return check


def phases_to_pb(phases: Phases) -> agent_pb2.Phases:
    return agent_pb2.Phases(
        resolve_us=round(phases.resolve * _US),
        connect_us=round(phases.connect * _US),
        tls_us=round(phases.tls * _US),
        processing_us=round(phases.processing * _US),
        transfer_us=round(phases.transfer * _US),
    )


def phases_from_pb(message: agent_pb2.Phases) -> Phases:
    return Phases(
        resolve=message.resolve_us / _US,
        connect=message.connect_us / _US,
        tls=message.tls_us / _US,
        processing=message.processing_us / _US,
        transfer=message.transfer_us / _US,
    )


def _tls_details_to_pb(tls: TlsDetails, message: agent_pb2.TlsDetails) -> None:
    message.version = tls.version
    message.cipher = tls.cipher
    message.earliest_expiry_unix = round(tls.earliest_expiry)
    message.subject = tls.subject
    message.issuer = tls.issuer


def _tls_details_from_pb(message: agent_pb2.TlsDetails) -> TlsDetails:
    return TlsDetails(
        version=message.version,
        cipher=message.cipher,
        earliest_expiry=float(message.earliest_expiry_unix),
        subject=message.subject,
        issuer=message.issuer,
    )


def result_to_pb(result: ProbeResult) -> agent_pb2.ProbeResult:
    outcome = result.outcome
    message = agent_pb2.ProbeResult(
        check=result.check,
        check_revision=result.check_revision,
        seq=result.seq,
        started_unix_us=round(result.started_at * _US),
        duration_us=round(result.duration * _US),
        success=outcome.success,
        failure=failure_to_pb(outcome.failure),
        message=outcome.message,
        phases=phases_to_pb(outcome.phases),
        warnings=outcome.warnings,
    )
    details = outcome.details
    if isinstance(details, HttpDetails):
        http = message.http
        http.status_code = details.status_code
        http.http_version = details.http_version
        http.final_url = details.final_url
        http.body_bytes = details.body_bytes
        http.redirects = details.redirects
        http.peer = details.peer
        if details.tls is not None:
            _tls_details_to_pb(details.tls, http.tls)
    elif isinstance(details, TcpDetails):
        tcp = message.tcp
        tcp.peer = details.peer
        tcp.received = details.received
        if details.tls is not None:
            _tls_details_to_pb(details.tls, tcp.tls)
    elif isinstance(details, DnsDetails):
        dns = message.dns
        dns.rcode = details.rcode
        dns.answers.extend(details.answers)
        dns.server = details.server
        dns.tcp_fallback = details.tcp_fallback
    elif isinstance(details, IcmpDetails):
        icmp = message.icmp
        icmp.sent = details.sent
        icmp.received = details.received
        icmp.loss_percent = details.loss_percent
        icmp.rtt_min_us = round(details.rtt_min * _US)
        icmp.rtt_avg_us = round(details.rtt_avg * _US)
        icmp.rtt_max_us = round(details.rtt_max * _US)
        icmp.address = details.address
    return message


def _details_from_pb(message: agent_pb2.ProbeResult) -> Details:
    kind = message.WhichOneof("details")
    if kind == "http":
        http = message.http
        return HttpDetails(
            status_code=http.status_code,
            http_version=http.http_version[:16],
            final_url=http.final_url[:2048],
            body_bytes=http.body_bytes,
            redirects=http.redirects,
            peer=http.peer[:64],
            tls=_tls_details_from_pb(http.tls) if http.HasField("tls") else None,
        )
    if kind == "tcp":
        tcp = message.tcp
        return TcpDetails(
            peer=tcp.peer[:64],
            tls=_tls_details_from_pb(tcp.tls) if tcp.HasField("tls") else None,
            received=tcp.received[:256],
        )
    if kind == "dns":
        dns = message.dns
        return DnsDetails(
            rcode=dns.rcode[:16],
            answers=tuple(answer[:512] for answer in dns.answers[:64]),
            server=dns.server[:64],
            tcp_fallback=dns.tcp_fallback,
        )
    if kind == "icmp":
        icmp = message.icmp
        return IcmpDetails(
            sent=icmp.sent,
            received=icmp.received,
            loss_percent=icmp.loss_percent,
            rtt_min=icmp.rtt_min_us / _US,
            rtt_avg=icmp.rtt_avg_us / _US,
            rtt_max=icmp.rtt_max_us / _US,
            address=icmp.address[:64],
        )
    return None


def result_from_pb(message: agent_pb2.ProbeResult) -> ProbeResult:
    """Validate a result from an agent; WireError when it is inconsistent.

    Free text is cut to bounded lengths: a result must not grow the coordinator's memory
    without limit, whatever an agent sends.
    """
    if not message.check:
        raise WireError("result without a check name")
    if message.seq == 0:
        raise WireError(f"result for {message.check!r} without a sequence number")
    failure = failure_from_pb(message.failure)
    if message.success != (failure is None):
        raise WireError(
            f"result for {message.check!r}: success={message.success} "
            f"contradicts failure class {failure or 'none'}"
        )
    return ProbeResult(
        check=message.check,
        check_revision=message.check_revision,
        seq=message.seq,
        started_at=message.started_unix_us / _US,
        duration=message.duration_us / _US,
        outcome=ProbeOutcome(
            success=message.success,
            failure=failure,
            message=message.message[:1024],
            phases=phases_from_pb(message.phases),
            details=_details_from_pb(message),
            warnings=tuple(warning[:256] for warning in message.warnings[:8]),
        ),
    )
