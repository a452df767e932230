"""The on-demand guard: which addresses an on-demand check ("check now") may reach.

An on-demand check probes whatever a client asks, from every agent and from the
coordinator's own resolver: without a guard it would let anyone who can call the query
service reach the agents' and the coordinator's private networks and their clouds'
metadata services (server-side request forgery). So by default the guard refuses every
address that is not globally reachable, as the standard library's ``ipaddress`` knows
them (IANA's special-purpose registries), and a short list of cloud metadata addresses:

===========================  ===============================================================
reason                       addresses (``ipaddress`` property, first that applies)
===========================  ===============================================================
``cloud metadata``           ``METADATA_ADDRESSES`` (169.254.169.254, fd00:ec2::254,
                             100.100.100.200, 168.63.129.16...), the only hand-made list
``unspecified``              0.0.0.0, ::
``loopback``                 127.0.0.0/8, ::1
``link-local``               169.254.0.0/16, fe80::/10
``multicast``                224.0.0.0/4, ff00::/8
``reserved``                 240.0.0.0/4, 255.255.255.255, IPv6 reserved blocks
``private``                  RFC 1918, RFC 4193 (fc00::/7) and the other ranges
                             ``is_private`` lists: documentation, benchmarking (198.18/15)...
``not globally reachable``   the rest of what is not ``is_global``, e.g. the carrier-grade
                             NAT range 100.64.0.0/10
===========================  ===============================================================

An IPv4-mapped IPv6 address (``::ffff:10.0.0.5``) is judged as the IPv4 address it maps.

``allow`` (CIDRs) opens ranges: an address inside one is allowed whatever its reason,
except a metadata address, which only an entry naming exactly that address (a /32 or
/128) opens: allowing 169.254.0.0/16 for a link-local service must not open the metadata
service by accident.

The coordinator applies the guard to the target after resolving its name, and sends it
to every agent (``ProbeRequest.guard``), which applies it again after its own resolution
and on every redirect, to the very address it connects to (see
``agent.probes.network.screen``): an agent's resolver may answer differently (split
horizon, DNS rebinding).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "METADATA_ADDRESSES",
    "AddressGuard",
    "IpAddress",
    "IpNetwork",
    "Screen",
    "refusal_message",
]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata and platform services, reachable from inside a cloud VM and
# never a target anyone needs to check from outside. 168.63.129.16 (Azure's WireServer)
# is globally routable, so nothing else would refuse it.
METADATA_ADDRESSES: frozenset[IpAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure IMDS, OpenStack, DigitalOcean, Hetzner, OCI...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.0.23",  # Tencent Cloud
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (classic)
        "168.63.129.16",  # Azure WireServer
        "fd00:ec2::254",  # AWS IMDS over IPv6
    )
)

# Longest CIDR list a guard takes from the network (an agent reads it from the stream).
MAX_ALLOW = 256


def refusal_message(address: str, reason: str, host: str = "") -> str:
    """The one line that says an address is refused: "10.0.0.5 (private) is not allowed
    for on-demand checks", or with the name it came from, "db.example resolves to
    10.0.0.5 (private), which is not allowed for on-demand checks"."""
    if host and host != address:
        return f"{host} resolves to {address} ({reason}), which is not allowed for on-demand checks"
    return f"{address} ({reason}) is not allowed for on-demand checks"


@dataclass(frozen=True, slots=True)
class AddressGuard:
    """The guard's settings: ``allow`` opens the networks it lists (see the module
    docstring). Build with ``AddressGuard.of(cidrs)``, which validates them."""

    allow: tuple[IpNetwork, ...] = ()

    @classmethod
    def of(cls, cidrs: Iterable[str], *, strict: bool = True) -> AddressGuard:
        """Parse CIDRs ("10.0.0.0/8", "2001:db8::/32", or a bare address); ValueError
        (one line, naming the entry) for one that is not. ``strict``: an entry with host
        bits set ("10.0.0.1/8") is an error rather than its network."""
        networks: list[IpNetwork] = []
        for index, text in enumerate(cidrs):
            if index >= MAX_ALLOW:
                raise ValueError(f"more than {MAX_ALLOW} allow entries")
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=strict))
            except ValueError as exc:
                raise ValueError(f"allow entry {text[:64]!r} is not a CIDR: {exc}") from None
        return cls(tuple(networks))

    @property
    def cidrs(self) -> list[str]:
        return [str(network) for network in self.allow]

    def reason(self, address: str | IpAddress) -> str | None:
        """Why ``address`` is refused, or None when it is allowed. ValueError when it is
        not an IP address."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in METADATA_ADDRESSES:
            if any(
                network.prefixlen == network.max_prefixlen and ip in network
                for network in self.allow
            ):
                return None
            return "cloud metadata"
        why = _refused_because(ip)
        if why is None or any(ip in network for network in self.allow):
            return None
        return why

    def refusal(self, address: str | IpAddress) -> str | None:
        """``refusal_message`` for a refused address, None for an allowed one."""
        why = self.reason(address)
        return None if why is None else refusal_message(str(address), why)


def _refused_because(ip: IpAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally reachable"
    return None


class Screen:
    """The guard of one on-demand probe run: ``allowed`` screens the addresses the probe
    is about to connect to and remembers the first refusal (``refused``, the line that
    ends up in ``ProbeResponse.refused``)."""

    __slots__ = ("guard", "refused")

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard
        self.refused = ""

    def allowed(self, address: str, host: str = "") -> bool:
        """Whether the probe may connect to ``address`` (an IP address), which ``host``
        (a name, or the address itself) resolved to."""
        try:
            why = self.guard.reason(address)
        except ValueError:
            why = "not an IP address"
        if why is None:
            return True
        if not self.refused:
            self.refused = refusal_message(address, why, host)
        return False
