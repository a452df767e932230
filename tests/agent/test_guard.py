"""The on-demand guard: its ranges (vantage.guard), and the agent applying it to real
probes -- after its own DNS resolution and on every redirect -- through on-demand runs
(agent.ondemand) against real loopback servers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from agent.ondemand import OnDemandProbes
from agent.probes import PROBES
from agent.probes.http import probe_http
from vantage.checks import parse_check
from vantage.guard import AddressGuard
from vantage.wire import check_to_pb
from vantage_proto.v1 import agent_pb2, common_pb2

OPEN = AddressGuard()
Serve = Callable[..., Awaitable[int]]  # the `serve` fixture (conftest.py)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.3.4.5", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.8.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),  # RFC 4193 unique local
        ("fc00::1", "private"),
        ("169.254.10.1", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "not globally reachable"),  # carrier-grade NAT, RFC 6598
        ("100.127.255.254", "not globally reachable"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "private"),  # documentation
        ("2001:db8::1", "private"),
        ("198.18.0.1", "private"),  # benchmarking
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("168.63.129.16", "cloud metadata"),  # globally routable, refused all the same
        ("::ffff:10.0.0.5", "private"),  # IPv4-mapped: judged as the IPv4 address
        ("::ffff:127.0.0.1", "loopback"),
    ],
)
def test_the_guard_refuses_what_is_not_globally_reachable(address: str, reason: str) -> None:
    assert OPEN.reason(address) == reason
    assert OPEN.refusal(address) == f"{address} ({reason}) is not allowed for on-demand checks"


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"]
)
def test_the_guard_allows_global_addresses(address: str) -> None:
    assert OPEN.reason(address) is None


def test_allow_opens_ranges_but_metadata_only_when_named_exactly() -> None:
    guard = AddressGuard.of(["10.0.0.0/8", "127.0.0.2/32", "169.254.0.0/16", "fd00::/8"])
    assert guard.reason("10.20.30.40") is None
    assert guard.reason("127.0.0.2") is None
    assert guard.reason("127.0.0.1") == "loopback"
    assert guard.reason("169.254.1.1") is None
    # A range that covers a metadata address does not open it...
    assert guard.reason("169.254.169.254") == "cloud metadata"
    assert guard.reason("fd00:ec2::254") == "cloud metadata"
    # ...an entry naming it does.
    assert AddressGuard.of(["169.254.169.254/32"]).reason("169.254.169.254") is None
    assert AddressGuard.of(["169.254.169.254"]).reason("169.254.169.254") is None


@pytest.mark.parametrize(
    ("cidrs", "message"),
    [
        (["10.0.0.1/8"], "allow entry '10.0.0.1/8' is not a CIDR: 10.0.0.1/8 has host bits set"),
        (["ten/8"], "allow entry 'ten/8' is not a CIDR"),
        (["10.0.0.0/33"], "allow entry '10.0.0.0/33' is not a CIDR"),
    ],
)
def test_allow_entries_are_validated(cidrs: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        AddressGuard.of(cidrs)


# -- the agent applies it --------------------------------------------------------------


def request(spec: dict[str, Any], *allow: str, guard: bool = True) -> agent_pb2.ProbeRequest:
    check = parse_check({"name": "checknow-test", "interval": 10, "timeout": 2, **spec})
    message = agent_pb2.ProbeRequest(request_id="r1", check=check_to_pb(check))
    if guard:
        message.guard.enabled = True
        message.guard.allow.extend(allow)
    return message


async def hello_server(serve: Serve, host: str) -> int:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()

    return await serve(handler, host=host)


async def redirect_server(serve: Serve, host: str, location: str) -> int:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()

    return await serve(handler, host=host)


async def test_an_allowed_address_is_probed(serve: Serve) -> None:
    port = await hello_server(serve, "127.0.0.2")
    spec = {"type": "http", "target": f"http://127.0.0.2:{port}/"}
    response = await OnDemandProbes().run(request(spec, "127.0.0.2/32"))
    assert response.refused == ""
    assert response.request_id == "r1"
    assert response.result.success
    assert response.result.check == "checknow-test"
    assert response.result.http.status_code == 200


async def test_a_refused_address_is_not_connected_to(serve: Serve) -> None:
    connections = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1

    port = await serve(counting)
    spec = {"type": "http", "target": f"http://127.0.0.1:{port}/"}
    response = await OnDemandProbes().run(request(spec))
    assert response.refused == "127.0.0.1 (loopback) is not allowed for on-demand checks"
    assert not response.result.success
    assert response.result.failure == common_pb2.FAILURE_CLASS_INTERNAL
    assert response.result.message == f"guard: {response.refused}"
    assert connections == 0


async def test_the_agent_screens_what_its_own_resolver_answers(serve: Serve) -> None:
    # The coordinator may resolve a name differently (or not at all): the agent judges
    # the addresses its own resolver gives, which for localhost are loopback.
    port = await hello_server(serve, "127.0.0.1")
    for spec in (
        {"type": "http", "target": f"http://localhost:{port}/"},
        {"type": "tcp", "target": f"localhost:{port}"},
        {"type": "icmp", "target": "localhost"},
    ):
        response = await OnDemandProbes().run(request(spec))
        assert response.refused.startswith("localhost resolves to "), spec
        assert "(loopback), which is not allowed for on-demand checks" in response.refused


async def test_a_redirect_to_a_refused_address_is_refused(serve: Serve) -> None:
    # Exactly the first hop is allowed; the hop it redirects to is checked again.
    inner = await hello_server(serve, "127.0.0.1")
    outer = await redirect_server(serve, "127.0.0.2", f"http://127.0.0.1:{inner}/secret")
    spec = {"type": "http", "target": f"http://127.0.0.2:{outer}/"}
    response = await OnDemandProbes().run(request(spec, "127.0.0.2/32"))
    assert response.refused == "127.0.0.1 (loopback) is not allowed for on-demand checks"
    assert response.result.http.redirects == 1
    # Without the guard the same redirect is followed to the end.
    unguarded = await OnDemandProbes().run(request(spec, guard=False))
    assert unguarded.refused == ""
    assert unguarded.result.success
    assert unguarded.result.http.final_url == f"http://127.0.0.1:{inner}/secret"


async def test_a_dns_check_is_screened_by_the_server_it_asks() -> None:
    spec = {"type": "dns", "target": "example.org", "server": "10.9.8.7"}
    response = await OnDemandProbes().run(request(spec))
    assert response.refused == "10.9.8.7 (private) is not allowed for on-demand checks"


async def test_the_guard_of_an_on_demand_run_stays_in_it(serve: Serve) -> None:
    # A scheduled probe running at the same time as a guarded on-demand one, in another
    # task, is not screened.
    port = await hello_server(serve, "127.0.0.1")
    target = f"http://127.0.0.1:{port}/"
    guarded = asyncio.create_task(OnDemandProbes().run(request({"type": "http", "target": target})))
    plain = asyncio.create_task(
        probe_http(parse_check({"name": "web", "type": "http", "target": target}))
    )
    response, outcome = await asyncio.gather(guarded, plain)
    assert response.refused
    assert outcome.success


async def test_a_request_the_agent_cannot_run_is_answered_at_once() -> None:
    invalid = agent_pb2.ProbeRequest(request_id="r2")
    invalid.check.name = "checknow-bad"
    invalid.check.target = "http://example.org/"
    response = await OnDemandProbes().run(invalid)
    assert response.request_id == "r2"
    assert response.result.failure == common_pb2.FAILURE_CLASS_INTERNAL
    assert response.result.message.startswith("invalid on-demand check: ")

    only_tcp = OnDemandProbes({"tcp": PROBES["tcp"]})
    response = await only_tcp.run(request({"type": "icmp", "target": "192.0.2.1"}))
    assert response.result.message == "this agent cannot run icmp probes"

    bad_guard = request({"type": "icmp", "target": "192.0.2.1"}, "not-a-cidr")
    response = await OnDemandProbes().run(bad_guard)
    assert response.result.message.startswith("invalid on-demand guard: allow entry 'not-a-cidr'")
