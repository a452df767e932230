"""The ICMP probe against loopback, unrouted addresses and fresh network namespaces."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from typing import Any

import pytest
from netns import run_in_netns
from probe_timing import assert_phases_sane

from agent.probes import PROBES
from agent.probes.icmp import (
    PING_GROUP_RANGE,
    IcmpAccess,
    IcmpFacts,
    IcmpMode,
    icmp_access,
    probe_icmp,
    select_icmp_access,
)
from vantage.checks import IcmpCheck, parse_check
from vantage.results import FailureClass, IcmpDetails, ProbeOutcome

# An address in the benchmarking range (RFC 2544) that no network here answers for.
UNROUTED = "198.18.255.254"
NO_ACCESS = (
    "icmp: no raw socket (needs root or CAP_NET_RAW) and unprivileged ICMP is off for gid "
    "1000 (net.ipv4.ping_group_range is '1 0'; allow it with sysctl -w "
    "net.ipv4.ping_group_range='0 2147483647')"
)


def icmp_check(target: str, **spec: Any) -> IcmpCheck:
    check = parse_check({"name": "ping", "type": "icmp", "target": target, **spec})
    assert isinstance(check, IcmpCheck)
    return check


async def timed_probe(check: IcmpCheck, **kwargs: Any) -> tuple[ProbeOutcome, float]:
    started = time.monotonic()
    outcome = await probe_icmp(check, **kwargs)
    return outcome, time.monotonic() - started


def assert_icmp_phases(outcome: ProbeOutcome, elapsed: float) -> None:
    # Resolve, then the pings count as processing.
    assert_phases_sane(outcome, elapsed, zero=("connect", "tls", "transfer"), slack=0.005)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
async def test_loopback_answers_every_request(address: str) -> None:
    check = icmp_check(address, count=3, packet_interval="50ms", payload_size=100)
    outcome, elapsed = await timed_probe(check)

    assert outcome.success, outcome.message
    details = outcome.details
    assert isinstance(details, IcmpDetails)
    assert (details.sent, details.received, details.loss_percent) == (3, 3, 0.0)
    assert details.address == address
    assert 0 < details.rtt_min <= details.rtt_avg <= details.rtt_max < check.timeout
    assert outcome.phases.resolve == 0
    # The requests keep their pace (uvloop's clock ticks in milliseconds).
    assert outcome.phases.processing >= 2 * check.packet_interval - 0.002
    assert_icmp_phases(outcome, elapsed)


async def test_name_is_resolved_first() -> None:
    outcome, elapsed = await timed_probe(icmp_check("localhost", count=1, ip_version="ipv4"))

    assert outcome.success, outcome.message
    assert isinstance(outcome.details, IcmpDetails)
    assert outcome.details.address == "127.0.0.1"
    assert outcome.phases.resolve > 0
    assert_icmp_phases(outcome, elapsed)


async def test_probes_at_once_keep_their_replies_apart() -> None:
    checks = [icmp_check("127.0.0.1", count=4, packet_interval="20ms") for _ in range(6)]
    outcomes = await asyncio.gather(*(probe_icmp(check) for check in checks))

    for outcome in outcomes:
        assert outcome.success, outcome.message
        assert isinstance(outcome.details, IcmpDetails)
        assert outcome.details.received == 4


async def test_unanswered_address_fails_within_the_timeout() -> None:
    check = icmp_check(UNROUTED, count=3, packet_interval="100ms", timeout="800ms")
    outcome, elapsed = await timed_probe(check)

    # Depending on the network this host sits in, the requests vanish or a router says
    # the destination is unreachable; never success, never past the deadline.
    assert outcome.failure in {FailureClass.ICMP_LOSS, FailureClass.NETWORK_UNREACHABLE}
    assert outcome.message.startswith(f"ping {UNROUTED}: ")
    assert outcome.message.endswith("3/3 lost") or "3/3 lost (" in outcome.message
    assert outcome.details == IcmpDetails(sent=3, received=0, loss_percent=100.0, address=UNROUTED)
    assert elapsed < check.timeout + 0.1
    assert_icmp_phases(outcome, elapsed)


async def test_nonexistent_name_is_a_dns_failure() -> None:
    outcome = await probe_icmp(icmp_check("nonexistent.invalid", timeout="2s", interval="3s"))

    assert outcome.failure in {
        FailureClass.DNS_NXDOMAIN,
        FailureClass.DNS_SERVFAIL,
        FailureClass.DNS_TIMEOUT,
    }
    assert outcome.message.startswith("resolve nonexistent.invalid: ")
    assert outcome.phases.processing == 0


async def test_literal_of_the_wrong_family() -> None:
    outcome = await probe_icmp(icmp_check("127.0.0.1", ip_version="ipv6"))

    assert outcome.failure is FailureClass.INTERNAL
    assert outcome.message == "127.0.0.1 is not an IPv6 address (ip_version)"


def test_raw_sockets_first_then_datagram_sockets() -> None:
    facts = IcmpFacts(
        raw_socket=True,
        datagram_socket=True,
        datagram_error="",
        gid=1000,
        ping_group_range="0 2147483647",
    )

    assert select_icmp_access(facts) == IcmpAccess(IcmpMode.RAW)
    assert select_icmp_access(replace(facts, raw_socket=False)) == IcmpAccess(IcmpMode.DATAGRAM)


def test_neither_socket_says_precisely_what_is_missing() -> None:
    facts = IcmpFacts(
        raw_socket=False,
        datagram_socket=False,
        datagram_error="permission denied",
        gid=1000,
        ping_group_range="1 0",
    )

    assert select_icmp_access(facts) == IcmpAccess(None, NO_ACCESS)
    allowed = replace(
        facts, ping_group_range="0 2147483647", datagram_error="protocol not supported"
    )
    assert select_icmp_access(allowed).problem == (
        "icmp: no raw socket (needs root or CAP_NET_RAW) and unprivileged ICMP sockets fail "
        "for gid 1000 although net.ipv4.ping_group_range is '0 2147483647': "
        "protocol not supported"
    )
    unknown = replace(facts, ping_group_range="")
    assert select_icmp_access(unknown).problem == (
        "icmp: no raw socket (needs root or CAP_NET_RAW) and no unprivileged ICMP socket: "
        "permission denied"
    )


def test_this_process_without_raw_sockets() -> None:
    # The facts of this very process, except the one a non-root agent would lack.
    facts = replace(IcmpFacts.gather(), raw_socket=False)
    group_range = " ".join(PING_GROUP_RANGE.read_text().split())
    low, high = (int(bound) for bound in group_range.split())

    access = select_icmp_access(facts)

    assert facts.gid == os.getegid()
    assert facts.ping_group_range == group_range
    if low <= os.getegid() <= high:
        assert access == IcmpAccess(IcmpMode.DATAGRAM)
    else:
        assert access == IcmpAccess(
            None,
            "icmp: no raw socket (needs root or CAP_NET_RAW) and unprivileged ICMP is off for "
            f"gid {os.getegid()} (net.ipv4.ping_group_range is '{group_range}'; allow it with "
            "sysctl -w net.ipv4.ping_group_range='0 2147483647')",
        )


def test_mode_is_decided_once_per_process() -> None:
    assert icmp_access() is icmp_access()
    assert icmp_access() == select_icmp_access(IcmpFacts.gather())


async def test_no_access_is_internal_with_the_reason() -> None:
    outcome = await probe_icmp(icmp_check("127.0.0.1"), access=IcmpAccess(None, NO_ACCESS))

    assert outcome.failure is FailureClass.INTERNAL
    assert outcome.message == NO_ACCESS


_IN_NAMESPACE = """
import asyncio, dataclasses, json, subprocess
from agent.probes.icmp import IcmpAccess, IcmpFacts, IcmpMode, probe_icmp, select_icmp_access
from vantage.checks import parse_check

