"""What every network probe does before speaking its protocol: resolve a name, connect over
TCP, and say in the closed set of failure classes what went wrong.

Probes use these pieces inside their own deadline:

- ``PhaseClock`` tracks which phase is running and what step it is on, so that when the
  deadline expires the probe can still say *where* (``dns_timeout`` while resolving,
  ``connect_timeout`` while connecting, ``timeout`` afterwards) and report phases that sum
  to the time spent.
- ``start_clock`` starts that clock for a host, ``enter_host`` moves a running one on to
  the next host (an HTTP redirect), so phases keep summing over every hop.
- ``resolve`` and ``connect`` raise ``ProbeFailure`` (a failure class plus a one-line
  message naming the step) for anything the closed set describes; the probe turns it into
  a ``ProbeOutcome``. Only programming errors escape as other exceptions.
- ``per_check`` caches what a probe derives from a check (request bytes, compiled
  patterns) for as long as that check object lives, keeping the hot path free of work
  that only changes with the check's revision.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import select
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypeVar, cast

from vantage.checks import IpVersion
from vantage.durations import format_duration
from vantage.results import PHASES, FailureClass, Phases

Phase = Literal["resolve", "connect", "tls", "processing", "transfer"]
_ProtocolT = TypeVar("_ProtocolT", bound=asyncio.BaseProtocol)
_CheckT = TypeVar("_CheckT")
_DerivedT = TypeVar("_DerivedT")

# Classes for a deadline that expires while a phase is running. Only resolving and
# connecting have classes of their own; afterwards the peer is reachable but too slow.
_TIMEOUT_CLASS: dict[Phase, FailureClass] = {
    "resolve": FailureClass.DNS_TIMEOUT,
    "connect": FailureClass.CONNECT_TIMEOUT,
    "tls": FailureClass.TIMEOUT,
    "processing": FailureClass.TIMEOUT,
    "transfer": FailureClass.TIMEOUT,
}

_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})

# getaddrinfo cannot tell "the name does not exist" from "it has no address of the
# family asked for" (EAI_NODATA, Linux only): both mean the name gives nothing to
# connect to, which is what dns_nxdomain reports.
_NXDOMAIN = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)
# EAI_AGAIN is glibc's answer both for a SERVFAIL from the recursive resolver and for a
# resolver that did not answer within resolv.conf's own time-out: either way the DNS
# infrastructure, not the name, failed, which is what dns_servfail reports. (A
# resolution cut short by the *check's* deadline is dns_timeout.) EAI_FAIL covers the
# other non-recoverable server answers (REFUSED, FORMERR).
_SERVFAIL = frozenset({socket.EAI_AGAIN, socket.EAI_FAIL})


class ProbeFailure(Exception):
    """A probe step failed in a way one failure class describes; ``str()`` is the message."""

    def __init__(self, failure: FailureClass, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


class PhaseClock:
    """Consecutive probe phases on the monotonic clock.

    Entering a phase ends the running one, so ``phases()`` always sums to the time since
    the clock started. ``step`` names what the running phase is doing ("connect
    192.0.2.1:443") for messages.
    """

    # One float per phase rather than a dict: a clock is built and read on every probe.
    __slots__ = ("_mark", "_spent", "phase", "step")

    def __init__(self, phase: Phase, step: str) -> None:
        self._mark = time.monotonic()
        self._spent = [0.0, 0.0, 0.0, 0.0, 0.0]  # in the order of vantage.results.PHASES
        self.phase: Phase = phase
        self.step = step

    def enter(self, phase: Phase, step: str) -> None:
        """End the running phase now and start ``phase``, doing ``step``."""
        now = time.monotonic()
        self._spent[_PHASE_INDEX[self.phase]] += now - self._mark
        self._mark = now
        self.phase = phase
        self.step = step

    def phases(self) -> Phases:
        """Time per phase so far, the running phase counted up to now."""
        spent = self._spent.copy()
        spent[_PHASE_INDEX[self.phase]] += time.monotonic() - self._mark
        return Phases(*spent)

    def timed_out(self, timeout: float) -> ProbeFailure:
        """The failure for a deadline that expired in the running phase."""
        return ProbeFailure(
            _TIMEOUT_CLASS[self.phase], f"{self.step}: timed out after {format_duration(timeout)}"
        )


_PHASE_INDEX: dict[Phase, int] = {phase: index for index, phase in enumerate(_TIMEOUT_CLASS)}
assert tuple(_PHASE_INDEX) == PHASES, "phases out of order"


@functools.lru_cache(maxsize=4096)
def ip_literal(host: str) -> tuple[socket.AddressFamily, str] | None:
    """(family, address) when ``host`` is an IP address, else None (cached: probes ask
    this about the same few hosts again and again)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return family, str(address)


async def resolve(host: str, port: int) -> list[tuple[socket.AddressFamily, str]]:
    """The addresses of ``host`` in the resolver's order, without duplicates.

    Uses the system resolver (getaddrinfo, which asyncio runs in its executor: the
    standard library offers no other way to honour nsswitch and resolv.conf).
    ProbeFailure with a dns_* class when the name does not resolve.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except socket.gaierror as exc:
        if exc.errno in _NXDOMAIN:
            failure = FailureClass.DNS_NXDOMAIN
        elif exc.errno in _SERVFAIL:
            failure = FailureClass.DNS_SERVFAIL
        else:
            failure = FailureClass.INTERNAL
        raise ProbeFailure(failure, f"resolve {host}: {describe_os_error(exc)}") from None
    addresses: list[tuple[socket.AddressFamily, str]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        entry = (family, str(sockaddr[0]))
        if entry not in addresses:
            addresses.append(entry)
    if not addresses:
        raise ProbeFailure(FailureClass.DNS_NXDOMAIN, f"resolve {host}: no addresses")
    return addresses


def start_clock(host: str) -> PhaseClock:
    """A probe's clock: it starts in ``resolve``, or in ``connect`` for an IP literal."""
    if ip_literal(host):
        return PhaseClock("connect", f"connect {host}")
    return PhaseClock("resolve", f"resolve {host}")


def enter_host(clock: PhaseClock, host: str) -> None:
    """Move a running clock on to ``host`` (another hop of the same probe): ``resolve``,
    or ``connect`` for an IP literal, as ``start_clock`` begins."""
    if ip_literal(host):
        clock.enter("connect", f"connect {host}")
    else:
        clock.enter("resolve", f"resolve {host}")


async def addresses_for(
    clock: PhaseClock, host: str, port: int, ip_version: IpVersion = "any"
) -> list[tuple[socket.AddressFamily, str]]:
    """The addresses to connect to, in order, leaving ``clock`` in the ``connect`` phase.

    An IP literal is its own answer; a name is resolved (``resolve``: ProbeFailure). The
    check's ``ip_version`` filters and orders them; a name left with no address of the
    wanted family fails as dns_nxdomain ("no IPv6 address"), like a name without records.
    """
    literal = ip_literal(host)
    if literal:
        addresses = [literal]
    else:
        addresses = await resolve(host, port)
        clock.enter("connect", f"connect {format_peer(host, port)}")
    ordered = by_ip_version(addresses, ip_version)
    if not ordered:
        family = "IPv4" if ip_version == "ipv4" else "IPv6"
        if literal:
            raise ProbeFailure(
                FailureClass.INTERNAL, f"{host} is not an {family} address (ip_version)"
            )
        raise ProbeFailure(FailureClass.DNS_NXDOMAIN, f"resolve {host}: no {family} address")
    return ordered


def by_ip_version(
    addresses: list[tuple[socket.AddressFamily, str]], ip_version: IpVersion
) -> list[tuple[socket.AddressFamily, str]]:
    """Filter and order (family, address) pairs as a check's ``ip_version`` asks."""
    if ip_version == "any":
        return addresses
    v4 = [entry for entry in addresses if entry[0] == socket.AF_INET]
    v6 = [entry for entry in addresses if entry[0] == socket.AF_INET6]
    return {"ipv4": v4, "ipv6": v6, "prefer_ipv4": v4 + v6, "prefer_ipv6": v6 + v4}[ip_version]


async def connect(
    clock: PhaseClock,
    addresses: list[tuple[socket.AddressFamily, str]],
    port: int,
    protocol_factory: Callable[[], _ProtocolT],
) -> tuple[asyncio.Transport, _ProtocolT, str]:
    """Open a TCP connection to the first address that accepts one.

    Returns (transport, protocol, peer "ip:port"); the caller owns and must close the
    transport. Addresses are tried in order, each refusal or unreachable route moving on to
    the next, all within the caller's deadline (``clock.step`` names the address being
    tried). ProbeFailure for the last address's error when none accepts.
    """
    loop = asyncio.get_running_loop()
    failure: ProbeFailure | None = None
    for family, address in addresses:
        peer = format_peer(address, port)
        clock.step = f"connect {peer}"
        try:
            transport, protocol = await loop.create_connection(
                protocol_factory, address, port, family=family
            )
        except OSError as exc:
            failure = ProbeFailure(
                classify_connect_error(exc), f"{clock.step}: {describe_os_error(exc)}"
            )
            continue
        return transport, protocol, peer
    assert failure is not None, "connect() needs at least one address"
    raise failure


def classify_connect_error(exc: OSError) -> FailureClass:
    """The failure class of an error from connecting a TCP socket."""
    if isinstance(exc, ConnectionRefusedError):
        return FailureClass.CONNECT_REFUSED
    if exc.errno in _UNREACHABLE:
        return FailureClass.NETWORK_UNREACHABLE
    if isinstance(exc, TimeoutError):
        # The kernel gave up retransmitting the SYN before the check's deadline.
        return FailureClass.CONNECT_TIMEOUT
    return FailureClass.INTERNAL


def describe_os_error(exc: OSError) -> str:
    """'connection refused', 'name or service not known': the OS's words, lower case."""
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        # asyncio rewrites strerror ("Connect call failed ('192.0.2.1', 80)"), not errno.
        text = os.strerror(exc.errno)
    else:
        text = exc.strerror or str(exc) or _WITHOUT_ERRNO.get(type(exc), type(exc).__name__)
    return text[:1].lower() + text[1:]


# Event loops raise some errors without errno or text (a reset seen by the TLS layer).
_WITHOUT_ERRNO: dict[type[OSError], str] = {
    ConnectionResetError: os.strerror(errno.ECONNRESET),
    ConnectionAbortedError: os.strerror(errno.ECONNABORTED),
    BrokenPipeError: os.strerror(errno.EPIPE),
}


def format_peer(address: str, port: int) -> str:
    """'192.0.2.1:443' or '[2001:db8::1]:443'."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def per_check(derive: Callable[[_CheckT], _DerivedT]) -> Callable[[_CheckT], _DerivedT]:
    """Cache ``derive(check)`` for as long as that check object lives.

    Checks are frozen but not hashable (their labels and headers are dicts), so
    ``functools`` caches cannot key on them. The scheduler keeps one object per check
    revision and a new revision is a new object, so identity is the right key: a hit
    costs a dict lookup, and an entry goes when its check is garbage.
    """
    cache: dict[int, tuple[weakref.ref[Any], _DerivedT]] = {}

    def cached(check: _CheckT) -> _DerivedT:
        key = id(check)
        entry = cache.get(key)
        if entry is not None and entry[0]() is check:
            return entry[1]
        value = derive(check)

        def forget(ref: weakref.ref[Any]) -> None:
            current = cache.get(key)
            if current is not None and current[0] is ref:
                del cache[key]

        cache[key] = (weakref.ref(check, forget), value)
        return value

    return functools.update_wrapper(cached, derive)


class Watcher(Protocol):
    """Readiness callbacks for file descriptors, as an event loop offers them."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...
    def remove_writer(self, fd: int) -> None: ...


class _EpollWatcher:
    """Socket readiness for probes through one epoll set of their own, which the event
    loop watches as a single descriptor.

    uvloop's ``add_reader`` and ``remove_reader`` each look the descriptor up in a
    ``WeakValueDictionary`` of transports (a KeyError raised and caught in Python) and
    set up a libuv poll handle: with a fresh socket per probe that was a tenth of the
    agent's CPU at 10,000 probes/s. Registering in this epoll set is one system call.
    Level-triggered, so a callback that leaves data unread is called again.
    """

    __slots__ = ("__weakref__", "_epoll", "_readers", "_writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._add(self._readers, fd, callback)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd, True)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._add(self._writers, fd, callback)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd, True)

    def _add(
        self, table: dict[int, Callable[[], None]], fd: int, callback: Callable[[], None]
    ) -> None:
        registered = fd in self._readers or fd in self._writers
        table[fd] = callback
        self._update(fd, registered)

    def _update(self, fd: int, registered: bool) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0
        )
        if not mask:
            self._epoll.unregister(fd)
        elif registered:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)

    def _ready(self) -> None:
        readers, writers = self._readers, self._writers
        for fd, events in self._epoll.poll(0):
            if events & _READABLE:
                callback = readers.get(fd)
                if callback is not None:
                    callback()
            if events & _WRITABLE:
                callback = writers.get(fd)  # the reader may have closed it meanwhile
                if callback is not None:
                    callback()


_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0
_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Watcher] = (
    weakref.WeakKeyDictionary()
)


_last: tuple[weakref.ref[asyncio.AbstractEventLoop], Watcher] | None = None


def watcher(loop: asyncio.AbstractEventLoop) -> Watcher:
    """Where probes on ``loop`` register their sockets: one epoll set per loop on Linux,
    the loop itself elsewhere. Callbacks run on the loop; descriptors must be removed
    before they are closed."""
    global _last
    if _last is not None and _last[0]() is loop:
        return _last[1]  # a weak-key lookup per probe shows in profiles
    found = _watchers.get(loop)
    if found is None:
        found = _EpollWatcher(loop) if hasattr(select, "epoll") else cast(Watcher, loop)
        _watchers[loop] = found
    _last = (weakref.ref(loop), found)
    return found
