"""Conversions between protobuf messages and the domain values, in one place.

Wire types stop here: the agent's link and the coordinator's servicers convert once,
everything behind them works on ``vantage.checks`` and ``vantage.results`` values.
Messages from the network are validated on the way in: ``WireError`` (one line) when a
message does not describe a valid value.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    # Positional on the coordinator's hot path (keywords cost ~20% more per value); the
    # round-trip tests in tests/test_wire.py catch a field order that no longer matches.
    return Phases(
        message.resolve_us / _US,
        message.connect_us / _US,
        message.tls_us / _US,
        message.processing_us / _US,
        message.transfer_us / _US,
    )


def _tls_details_to_pb(tls: TlsDetails, message: agent_pb2.TlsDetails) -> None:
    message.version = tls.version
    message.cipher = tls.cipher
    message.earliest_expiry_unix = round(tls.earliest_expiry)
    message.subject = tls.subject
    message.issuer = tls.issuer


def _tls_details_from_pb(message: agent_pb2.TlsDetails) -> TlsDetails:
    return TlsDetails(
        message.version,
        message.cipher,
        float(message.earliest_expiry_unix),
        message.subject,
        message.issuer,
    )


def result_to_pb(result: ProbeResult) -> agent_pb2.ProbeResult:
    message = agent_pb2.ProbeResult()
    _fill_result(result, message)
    return message


def results_to_pb(results: Iterable[ProbeResult], batch: agent_pb2.ResultBatch) -> None:
    """Append ``results`` to ``batch``, each built in place (no message per result to
    copy in afterwards: the agent sends thousands a second)."""
    add = batch.results.add
    for result in results:
        _fill_result(result, add())


def _fill_result(result: ProbeResult, message: agent_pb2.ProbeResult) -> None:
    # Fields left at their defaults are not set: each assignment costs on the hot path.
    outcome = result.outcome
    message.check = result.check
    message.check_revision = result.check_revision
    message.seq = result.seq
    message.started_unix_us = round(result.started_at * _US)
    message.duration_us = round(result.duration * _US)
    if outcome.success:
        message.success = True
    else:
        message.failure = failure_to_pb(outcome.failure)
    if outcome.message:
        message.message = outcome.message
    if outcome.warnings:
        message.warnings.extend(outcome.warnings)
    spent = outcome.phases
    phases = message.phases
    phases.SetInParent()
    if spent.resolve:
        phases.resolve_us = round(spent.resolve * _US)
    if spent.connect:
        phases.connect_us = round(spent.connect * _US)
    if spent.tls:
        phases.tls_us = round(spent.tls * _US)
    if spent.processing:
        phases.processing_us = round(spent.processing * _US)
    if spent.transfer:
        phases.transfer_us = round(spent.transfer * _US)
    details = outcome.details
    if isinstance(details, HttpDetails):
        http = message.http
        http.status_code = details.status_code
        http.http_version = details.http_version
        http.final_url = details.final_url
        http.body_bytes = details.body_bytes
        if details.redirects:
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


def _details_from_pb(message: agent_pb2.ProbeResult) -> Details:
    # Slicing a str no longer than the bound returns the same object, without a copy.
    kind = message.WhichOneof("details")
    if kind == "http":
        http = message.http
        return HttpDetails(
            http.status_code,
            http.http_version[:16],
            http.final_url[:2048],
            http.body_bytes,
            http.redirects,
            http.peer[:64],
            _tls_details_from_pb(http.tls) if http.HasField("tls") else None,
        )
    if kind == "tcp":
        tcp = message.tcp
        return TcpDetails(
            tcp.peer[:64],
            _tls_details_from_pb(tcp.tls) if tcp.HasField("tls") else None,
            tcp.received[:256],
        )
    if kind == "dns":
        dns = message.dns
        return DnsDetails(
            dns.rcode[:16],
            tuple(answer[:512] for answer in dns.answers[:64]),
            dns.server[:64],
            dns.tcp_fallback,
        )
    if kind == "icmp":
        icmp = message.icmp
        return IcmpDetails(
            icmp.sent,
            icmp.received,
            icmp.loss_percent,
            icmp.rtt_min_us / _US,
            icmp.rtt_avg_us / _US,
            icmp.rtt_max_us / _US,
            icmp.address[:64],
        )
    return None


def result_from_pb(message: agent_pb2.ProbeResult, *, numbered: bool = True) -> ProbeResult:
    """Validate a result from an agent; WireError when it is inconsistent.

    ``numbered``: a scheduled result, which must carry the agent's sequence number; an
    on-demand one (``numbered=False``) is outside that sequence and gets seq 0.

    Free text is cut to bounded lengths: a result must not grow the coordinator's memory
    without limit, whatever an agent sends.

    The coordinator's hot path (every result of every agent): each field is read once
    and the values are built positionally.
    """
    check = message.check
    if not check:
        raise WireError("result without a check name")
    seq = message.seq
    if not numbered:
        seq = 0
    elif seq == 0:
        raise WireError(f"result for {check!r} without a sequence number")
    number = message.failure
    failure = failure_from_pb(number) if number else None
    success = message.success
    if success != (failure is None):
        raise WireError(
            f"result for {check!r}: success={success} contradicts failure class {failure or 'none'}"
        )
    warnings = message.warnings
    return ProbeResult(
        check,
        message.check_revision,
        seq,
        message.started_unix_us / _US,
        message.duration_us / _US,
        ProbeOutcome(
            success,
            failure,
            message.message[:1024],
            phases_from_pb(message.phases),
            _details_from_pb(message),
            tuple(warning[:256] for warning in warnings[:8]) if warnings else (),
        ),
    )
