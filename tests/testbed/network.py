"""Building a ``Topology`` out of namespaces, veth pairs, a bridge per region and routes,
and injecting network faults as nftables rules in the region routers.

Faults live in one table per router (``inet <prefix>faults``) with a ``forward``,
``input`` and ``output`` chain, so they reach the agents' traffic through the router and
the router's own (its resolver forwarding to a ``dns`` target). Every change replaces the
whole table in one nft transaction: no moment with half a fault set.

- ``drop``: packets from ``from`` to ``to`` are dropped (one way, as written: the
  requests vanish, so the probes time out).
- ``reject``: TCP from ``from`` to ``to`` is answered with a reset, anything else with
  ICMP host-unreachable.
- ``loss``: ``numgen random mod 100 < N`` drops that share of packets, both ways.
"""

from __future__ import annotations

from collections.abc import Iterable

from .commands import run
from .hoststate import NETNS_ETC
from .scenario import NetworkFault
from .topology import Topology


async def _batch(ns: str | None, lines: Iterable[str]) -> None:
    argv = ["ip", "-batch", "-"] if ns is None else ["ip", "-n", ns, "-batch", "-"]
    await run(*argv, input="\n".join(lines) + "\n")


async def build(topology: Topology) -> None:
    """Create every namespace and link of ``topology`` and the agents' resolv.conf."""
    for ns in topology.namespaces:
        await run("ip", "netns", "add", ns)
    # Veth pairs are created with each end already in its namespace, so only the host end
    # of the management link ever has a name in the host's namespace.
    await _batch(
        None,
        [
            f"link add {veth.a} netns {veth.ns_a} type veth peer name {veth.b} netns {veth.ns_b}"
            if veth.ns_a is not None
            else f"link add {veth.a} type veth peer name {veth.b} netns {veth.ns_b}"
            for veth in topology.veths
        ]
        + [
            f"addr add {topology.host_address} dev {topology.management.a}",
            f"link set {topology.management.a} up",
        ],
    )
    core = ["link set lo up"]
    for router in topology.routers.values():
        core += [
            f"addr add {router.core_side} dev {router.link.a}",
            f"link set {router.link.a} up",
            f"route add {router.lan.network} via {router.uplink.ip}",
        ]
    for host in [*topology.targets.values(), topology.coordinator]:
        core += [f"addr add {host.core_side} dev {host.link.a}", f"link set {host.link.a} up"]
    await _batch(topology.core_ns, core)
    for router in topology.routers.values():
        lines = [
            "link set lo up",
            f"addr add {router.uplink} dev {router.link.b}",
            f"link set {router.link.b} up",
            f"route add default via {router.core_side.ip}",
            f"link add {router.bridge} type bridge",
            f"addr add {router.lan} dev {router.bridge}",
            f"link set {router.bridge} up",
        ]
        for agent in topology.agents.values():
            if agent.region == router.region:
                lines += [
                    f"link set {agent.link.a} master {router.bridge}",
                    f"link set {agent.link.a} up",
                ]
        await _batch(router.ns, lines)
    for agent in topology.agents.values():
        gateway = topology.routers[agent.region].lan.ip
        await _batch(
            agent.ns,
            [
                "link set lo up",
                f"addr add {agent.address} dev {agent.link.b}",
                f"link set {agent.link.b} up",
                f"route add default via {gateway}",
            ],
        )
        # `ip netns exec` bind-mounts this over /etc/resolv.conf: the region's resolver.
        directory = NETNS_ETC / agent.ns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(
            f"nameserver {gateway}\noptions timeout:1 attempts:2\n"
        )
    for host in [*topology.targets.values(), topology.coordinator]:
        lines = [
            "link set lo up",
            f"addr add {host.address} dev {host.link.b}",
            f"link set {host.link.b} up",
            f"route add default via {host.core_side.ip}",
        ]
        if host is topology.coordinator:
            lines += [
                f"addr add {topology.coordinator_management} dev {topology.management.b}",
                f"link set {topology.management.b} up",
            ]
        await _batch(host.ns, lines)
    for ns in [topology.core_ns, *(router.ns for router in topology.routers.values())]:
        await run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def fault_rules(topology: Topology, faults: Iterable[NetworkFault]) -> list[str]:
    """nftables rules (one chain's worth) for ``faults``, in order."""

    def match(source: list[str], dest: list[str]) -> str:
        return f"ip saddr {{ {', '.join(source)} }} ip daddr {{ {', '.join(dest)} }}"

    rules: list[str] = []
    for fault in faults:
        source = topology.addresses(fault.source)
        dest = topology.addresses(fault.dest)
        if fault.action == "drop":
            rules.append(f"{match(source, dest)} drop")
        elif fault.action == "reject":
            rules.append(f"{match(source, dest)} meta l4proto tcp reject with tcp reset")
            rules.append(f"{match(source, dest)} reject with icmpx type host-unreachable")
        else:
            chance = f"numgen random mod 100 < {fault.percent} drop"
            rules.append(f"{match(source, dest)} {chance}")
            rules.append(f"{match(dest, source)} {chance}")
    return rules


def fault_table(topology: Topology, faults: Iterable[NetworkFault]) -> str:
    """An nft script replacing the router's fault table in one transaction (deleting it
    when there is no fault)."""
    table = f"inet {topology.nft_table}"
    rules = fault_rules(topology, faults)
    script = [f"table {table}", f"delete table {table}"]
    if rules:
        script.append(f"table {table} {{")
        for chain in ("forward", "input", "output"):
            script.append(f"  chain {chain} {{")
            script.append(f"    type filter hook {chain} priority 0; policy accept;")
            script += [f"    {rule}" for rule in rules]
            script.append("  }")
        script.append("}")
    return "\n".join(script) + "\n"


async def apply_faults(topology: Topology, faults: Iterable[NetworkFault]) -> None:
    script = fault_table(topology, list(faults))
    for router in topology.routers.values():
        await run("ip", "netns", "exec", router.ns, "nft", "-f", "-", input=script)
