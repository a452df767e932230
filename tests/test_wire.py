"""What crosses the wire comes back as it went: checks and results of every probe type."""

from __future__ import annotations

import pytest

from vantage.checks import AnyCheck, parse_check
from vantage.results import (
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
from vantage.wire import WireError, check_from_pb, check_to_pb, result_from_pb, result_to_pb

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

CHECKS = [
    {"name": "plain", "type": "http", "target": "http://h/"},
    {
        "name": "full-http",
        "type": "http",
        "target": "https://h:8443/p?q=1",
        "method": "POST",
        "headers": {"X-Token": "a b", "Accept": "text/html"},
        "body": '{"a": 1}',
        "expected_status": [200, "201-204"],
        "body_match": "ok",
        "body_not_match": "error",
        "follow_redirects": False,
        "max_redirects": 0,
        "ip_version": "prefer_ipv6",
        "tls": {"verify": False, "ca_pem": PEM, "server_name": "sni.example",
                "cert_expiry_warning_days": 30},
        "labels": {"team": "web"},
        "interval": "10s",
        "timeout": "2.5s",
    },
    {"name": "port", "type": "tcp", "target": "h:25"},
    {"name": "smtp", "type": "tcp", "target": "[::1]:465", "tls": True, "send": "EHLO x\r\n",
     "expect": "^220", "ip_version": "ipv6"},
    {"name": "dns", "type": "dns", "target": "example.org"},
    {"name": "dns-full", "type": "dns", "target": "example.org.", "record_type": "MX",
     "server": "[::1]:5353", "tcp": True, "expected_rcode": "NXDOMAIN",
     "expected_answers": [], "answer_match": "mx"},
    {"name": "ping", "type": "icmp", "target": "198.18.0.1", "count": 5,
     "packet_interval": "100ms", "max_loss_percent": 20, "ip_version": "ipv4",
     "payload_size": 0},
]  # fmt: skip


@pytest.mark.parametrize("data", CHECKS, ids=[c["name"] for c in CHECKS])
def test_checks_survive_the_wire(data: dict[str, object]) -> None:
    check: AnyCheck = parse_check(data)
    back = check_from_pb(check_to_pb(check))
    assert back == check
    assert back.revision == check.revision


def test_a_check_that_does_not_validate_is_a_wire_error() -> None:
    message = check_to_pb(parse_check(CHECKS[0]))
    message.timeout_ms = message.interval_ms
    with pytest.raises(WireError, match="check 'plain'"):
        check_from_pb(message)


TLS = TlsDetails("TLSv1.3", "TLS_AES_128_GCM_SHA256", 1_900_000_000.0, "CN=h", "CN=ca")
DETAILS = [
    HttpDetails(200, "1.1", "https://h/x", 123, 2, "192.0.2.1:443", TLS),
    TcpDetails("[::1]:25", None, "220 ready"),
    DnsDetails("NOERROR", ("192.0.2.1", "192.0.2.2"), "127.0.0.1:53", True),
    IcmpDetails(3, 2, 33.3, 0.001, 0.002, 0.003, "127.0.0.1"),
    None,
]


@pytest.mark.parametrize("details", DETAILS)
def test_results_survive_the_wire(details: object) -> None:
    outcome = ProbeOutcome.failed(
        FailureClass.TLS_CERT_EXPIRED,
        "certificate expired",
        Phases(0.001, 0.002, 0.003, 0.004, 0.005),
        details,  # type: ignore[arg-type]
        ("certificate expires in 3 days",),
    )
    result = ProbeResult("c", 7, 42, 1_700_000_000.5, 0.015, outcome)
    assert result_from_pb(result_to_pb(result)) == result


def test_a_result_contradicting_itself_is_a_wire_error() -> None:
    message = result_to_pb(ProbeResult("c", 1, 1, 0.0, 0.0, ProbeOutcome(success=True)))
    message.success = False
    with pytest.raises(WireError, match="contradicts"):
        result_from_pb(message)


def test_only_on_demand_results_go_without_a_sequence_number() -> None:
    message = result_to_pb(ProbeResult("c", 1, 0, 0.0, 0.0, ProbeOutcome(success=True)))
    with pytest.raises(WireError, match="without a sequence number"):
        result_from_pb(message)
    assert result_from_pb(message, numbered=False).seq == 0
    message.seq = 9  # an agent's number means nothing outside its sequence
    assert result_from_pb(message, numbered=False).seq == 0


def test_verdict_options_stay_with_the_coordinator() -> None:
    check = parse_check({"name": "w", "type": "tcp", "target": "h:1", "verdict": {"fail_after": 4}})
    back = check_from_pb(check_to_pb(check))
    assert back.verdict.overrides() == {}
    assert back.revision == check.revision
