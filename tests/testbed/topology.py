"""The simulated internet of one scenario run: names and addresses, decided up front.

A run owns a prefix (``vt07k3``: ``vt``, its slot, a tag) and the slot's /20 of
198.18.0.0/15, so runs side by side never share a name or an address. Every namespace,
veth and nftables table carries the prefix (veth names stay within 15 characters).

::

    agents (one namespace each) --- region router (bridge; dnsmasq; faults) ---.
                                                                                core
    targets (one namespace each) -----------------------------------------------'  |
    coordinator ----------------------------------------------------------------'
        '--- management link to the host (the runner's query client only)

Inside the block (offsets of the third octet): .0.x core<->router /30s, .1.x
core<->target /30s, .2.0/30 core<->coordinator, .2.4/30 host<->coordinator, and .8+i.0/24
the LAN of region i (router .1, which is also the region's resolver; agents from .10).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .scenario import Scenario, Selector

SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")
BLOCK_PREFIX = 20
SLOTS = 2 ** (BLOCK_PREFIX - SUPERNET.prefixlen)  # 32 runs side by side at most
GRPC_PORT = 7400
HTTP_PORT = 9470


def block_of(slot: int) -> ipaddress.IPv4Network:
    return list(SUPERNET.subnets(new_prefix=BLOCK_PREFIX))[slot]


@dataclass(frozen=True, slots=True)
class Veth:
    """One veth pair: ``a`` in namespace ``ns_a`` (None: the host), ``b`` in ``ns_b``."""

    a: str
    ns_a: str | None
    b: str
    ns_b: str


@dataclass(frozen=True, slots=True)
class Router:
    region: str
    index: int
    ns: str
    uplink: ipaddress.IPv4Interface  # on the core link
    core_side: ipaddress.IPv4Interface
    lan: ipaddress.IPv4Interface  # router .1 of the region LAN: gateway and resolver
    bridge: str
    link: Veth  # core end a, router end b


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    region: str
    index: int
    ns: str
    address: ipaddress.IPv4Interface
    link: Veth  # router end a (on the bridge), agent end b


@dataclass(frozen=True, slots=True)
class Host:
    """A target or the coordinator: one namespace behind core."""

    name: str
    ns: str
    address: ipaddress.IPv4Interface
    core_side: ipaddress.IPv4Interface
    link: Veth  # core end a, host end b


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    block: ipaddress.IPv4Network
    core_ns: str
    routers: dict[str, Router]
    agents: dict[str, Agent]
    targets: dict[str, Host]
    coordinator: Host
    management: Veth  # host end a, coordinator end b
    host_address: ipaddress.IPv4Interface
    coordinator_management: ipaddress.IPv4Interface

    @property
    def namespaces(self) -> list[str]:
        return [
            self.core_ns,
            *(router.ns for router in self.routers.values()),
            *(agent.ns for agent in self.agents.values()),
            *(target.ns for target in self.targets.values()),
            self.coordinator.ns,
        ]

    @property
    def veths(self) -> list[Veth]:
        return [
            *(router.link for router in self.routers.values()),
            *(agent.link for agent in self.agents.values()),
            *(target.link for target in self.targets.values()),
            self.coordinator.link,
            self.management,
        ]

    @property
    def nft_table(self) -> str:
        return f"{self.prefix}faults"

    @property
    def coordinator_address(self) -> str:
        """Where agents dial the coordinator (through their router and core)."""
        return f"{self.coordinator.address.ip}:{GRPC_PORT}"

    @property
    def query_address(self) -> str:
        """Where the runner reaches the coordinator's gRPC port (management link)."""
        return f"{self.coordinator_management.ip}:{GRPC_PORT}"

    @property
    def coordinator_hosts(self) -> tuple[str, ...]:
        """The addresses the coordinator's certificate names: agents' and the runner's."""
        return (str(self.coordinator.address.ip), str(self.coordinator_management.ip))

    @property
    def metrics_url(self) -> str:
        return f"https://{self.coordinator_management.ip}:{HTTP_PORT}/metrics"

    def addresses(self, selector: Selector) -> list[str]:
        """The addresses (or networks) a fault selector stands for."""
        if selector.kind == "region":
            router = self.routers[selector.name]
            return [str(router.lan.network), str(router.uplink.ip)]
        if selector.kind == "agent":
            return [str(self.agents[selector.name].address.ip)]
        if selector.kind == "target":
            return [str(self.targets[selector.name].address.ip)]
        if selector.kind == "coordinator":
            return [str(self.coordinator.address.ip)]
        return [str(self.block)]


def plan(scenario: Scenario, prefix: str, slot: int) -> Topology:
    """Names and addresses for ``scenario`` in ``slot``'s block, all carrying ``prefix``."""
    block = block_of(slot)
    base = block.network_address

    def interface(offset: int, prefixlen: int) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{base + offset}/{prefixlen}")

    core = f"{prefix}-core"
    routers: dict[str, Router] = {}
    for index, region in enumerate(scenario.regions):
        ns = f"{prefix}-r-{region}"
        routers[region] = Router(
            region=region,
            index=index,
            ns=ns,
            uplink=interface(4 * index + 2, 30),
            core_side=interface(4 * index + 1, 30),
            lan=interface((8 + index) * 256 + 1, 24),
            bridge=f"{prefix}br",
            link=Veth(f"{prefix}c-r{index}", core, f"{prefix}r{index}-c", ns),
        )
    agents: dict[str, Agent] = {}
    for number, (name, region) in enumerate(scenario.agents):
        router = routers[region]
        position = sum(1 for agent in agents.values() if agent.region == region)
        ns = f"{prefix}-a-{name}"
        agents[name] = Agent(
            name=name,
            region=region,
            index=number,
            ns=ns,
            address=interface((8 + router.index) * 256 + 10 + position, 24),
            link=Veth(f"{prefix}r-a{number}", router.ns, f"{prefix}a{number}", ns),
        )
    targets: dict[str, Host] = {}
    for index, name in enumerate(scenario.targets):
        ns = f"{prefix}-t-{name}"
        targets[name] = Host(
            name=name,
            ns=ns,
            address=interface(256 + 4 * index + 2, 30),
            core_side=interface(256 + 4 * index + 1, 30),
            link=Veth(f"{prefix}c-t{index}", core, f"{prefix}t{index}-c", ns),
        )
    coordinator_ns = f"{prefix}-coord"
    coordinator = Host(
        name="coordinator",
        ns=coordinator_ns,
        address=interface(2 * 256 + 2, 30),
        core_side=interface(2 * 256 + 1, 30),
        link=Veth(f"{prefix}c-k", core, f"{prefix}k-c", coordinator_ns),
    )
    topology = Topology(
        prefix=prefix,
        block=block,
        core_ns=core,
        routers=routers,
        agents=agents,
        targets=targets,
        coordinator=coordinator,
        management=Veth(f"{prefix}h", None, f"{prefix}k-h", coordinator_ns),
        host_address=interface(2 * 256 + 5, 30),
        coordinator_management=interface(2 * 256 + 6, 30),
    )
    too_long = [name for veth in topology.veths for name in (veth.a, veth.b) if len(name) > 15]
    if too_long:  # IFNAMSIZ - 1
        raise ValueError(f"interface names longer than 15 characters: {too_long}")
    return topology
