"""The DNS probe against a real DNS server on loopback (UDP and TCP, port 0)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from dns_server import Behaviour, DnsServer, free_udp_port
from netns import run_in_netns
from probe_timing import assert_phases_sane

from agent.probes import PROBES
from agent.probes.dns import NoNameserver, probe_dns, read_nameserver, system_nameserver
from agent.probes.network import format_peer
from vantage.checks import DnsCheck, parse_check
from vantage.results import DnsDetails, FailureClass, ProbeOutcome

ZONE = {
    ("www.example.test", "A"): ["192.0.2.2", "192.0.2.1"],
    ("www.example.test", "AAAA"): ["2001:db8::1"],
    ("example.test", "MX"): ["20 backup.example.test.", "10 mx.example.test."],
    ("example.test", "TXT"): ['"v=spf1 " "-all"', '"hello world"'],
    ("example.test", "NS"): ["ns1.example.test.", "ns2.example.test."],
    ("example.test", "SOA"): ["ns1.example.test. hostmaster.example.test. 7 3600 600 86400 60"],
    ("alias.example.test", "CNAME"): ["www.example.test."],
    ("mail.example.test", "A"): ["192.0.2.25"],
    ("big.example.test", "A"): ["192.0.2.80"],
}
SCRIPTS = {
    "gone.example.test": Behaviour.NXDOMAIN,
    "broken.example.test": Behaviour.SERVFAIL,
    "private.example.test": Behaviour.REFUSED,
    "silent.example.test": Behaviour.SILENT,
    "big.example.test": Behaviour.TRUNCATE,
    "garbage.example.test": Behaviour.GARBAGE,
    "hangup.example.test": Behaviour.HANG_UP,
}


async def _start(host: str = "127.0.0.1") -> DnsServer:
    server = DnsServer()
    for (name, record_type), rdatas in ZONE.items():
        server.add(name, record_type, *rdatas)
    for name, behaviour in SCRIPTS.items():
        server.script(name, behaviour)
    await server.start(host)
    return server


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = await _start()
    yield server
    await server.close()


def dns_check(target: str, server: str | None, **spec: Any) -> DnsCheck:
    data: dict[str, Any] = {"name": "dns", "type": "dns", "target": target, **spec}
    if server is not None:
        data["server"] = server
    check = parse_check(data)
    assert isinstance(check, DnsCheck)
    return check


async def timed_probe(check: DnsCheck) -> tuple[ProbeOutcome, float]:
    started = time.monotonic()
    outcome = await probe_dns(check)
    return outcome, time.monotonic() - started


def assert_dns_phases(outcome: ProbeOutcome, elapsed: float) -> None:
    # The whole query is the resolve phase.
    zero = ("connect", "tls", "processing", "transfer")
    assert_phases_sane(outcome, elapsed, zero=zero, slack=0.005)


async def test_a_record_is_up_with_sorted_answers_and_phases(dns_server: DnsServer) -> None:
    outcome, elapsed = await timed_probe(dns_check("www.example.test", dns_server.address))

    assert outcome.success, outcome.message
    assert outcome.details == DnsDetails(
        rcode="NOERROR",
        answers=("192.0.2.1", "192.0.2.2"),
        server=dns_server.address,
        tcp_fallback=False,
    )
    assert outcome.phases.resolve > 0
    assert_dns_phases(outcome, elapsed)
    assert dns_server.queries == [("udp", "www.example.test.", "A")]


@pytest.mark.parametrize(
    ("target", "record_type", "answers"),
    [
        ("www.example.test", "AAAA", ("2001:db8::1",)),
        ("example.test", "MX", ("10 mx.example.test.", "20 backup.example.test.")),
        ("example.test", "TXT", ("hello world", "v=spf1 -all")),
        ("example.test", "NS", ("ns1.example.test.", "ns2.example.test.")),
        (
            "example.test",
            "SOA",
            ("ns1.example.test. hostmaster.example.test. 7 3600 600 86400 60",),
        ),
        ("alias.example.test", "CNAME", ("www.example.test.",)),
    ],
)
async def test_every_record_type_in_presentation_format(
    dns_server: DnsServer, target: str, record_type: str, answers: tuple[str, ...]
) -> None:
    outcome = await probe_dns(dns_check(target, dns_server.address, record_type=record_type))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.answers == answers


async def test_answers_leave_out_the_cname_chain(dns_server: DnsServer) -> None:
    outcome = await probe_dns(dns_check("alias.example.test", dns_server.address))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.answers == ("192.0.2.1", "192.0.2.2")


async def test_nxdomain(dns_server: DnsServer) -> None:
    outcome, elapsed = await timed_probe(dns_check("gone.example.test", dns_server.address))

    assert outcome.failure is FailureClass.DNS_NXDOMAIN
    assert outcome.message == f"query gone.example.test A @{dns_server.address}: NXDOMAIN"
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.rcode == "NXDOMAIN"
    assert_dns_phases(outcome, elapsed)


async def test_expected_nxdomain_is_up(dns_server: DnsServer) -> None:
    check = dns_check("gone.example.test", dns_server.address, expected_rcode="NXDOMAIN")
    outcome = await probe_dns(check)

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.rcode == "NXDOMAIN"
    assert outcome.details.answers == ()


async def test_name_that_exists_when_nxdomain_is_expected(dns_server: DnsServer) -> None:
    check = dns_check("www.example.test", dns_server.address, expected_rcode="NXDOMAIN")
    outcome = await probe_dns(check)

    assert outcome.failure is FailureClass.DNS_ANSWER_MISMATCH
    assert outcome.message.endswith(": NOERROR (expected NXDOMAIN)")


async def test_servfail(dns_server: DnsServer) -> None:
    outcome = await probe_dns(dns_check("broken.example.test", dns_server.address))

    assert outcome.failure is FailureClass.DNS_SERVFAIL
    assert outcome.message == f"query broken.example.test A @{dns_server.address}: SERVFAIL"


async def test_refused_rcode_is_servfail_naming_the_rcode(dns_server: DnsServer) -> None:
    outcome = await probe_dns(dns_check("private.example.test", dns_server.address))

    assert outcome.failure is FailureClass.DNS_SERVFAIL
    assert outcome.message == f"query private.example.test A @{dns_server.address}: REFUSED"
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.rcode == "REFUSED"


@pytest.mark.parametrize("tcp", [False, True])
async def test_silent_server_is_dns_timeout_within_the_timeout(
    dns_server: DnsServer, tcp: bool
) -> None:
    check = dns_check("silent.example.test", dns_server.address, timeout="400ms", tcp=tcp)
    outcome, elapsed = await timed_probe(check)

    assert outcome.failure is FailureClass.DNS_TIMEOUT
    transport = " over TCP" if tcp else ""
    assert outcome.message == (
        f"query silent.example.test A @{dns_server.address}{transport}: timed out after 400ms"
    )
    assert elapsed < check.timeout + 0.1
    assert outcome.phases.resolve == pytest.approx(check.timeout, abs=0.1)
    assert_dns_phases(outcome, elapsed)


async def test_truncated_udp_reply_falls_back_to_tcp(dns_server: DnsServer) -> None:
    outcome, elapsed = await timed_probe(dns_check("big.example.test", dns_server.address))

    assert outcome.success, outcome.message
    assert outcome.details == DnsDetails(
        rcode="NOERROR", answers=("192.0.2.80",), server=dns_server.address, tcp_fallback=True
    )
    assert dns_server.queries == [
        ("udp", "big.example.test.", "A"),
        ("tcp", "big.example.test.", "A"),
    ]
    assert_dns_phases(outcome, elapsed)


async def test_tcp_only(dns_server: DnsServer) -> None:
    outcome = await probe_dns(dns_check("www.example.test", dns_server.address, tcp=True))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.answers == ("192.0.2.1", "192.0.2.2")
    assert outcome.details.tcp_fallback is False
    assert dns_server.queries == [("tcp", "www.example.test.", "A")]


@pytest.mark.parametrize("tcp", [False, True])
async def test_garbage_reply_is_servfail(dns_server: DnsServer, tcp: bool) -> None:
    check = dns_check("garbage.example.test", dns_server.address, tcp=tcp)
    outcome, elapsed = await timed_probe(check)

    assert outcome.failure is FailureClass.DNS_SERVFAIL
    assert "malformed reply" in outcome.message
    assert_dns_phases(outcome, elapsed)


async def test_connection_closed_without_answer_is_servfail(dns_server: DnsServer) -> None:
    check = dns_check("hangup.example.test", dns_server.address, tcp=True)
    outcome, elapsed = await timed_probe(check)

    assert outcome.failure is FailureClass.DNS_SERVFAIL
    assert outcome.message == (
        f"query hangup.example.test A @{dns_server.address} over TCP: "
        "connection closed before the answer"
    )
    assert_dns_phases(outcome, elapsed)


def test_no_route_to_the_server_is_network_unreachable() -> None:
    # A fresh network namespace has nothing but loopback, so no route to the server.
    found = run_in_netns(
        "import asyncio, json\n"
        "from agent.probes.dns import probe_dns\n"
        "from vantage.checks import parse_check\n"
        "check = parse_check({'name': 'd', 'type': 'dns', 'target': 'example.org',"
        " 'server': '192.0.2.53'})\n"
        "outcome = asyncio.run(probe_dns(check))\n"
        "print(json.dumps([outcome.failure, outcome.message]))\n"
    )

    assert found == [
        "network_unreachable",
        "query example.org A @192.0.2.53:53: network is unreachable",
    ]


async def test_expected_answers_match_as_a_normalised_set(dns_server: DnsServer) -> None:
    check = dns_check(
        "example.test",
        dns_server.address,
        record_type="MX",
        expected_answers=["10 MX.Example.Test", "20 backup.example.test."],
    )
    outcome = await probe_dns(check)

    assert outcome.success, outcome.message


async def test_expected_answers_mismatch_says_expected_and_got(dns_server: DnsServer) -> None:
    check = dns_check("www.example.test", dns_server.address, expected_answers=["192.0.2.1"])
    outcome = await probe_dns(check)

    assert outcome.failure is FailureClass.DNS_ANSWER_MISMATCH
    assert outcome.message == (
        f"query www.example.test A @{dns_server.address}: answers "
        "['192.0.2.1', '192.0.2.2'] differ from expected ['192.0.2.1']"
    )
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.answers == ("192.0.2.1", "192.0.2.2")


async def test_answer_match(dns_server: DnsServer) -> None:
    matching = dns_check(
        "example.test", dns_server.address, record_type="TXT", answer_match=r"^v=spf1 "
    )
    missing = dns_check(
        "example.test", dns_server.address, record_type="TXT", answer_match=r"^v=DMARC1"
    )

    assert (await probe_dns(matching)).success
    outcome = await probe_dns(missing)
    assert outcome.failure is FailureClass.DNS_ANSWER_MISMATCH
    assert outcome.message == (
        f"query example.test TXT @{dns_server.address}: no answer matches '^v=DMARC1' "
        "(got ['hello world', 'v=spf1 -all'])"
    )


async def test_no_record_of_the_asked_type_is_a_mismatch(dns_server: DnsServer) -> None:
    outcome = await probe_dns(
        dns_check("mail.example.test", dns_server.address, record_type="AAAA")
    )

    assert outcome.failure is FailureClass.DNS_ANSWER_MISMATCH
    assert outcome.message == f"query mail.example.test AAAA @{dns_server.address}: no AAAA record"
    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.rcode == "NOERROR"


@pytest.mark.parametrize("tcp", [False, True])
async def test_closed_port_is_connect_refused(tcp: bool) -> None:
    port = free_udp_port()
    outcome, elapsed = await timed_probe(
        dns_check("www.example.test", f"127.0.0.1:{port}", tcp=tcp)
    )

    assert outcome.failure is FailureClass.CONNECT_REFUSED
    transport = " over TCP" if tcp else ""
    assert outcome.message == (
        f"query www.example.test A @127.0.0.1:{port}{transport}: connection refused"
    )
    assert_dns_phases(outcome, elapsed)


async def test_ipv6_server() -> None:
    try:
        server = await _start("::1")
    except OSError:
        pytest.fail("no IPv6 loopback here")
    try:
        for tcp in (False, True):
            outcome = await probe_dns(dns_check("www.example.test", server.address, tcp=tcp))
            assert outcome.success, outcome.message
            assert isinstance(outcome.details, DnsDetails)
            assert outcome.details.server == server.address
    finally:
        await server.close()


async def test_without_server_asks_the_system_resolver() -> None:
    # Whatever that resolver says about a name that cannot exist (RFC 6761), the probe
    # asked it and reports it, and does not blame itself.
    check = dns_check("nonexistent.invalid", None, timeout="2s", interval="3s")
    outcome = await probe_dns(check)

    assert isinstance(outcome.details, DnsDetails)
    assert outcome.details.server == format_peer(*system_nameserver())
    assert outcome.failure is not FailureClass.INTERNAL, outcome.message


def test_system_resolver_is_the_first_nameserver(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n")

    assert read_nameserver(conf) == ("192.0.2.53", 53)


def test_no_nameserver_says_so(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\n")

    with pytest.raises(NoNameserver, match=r"^dns: no system resolver: .*resolv.conf: "):
        read_nameserver(conf)


async def test_is_registered_and_refuses_other_checks() -> None:
    assert PROBES["dns"] is probe_dns
    tcp = parse_check({"name": "t", "type": "tcp", "target": "127.0.0.1:1"})
    with pytest.raises(TypeError):
        await probe_dns(tcp)
