"""What a target typed after `vantage check` becomes (vantage.targets)."""

from __future__ import annotations

import pytest

from vantage.checks import DnsCheck, HttpCheck, IcmpCheck, TcpCheck
from vantage.targets import TargetError, on_demand_check, target_host


@pytest.mark.parametrize(
    ("target", "probe_type", "kind", "check_target"),
    [
        ("https://example.org/status?x=1", "", "http", "https://example.org/status?x=1"),
        ("http://example.org", "", "http", "http://example.org"),
        ("example.org:443", "", "tcp", "example.org:443"),
        ("[2001:db8::1]:22", "", "tcp", "[2001:db8::1]:22"),
        ("example.org", "", "icmp", "example.org"),
        ("192.0.2.1", "", "icmp", "192.0.2.1"),
        ("2001:db8::1", "", "icmp", "2001:db8::1"),
        ("[2001:db8::1]", "", "icmp", "2001:db8::1"),
        # The type overrides the shape.
        ("example.org", "http", "http", "http://example.org/"),
        ("2001:db8::1", "http", "http", "http://[2001:db8::1]/"),
        ("example.org:8080", "http", "http", "http://example.org:8080/"),
        ("example.org:443", "http", "http", "https://example.org:443/"),
        ("https://example.org/x", "tcp", "tcp", "example.org:443"),
        ("http://[2001:db8::1]:8080/", "tcp", "tcp", "[2001:db8::1]:8080"),
        ("https://example.org/x", "icmp", "icmp", "example.org"),
        ("https://example.org/x", "dns", "dns", "example.org"),
        ("example.org", "dns", "dns", "example.org"),
        ("example.org:25", "icmp", "icmp", "example.org"),
    ],
)
def test_the_target_and_type_make_a_check(
    target: str, probe_type: str, kind: str, check_target: str
) -> None:
    check = on_demand_check(target, probe_type, 3.0, "checknow-1")
    assert (check.type, check.target) == (kind, check_target)
    assert check.name == "checknow-1"
    assert check.timeout == 3.0
    assert check.interval > check.timeout


def test_the_check_takes_the_checks_file_defaults() -> None:
    http = on_demand_check("https://example.org/")
    assert isinstance(http, HttpCheck)
    assert http.timeout == 5.0
    assert http.follow_redirects
    assert http.expected_status == ((200, 399),)
    assert http.tls.verify
    icmp = on_demand_check("example.org")
    assert isinstance(icmp, IcmpCheck)
    assert icmp.count == 3
    assert isinstance(on_demand_check("example.org:22"), TcpCheck)
    assert isinstance(on_demand_check("example.org", "dns"), DnsCheck)


@pytest.mark.parametrize(
    ("target", "probe_type", "timeout", "message"),
    [
        ("", "", 5.0, "the target is empty"),
        ("x" * 2049, "", 5.0, "the target is longer than 2048 characters"),
        ("exa mple.org", "", 5.0, "target 'exa mple.org' has spaces or control characters"),
        ("example.org\n", "", 5.0, "target 'example.org\\n' has spaces or control characters"),
        (
            "ftp://example.org/",
            "",
            5.0,
            "target 'ftp://example.org/' is not an http:// or https:// URL",
        ),
        ("http:///path", "", 5.0, "target 'http:///path' is not an http:// or https:// URL"),
        (
            "http://example.org:99999/",
            "",
            5.0,
            "target 'http://example.org:99999/' has an invalid port",
        ),
        (
            "example.org:0",
            "",
            5.0,
            "target 'example.org:0' is not HOST or HOST:PORT with a port in 1-65535",
        ),
        ("a:b:c", "", 5.0, "'a:b:c': write an IPv6 address in brackets, like [::1]:7400"),
        ("example.org", "smtp", 5.0, "unknown type 'smtp' (known: http, tcp, dns, icmp)"),
        ("example.org", "tcp", 5.0, "a tcp check needs HOST:PORT, not 'example.org'"),
        ("example.org:53", "dns", 5.0, "a dns check takes a name, not 'example.org:53'"),
        ("example.org", "", 0.3, "3 pings 200ms apart do not fit in timeout 300ms"),
        ("example.org", "", 0.0, "timeout 0s: must be greater than 0"),
    ],
)
def test_a_target_that_makes_no_check_says_why(
    target: str, probe_type: str, timeout: float, message: str
) -> None:
    with pytest.raises(TargetError) as caught:
        on_demand_check(target, probe_type, timeout)
    assert str(caught.value) == message


def test_the_host_an_on_demand_check_connects_to() -> None:
    assert target_host(on_demand_check("https://Example.org:8443/x")) == "example.org"
    assert target_host(on_demand_check("[2001:db8::1]:22")) == "2001:db8::1"
    assert target_host(on_demand_check("192.0.2.1")) == "192.0.2.1"
    assert target_host(on_demand_check("example.org", "dns")) is None