async def main():
    check = parse_check({{"name": "p", "type": "icmp", "target": "{target}", {spec}}})
    {during}
    outcome = await probe_icmp(check, access=IcmpAccess(IcmpMode.{mode}))
    facts = dataclasses.replace(IcmpFacts.gather(), raw_socket=False)
    print(json.dumps({{
        "failure": outcome.failure, "message": outcome.message,
        "details": outcome.details.as_dict(),
        "total": outcome.phases.total, "without_raw": select_icmp_access(facts).mode.value
        if select_icmp_access(facts).mode else None,
    }}))

asyncio.run(main())
"""


def in_namespace(target: str, spec: str, mode: str, during: str = "", **kwargs: Any) -> Any:
    code = _IN_NAMESPACE.format(target=target, spec=spec, mode=mode, during=during)
    return run_in_netns(code, **kwargs)


def test_unprivileged_datagram_sockets_where_ping_group_range_allows() -> None:
    found = in_namespace(
        "127.0.0.1",
        '"count": 3, "packet_interval": "50ms"',
        "DATAGRAM",
        ping_group_range="0 2147483647",
    )

    assert found["failure"] is None, found["message"]
    assert found["details"]["received"] == 3
    assert found["details"]["rtt_max"] > 0
    assert found["without_raw"] == "datagram"


def test_no_route_is_network_unreachable() -> None:
    # A namespace with nothing but loopback has no route to anywhere else.
    found = in_namespace("192.0.2.1", '"count": 2, "packet_interval": "50ms"', "RAW")

    assert found["failure"] == "network_unreachable"
    assert found["message"] == "ping 192.0.2.1: network is unreachable, 2/2 lost"
    assert found["details"]["sent"] == 0
    assert found["total"] < 0.5  # refused at once, no waiting for the deadline


# The address appears on loopback after the first request has failed to leave.
_ADDRESS_APPEARS = (
    "asyncio.get_running_loop().call_later(0.1, subprocess.run, "
    '["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"])'
)


@pytest.mark.parametrize("mode", ["RAW", "DATAGRAM"])
def test_partial_loss_over_the_threshold_is_icmp_loss(mode: str) -> None:
    found = in_namespace(
        "192.0.2.1",
        '"count": 3, "packet_interval": "200ms"',
        mode,
        _ADDRESS_APPEARS,
        ping_group_range="0 2147483647",
    )

    assert found["failure"] == "icmp_loss"
    assert found["message"] == "ping 192.0.2.1: 1/3 lost (33%) > 0%"
    assert found["details"]["received"] == 2


def test_partial_loss_within_the_threshold_is_up() -> None:
    spec = '"count": 3, "packet_interval": "200ms", "max_loss_percent": 50'
    found = in_namespace("192.0.2.1", spec, "RAW", _ADDRESS_APPEARS)

    assert found["failure"] is None, found["message"]
    assert found["details"]["loss_percent"] == pytest.approx(100 / 3)


async def test_is_registered_and_refuses_other_checks() -> None:
    assert PROBES["icmp"] is probe_icmp
    tcp = parse_check({"name": "t", "type": "tcp", "target": "127.0.0.1:1"})
    with pytest.raises(TypeError):
        await probe_icmp(tcp)
