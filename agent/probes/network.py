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
- ``screen`` applies the on-demand guard (``vantage.guard``) of the run in progress, if
  any, to the addresses a probe is about to connect to. An on-demand run sets
  ``ON_DEMAND_GUARD`` in its own task's context (``agent.ondemand``); scheduled runs never
  do, and for them ``screen`` is one context-variable lookup.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import heapq
import ipaddress
import math
import os
import select
import socket
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

import structlog

from vantage.checks import IpVersion
from vantage.durations import format_duration
from vantage.guard import Screen
from vantage.logs import get_logger
from vantage.results import PHASES, FailureClass, Phases

Phase = Literal["resolve", "connect", "tls", "processing", "transfer"]
# libuv's timers have millisecond resolution: a wake-up may come up to this early.
_TIMER_SLACK = 0.001
_ProtocolT = TypeVar("_ProtocolT", bound=asyncio.BaseProtocol)
_CheckT = TypeVar("_CheckT")
_T = TypeVar("_T")
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
    screen(ordered, host)  # the on-demand guard, if this run has one
    return ordered


ON_DEMAND_GUARD: ContextVar[Screen | None] = ContextVar("vantage_on_demand_guard", default=None)
"""The guard of the on-demand run in this context; None (always, for scheduled runs):
no guard."""
# ``current_guard()`` is ``ON_DEMAND_GUARD.get()``, bound once: compiled, a call of it
# costs a third of a method lookup and call (instruction counts), and the probes ask on
# every hop.
current_guard: Final = ON_DEMAND_GUARD.get


def screen(addresses: list[tuple[socket.AddressFamily, str]], host: str = "") -> None:
    """Refuse, under the on-demand guard of this context, to go on to ``addresses`` (of
    ``host``): ProbeFailure (internal: the agent declined to probe) when any of them is
    refused, and the guard remembers why. Nothing without a guard.

    Every address is screened, not only the one tried first: a name that resolves to a
    refused address among allowed ones is refused whole, as at the coordinator.
    """
    guard = current_guard()
    if guard is None:
        return
    for _family, address in addresses:
        if not guard.allowed(address, host):
            raise ProbeFailure(FailureClass.INTERNAL, f"guard: {guard.refused}")


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
    def discard(self, fd: int) -> None:
        """Stop watching ``fd`` for good: the caller closes it right away."""


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

    def discard(self, fd: int) -> None:
        # Closing the descriptor takes it out of the epoll set: no system call needed.
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)

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


class _LoopWatcher:
    """The event loop's own readiness callbacks, where there is no epoll."""

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        self._loop.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        self._loop.remove_writer(fd)

    def discard(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)


_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR if hasattr(select, "epoll") else 0


class _PerLoop(Generic[_T]):
    """One ``make(loop)`` per event loop, made on first use: ``get(loop)``."""

    __slots__ = ("_last", "_made", "_make")

    def __init__(self, make: Callable[[asyncio.AbstractEventLoop], _T]) -> None:
        self._make = make
        self._made: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _T] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], _T] | None = None

    def get(self, loop: asyncio.AbstractEventLoop) -> _T:
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]  # a weak-key lookup per probe shows in profiles
        found = self._made.get(loop)
        if found is None:
            found = self._made[loop] = self._make(loop)
        self._last = (weakref.ref(loop), found)
        return found


def _make_watcher(loop: asyncio.AbstractEventLoop) -> Watcher:
    return _EpollWatcher(loop) if hasattr(select, "epoll") else _LoopWatcher(loop)


_watchers = _PerLoop(_make_watcher)


def watcher(loop: asyncio.AbstractEventLoop) -> Watcher:
    """Where probes on ``loop`` register their sockets: one epoll set per loop on Linux,
    the loop itself elsewhere. Callbacks run on the loop; descriptors must be removed
    before they are closed."""
    return _watchers.get(loop)


class Timeline(Generic[_T]):
    """Hands any number of items to one callback at their due times, with a single timer.

    ``call_at(when, item)`` calls ``callback(item)`` once the loop clock reaches
    ``when``, give or take a millisecond (libuv's timer resolution). Items are kept in
    one slot per millisecond and only the slots go through a heap, so at thousands of
    runs a second a wake-up costs one timer and a heap operation per millisecond, not per
    run, and scheduling allocates nothing per item. An exception from the callback is
    logged and the other items still go. The scheduler starts its runs from one; probes
    set their deadlines on another (``deadline``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[_T], None],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._log = log
        self._slots: dict[int, list[_T]] = {}
        self._keys: list[int] = []  # heap of the slots' milliseconds
        self._timer: asyncio.TimerHandle | None = None
        self._timer_key: float = math.inf
        self._closed = False

    def call_at(self, when: float, item: _T) -> None:
        if self._closed:
            return
        key = math.ceil(when * 1000)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = []
            heapq.heappush(self._keys, key)
            if key < self._timer_key:
                self._arm(key)
        slot.append(item)

    def close(self) -> None:
        """Call nothing more."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._slots.clear()
        self._keys.clear()

    def _arm(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_key = float(key)
        self._timer = self._loop.call_at(key / 1000, self._ring)

    def _ring(self) -> None:
        self._timer = None
        self._timer_key = math.inf
        keys, slots, callback = self._keys, self._slots, self._callback
        now = (self._loop.time() + _TIMER_SLACK) * 1000
        while keys and keys[0] <= now and not self._closed:
            for item in slots.pop(heapq.heappop(keys)):
                try:
                    callback(item)
                except Exception:
                    self._log.exception("timeline callback failed")
        if keys and not self._closed:
            self._arm(keys[0])


class Deadline:
    """A call pending from ``deadline``; ``cancel`` drops it and what it refers to."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None


def _expire(entry: Deadline) -> None:
    callback, entry.callback = entry.callback, None
    if callback is not None:
        callback()


def _make_deadlines(loop: asyncio.AbstractEventLoop) -> Timeline[Deadline]:
    return Timeline(loop, _expire, get_logger("agent.probes"))


_deadlines = _PerLoop(_make_deadlines)


def deadline(
    loop: asyncio.AbstractEventLoop, when: float, callback: Callable[[], None]
) -> Deadline:
    """``loop.call_at(when, callback)`` for a probe's deadline, give or take a millisecond,
    on one ``Timeline`` per loop: a libuv timer per probe (started, stopped and closed)
    cost about 4 us of a probe's 100 at 10,000 probes/s."""
    entry = Deadline(callback)
    _deadlines.get(loop).call_at(when, entry)
    return entry
