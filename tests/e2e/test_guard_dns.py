"""The on-demand guard against a real DNS server: names that resolve to private and cloud
metadata addresses are refused by the coordinator when its resolver says so, and by the
agents when theirs does (split horizon, DNS rebinding), before anything connects.

The resolver is a dnsmasq (the test bed's ``dnsmasq_argv``: no upstream, no /etc/hosts)
in a network namespace of its own, on the namespace's 127.0.0.1, and the namespace's
``/etc/netns/<ns>/resolv.conf`` names it: whatever runs there with ``ip netns exec`` (the
coordinator, or the agents) resolves ``*.vantage.test`` with it; the host cannot."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest
from check_now import (
    ClientNamespace,
    VethCoordinator,
    client_namespace,
    one_error_line,
    run_check,
    start_agents,
    write_files,
)
from running_system import System, wait_until

pytestmark = pytest.mark.e2e

INTRANET = ("intranet.vantage.test", "10.1.2.3", "private")
METADATA = ("metadata.vantage.test", "169.254.169.254", "cloud metadata")
# Its address (the host's end of the namespace's link, in 198.18.0.0/15) is private too,
# and reachable from the namespace: a connection to it would show.
LAN = "lan.vantage.test"
# The guard on, with the default allow-list: nothing private or metadata is let through.
CONFIG = """\
listen: {address}:0
http_listen: {address}:0
tokens_file: tokens.yaml
heartbeat_interval: 1s
# Beyond loopback, on the namespace's link: what is tested here is the guard, not exposure.
tls: off
query_auth: none
"""
# The coordinator on the host resolves names with the host's resolver, for at most the
# check's timeout: a short one keeps the tests fast wherever that resolver does not answer.
TIMEOUT = "2"


def refused(why: str) -> str:
    return f"vantage check: error: refused by the on-demand guard: {why}"


def resolves_to(name: str, address: str, reason: str) -> str:
    return f"{name} resolves to {address} ({reason}), which is not allowed for on-demand checks"


def check(target: str, coordinator: VethCoordinator) -> subprocess.CompletedProcess[str]:
    return run_check(target, *coordinator.connect, "--timeout", TIMEOUT)


@pytest.fixture
def namespace(system: System) -> Iterator[ClientNamespace]:
    """A namespace whose resolver answers INTRANET, METADATA and LAN (and nothing else
    under vantage.test); the system's processes are stopped before it goes."""
    from testbed import hoststate, services

    if shutil.which(services.dnsmasq_binary()) is None:
        pytest.skip("the DNS guard tests need dnsmasq (Debian package dnsmasq-base)")
    with client_namespace("the DNS guard tests") as namespace:
        try:
            directory = hoststate.NETNS_ETC / namespace.name
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "resolv.conf").write_text(
                "nameserver 127.0.0.1\noptions timeout:1 attempts:2\n"
            )
            records = [
                f"--host-record={name},{address}"
                for name, address in ((*INTRANET[:2],), (*METADATA[:2],), (LAN, namespace.host))
            ]
            argv = services.dnsmasq_argv("127.0.0.1", *records)
            system.spawn("dnsmasq", *namespace.prefix, *argv)

            def answering() -> str:
                done = subprocess.run(
                    [*namespace.prefix, "getent", "ahostsv4", INTRANET[0]],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                return done.stdout.split()[0] if done.stdout.split() else done.stderr

            assert wait_until(answering, 10, "the namespace's dnsmasq to answer") == INTRANET[1]
            yield namespace
        finally:
            system.stop_all()


def test_the_coordinator_refuses_a_name_its_resolver_maps_to_a_refused_address(
    system: System, namespace: ClientNamespace
) -> None:
    # The coordinator runs in the namespace (listening on its end of the link), without
    # agents: a refusal can only be its own.
    config = write_files(system.dir, CONFIG.format(address=namespace.inside))
    started = system.coordinator(config, prefix=namespace.prefix)
    coordinator = VethCoordinator.at(started, namespace.inside)
    for name, address, reason in (INTRANET, METADATA):
        line = one_error_line(check(f"http://{name}/", coordinator))
        assert line == refused(resolves_to(name, address, reason))


def test_an_agent_refuses_what_its_own_resolver_answers(
    system: System, namespace: ClientNamespace
) -> None:
    # The coordinator runs on the host, whose resolver knows none of these names: it lets
    # them through to the agents, which run in the namespace and resolve them there.
    config = write_files(system.dir, CONFIG.format(address=namespace.host))
    coordinator = VethCoordinator.at(system.coordinator(config), namespace.host)
    start_agents(system, coordinator, prefix=namespace.prefix)
    with socket.socket() as target:
        target.bind((namespace.host, 0))
        target.listen()
        target.setblocking(False)
        port = target.getsockname()[1]
        for name, address, reason, url in (
            (*INTRANET, f"http://{INTRANET[0]}/"),
            (*METADATA, f"http://{METADATA[0]}/"),
            (LAN, namespace.host, "private", f"http://{LAN}:{port}/"),
        ):
            line = one_error_line(check(url, coordinator))
            why = resolves_to(name, address, reason)
            assert line in {refused(f"agent {agent} refused: {why}") for agent in ("eu-1", "us-1")}
        # Neither agent connected to the one address that would have taken a connection.
        with pytest.raises(BlockingIOError):
            target.accept()
