"""What the `vantage check` end-to-end modules share: running the command and reading its
one-line errors, a coordinator's files and its two agents, and a network namespace linked
to the host by a veth pair (for the command, or for processes that must see another
network or another resolver than the host's)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from running_system import TOKEN, VANTAGE, Coordinator, System, wait_until


def run_check(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, VANTAGE, "check", *args], capture_output=True, text=True, timeout=60
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def write_files(directory: Path, config: str) -> Path:
    (directory / "tokens.yaml").write_text(f"tokens:\n  - token: {TOKEN}\n")
    (directory / "agent.token").write_text(TOKEN + "\n")
    path = directory / "coordinator.yaml"
    path.write_text(config)
    return path


def start_agents(
    system: System,
    coordinator: Coordinator,
    prefix: tuple[str, ...] = (),
    *,
    eu_prefix: tuple[str, ...] | None = None,
) -> None:
    """An agent in eu and one in us (``prefix`` before their argv; ``eu_prefix`` before
    eu-1's when it differs), once both connect."""
    system.agent(coordinator, "eu-1", "eu", prefix=prefix if eu_prefix is None else eu_prefix)
    system.agent(coordinator, "us-1", "us", prefix=prefix)

    def connected() -> bool:
        done = coordinator.cli("agents", "--json")
        return sum(agent["connected"] for agent in json.loads(done.stdout)["agents"]) == 2

    wait_until(connected, 30, "both agents to connect")


@dataclass(frozen=True)
class ClientNamespace:
    """A network namespace linked to the host by a veth pair: ``host`` is the host's end,
    ``inside`` the namespace's (a /30, so each reaches the other), and nothing else is
    reachable from inside, not ``unreachable`` (a second address on the host's end,
    outside the link's /30)."""

    name: str
    host: str
    inside: str
    unreachable: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """What runs a command in the namespace (``ip netns exec`` also bind-mounts
        ``/etc/netns/<name>/resolv.conf``, when there is one, over /etc/resolv.conf)."""
        return ("ip", "netns", "exec", self.name)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_check(*args, prefix=self.prefix)


@contextlib.contextmanager
def client_namespace(what: str = "it's-just-you") -> Iterator[ClientNamespace]:
    """The namespace, named with a test-bed claim's prefix and addressed from its /20 of
    198.18.0.0/15 (so runs side by side never collide), removed whatever happens with
    whatever runs in it and its /etc/netns directory. Skips the test (``what`` needs...)
    without root or ip(8)."""
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root to make a network namespace")
    if shutil.which("ip") is None:
        pytest.skip(f"{what} needs ip(8) (iproute2) to make a network namespace")
    from testbed import hoststate, topology

    claim = hoststate.claim_slot()
    try:
        block = topology.block_of(claim.slot)
        host, inside, unreachable = (str(block[offset]) for offset in (1, 2, 5))
        namespace = f"{claim.prefix}-cli"
        outer, inner = f"{claim.prefix}h", f"{claim.prefix}n"
        for command in (
            ["ip", "netns", "add", namespace],
            ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", namespace],
            ["ip", "addr", "add", f"{host}/30", "dev", outer],
            ["ip", "addr", "add", f"{unreachable}/32", "dev", outer],
            ["ip", "link", "set", outer, "up"],
            ["ip", "-n", namespace, "addr", "add", f"{inside}/30", "dev", inner],
            ["ip", "-n", namespace, "link", "set", inner, "up"],
            ["ip", "-n", namespace, "link", "set", "lo", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=30)
        yield ClientNamespace(namespace, host, inside, unreachable)
    finally:
        hoststate.remove_all(claim.prefix)
        hoststate.release(claim)
        assert not hoststate.leftovers(claim.prefix, set(), [])


@dataclass
class VethCoordinator(Coordinator):
    """A coordinator listening on one end of the namespace's link."""

    host: str = "127.0.0.1"

    @classmethod
    def at(cls, started: Coordinator, host: str) -> VethCoordinator:
        # Beyond loopback a client asks for TLS unless told: these coordinators run `tls: off`.
        return cls(
            started.proc,
            started.grpc_port,
            started.http_port,
            started.config,
            client_flags=("--plaintext",),
            host=host,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"
