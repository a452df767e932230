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

from .checks import HttpCheck, TcpCheck, parse_check
from .results import (
    Details,
    FailureClass,
    HttpDetails,
    Phases,
    ProbeOutcome,
    ProbeResult,
    TcpDetails,
)

AnyCheck = HttpCheck | TcpCheck


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
        message.http.method = check.method
        message.http.expected_status.extend(
            common_pb2.StatusRange(low=low, high=high) for low, high in check.expected_status
        )
    else:
        message.tcp.SetInParent()
    return message


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
        if message.http.method:
            data["method"] = message.http.method
        if message.http.expected_status:
            data["expected_status"] = [f"{r.low}-{r.high}" for r in message.http.expected_status]
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
    )
    details = outcome.details
    if isinstance(details, HttpDetails):
        message.http.status_code = details.status_code
        message.http.http_version = details.http_version
        message.http.final_url = details.final_url
        message.http.body_bytes = details.body_bytes
    elif isinstance(details, TcpDetails):
        message.tcp.peer = details.peer
    return message


def result_from_pb(message: agent_pb2.ProbeResult) -> ProbeResult:
    """Validate a result from an agent; WireError when it is inconsistent."""
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
    details: Details = None
    kind = message.WhichOneof("details")
    if kind == "http":
        details = HttpDetails(
            status_code=message.http.status_code,
            http_version=message.http.http_version,
            final_url=message.http.final_url,
            body_bytes=message.http.body_bytes,
        )
    elif kind == "tcp":
        details = TcpDetails(peer=message.tcp.peer)
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
            details=details,
        ),
    )
