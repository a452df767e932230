"""The ICMP probe: ``count`` echo requests to one address, then loss and round-trip times.

Contract of ``probe_icmp``:

- The target is resolved with the system resolver like every other probe (no resolve
  phase for an IP literal); ``ip_version`` filters and orders the addresses and the first
  one is pinged.
- ``count`` echo requests of ``payload_size`` bytes leave ``packet_interval`` apart (on a
  fixed schedule, whatever the replies do); replies are awaited until every request is
  answered or the check's deadline passes, so a reply may be as late as the time left
  and one that comes later counts as lost. The check guarantees that all requests fit
  in the timeout. The probe returns within the timeout and leaves no socket behind.
- Phases: ``resolve`` while resolving, then ``processing`` for the whole exchange (ping
  has no connection to open: from the first request to the last reply is the target's
  answering time, which is what ``processing`` measures for the other probes).
- ``IcmpDetails``: requests sent, echo replies received, loss percent of ``count``,
  min/avg/max round-trip time in seconds over the replies (zero without any), address.

How it sends: through a raw ICMP socket when the process may open one (root or
CAP_NET_RAW), else through Linux's unprivileged ICMP datagram sockets, which the kernel
allows only to groups within ``net.ipv4.ping_group_range``. ``icmp_access`` decides once
per process (so fixing the sysctl needs an agent restart); ``select_icmp_access`` is the
decision itself, a pure function of ``IcmpFacts`` that tests feed.

Failure classes (exactly one per outcome):

====================  =============================================================
dns_nxdomain,         resolving the target failed (as in ``network.resolve``);
dns_servfail,         dns_timeout when the deadline passed while resolving
dns_timeout
network_unreachable   no echo reply at all, and the network said why: an ICMP error
                      came back (destination unreachable, time exceeded) or the
                      kernel had no route to send on
icmp_loss             more than ``max_loss_percent`` of the requests got no reply
                      ("3/3 lost", "1/3 lost (33%) > 0%")
internal              the agent cannot send ICMP at all (the message says what is
                      missing and how to allow it), an IP literal of the wrong
                      family for ``ip_version``, or an on-demand guard refusing the
                      address
====================  =============================================================
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import itertools
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icmplib import (  # type: ignore[import-untyped]
    AsyncSocket,
    ICMPError,
    ICMPLibError,
    ICMPRequest,
    ICMPv4Socket,
    ICMPv6Socket,
    TimeoutExceeded,
)

from vantage.checks import AnyCheck, IcmpCheck
from vantage.results import FailureClass, IcmpDetails, ProbeOutcome

from .network import (
    PhaseClock,
    ProbeFailure,
    by_ip_version,
    describe_os_error,
    ip_literal,
    resolve,
    screen,
)

PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")
_ALL_GROUPS = "0 2147483647"
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})
# (family, type) of the ICMP messages the probe reads: echo reply, destination
# unreachable, time exceeded. Anything else on a raw socket (our own echo requests seen on
# loopback, other hosts' traffic) is not for us.
_ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
_ERRORS = {socket.AF_INET: frozenset({3, 11}), socket.AF_INET6: frozenset({1, 3})}
# Identifiers of raw-socket requests: every raw ICMP socket sees every reply, so probes
# running at once tell theirs apart by identifier (and sequence number).
_IDENTIFIERS = itertools.count(random.randrange(0x10000))


class IcmpMode(enum.Enum):
    RAW = "raw"  # raw sockets: root or CAP_NET_RAW
    DATAGRAM = "datagram"  # unprivileged ICMP datagram sockets (ping_group_range)


@dataclass(frozen=True, slots=True)
class IcmpAccess:
    """How this process sends echo requests; ``mode`` is None when it cannot, and then
    ``problem`` is the one-line reason the probe reports."""

    mode: IcmpMode | None
    problem: str = ""


@dataclass(frozen=True, slots=True)
class IcmpFacts:
    """What decides the ICMP mode of this process."""

    raw_socket: bool  # a raw ICMP socket opens
    datagram_socket: bool  # an unprivileged ICMP datagram socket opens
    datagram_error: str  # why it does not, in the OS's words ('' when it does)
    gid: int  # the effective group, which ping_group_range is about
    ping_group_range: str  # "low high", '' when unreadable (not Linux)

    @classmethod
    def gather(cls) -> IcmpFacts:
        """The facts of this process, found by opening (and closing) one socket of each
        kind, which answers for root, capabilities, seccomp and sysctls alike."""
        raw_error = _open_error(socket.SOCK_RAW)
        datagram_error = _open_error(socket.SOCK_DGRAM)
        try:
            group_range = " ".join(PING_GROUP_RANGE.read_text().split())
        except OSError:
            group_range = ""
        return cls(
            raw_socket=raw_error is None,
            datagram_socket=datagram_error is None,
            datagram_error=datagram_error or "",
            gid=os.getegid(),
            ping_group_range=group_range,
        )


def _open_error(kind: socket.SocketKind) -> str | None:
    try:
        socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
    except OSError as exc:
        return describe_os_error(exc)
    return None


def select_icmp_access(facts: IcmpFacts) -> IcmpAccess:
    """Raw sockets when they open, else datagram sockets when they open, else the
    precise reason neither works."""
    if facts.raw_socket:
        return IcmpAccess(IcmpMode.RAW)
    if facts.datagram_socket:
        return IcmpAccess(IcmpMode.DATAGRAM)
    no_raw = "icmp: no raw socket (needs root or CAP_NET_RAW)"
    allow = f"allow it with sysctl -w net.ipv4.ping_group_range='{_ALL_GROUPS}'"
    if not facts.ping_group_range:
        return IcmpAccess(None, f"{no_raw} and no unprivileged ICMP socket: {facts.datagram_error}")
    low, _, high = facts.ping_group_range.partition(" ")
    if low.isdigit() and high.isdigit() and int(low) <= facts.gid <= int(high):
        return IcmpAccess(
            None,
            f"{no_raw} and unprivileged ICMP sockets fail for gid {facts.gid} although "
            f"net.ipv4.ping_group_range is '{facts.ping_group_range}': {facts.datagram_error}",
        )
    return IcmpAccess(
        None,
        f"{no_raw} and unprivileged ICMP is off for gid {facts.gid} "
        f"(net.ipv4.ping_group_range is '{facts.ping_group_range}'; {allow})",
    )


@functools.cache
def icmp_access() -> IcmpAccess:
    """This process's ICMP access, decided on first use and kept."""
    return select_icmp_access(IcmpFacts.gather())


@dataclass(slots=True)
class _Tally:
    """What the exchange has seen so far; it survives the deadline cutting it short."""

    count: int
    identifier: int = 0  # of our requests, as replies carry it
    sent_at: dict[int, float] = field(default_factory=dict)  # sequence -> monotonic
    rtts: list[float] = field(default_factory=list)
    settled: set[int] = field(default_factory=set)  # answered by a reply or an error
    all_settled: asyncio.Event = field(default_factory=asyncio.Event)
    unreachable: str = ""  # the network's reason, when it gave one
    error: str = ""  # the last other error

    def settle(self, sequence: int) -> None:
        self.settled.add(sequence)
        if len(self.settled) == self.count:
            self.all_settled.set()


async def probe_icmp(check: AnyCheck, *, access: IcmpAccess | None = None) -> ProbeOutcome:
    """Ping ``check``'s target and report loss and round-trip times.

    ``access`` overrides the process's ICMP mode (``icmp_access()``). Never raises for
    anything the target or the network does; TypeError for a check of another type.
    """
    if not isinstance(check, IcmpCheck):
        raise TypeError(f"the icmp probe cannot run a {check.type} check")
    literal = ip_literal(check.target)
    clock = (
        PhaseClock("processing", f"ping {check.target}")
        if literal
        else PhaseClock("resolve", f"resolve {check.target}")
    )
    # The clock runs first so that the phases cover the whole probe, including the
    # once-per-process decision of the ICMP mode (a few system calls).
    access = access if access is not None else icmp_access()
    if access.mode is None:
        return ProbeOutcome.failed(FailureClass.INTERNAL, access.problem, clock.phases())
    tally = _Tally(check.count)
    address = ""
    until = asyncio.get_running_loop().time() + check.timeout
    deadline = asyncio.timeout_at(until)
    try:
        async with deadline:
            family, address = await _address(check, literal)
            clock.enter("processing", f"ping {address}")
            await _exchange(check, access.mode, family, address, tally, until)
    except ProbeFailure as failure:
        return ProbeOutcome.failed(failure.failure, failure.message, clock.phases())
    except TimeoutError:
        if not deadline.expired():
            raise
        if clock.phase == "resolve":
            expired = clock.timed_out(check.timeout)
            return ProbeOutcome.failed(expired.failure, expired.message, clock.phases())
        # Otherwise the deadline ended the wait for replies: those missing are lost.
    return _outcome(check, clock, tally, address)


async def _address(
    check: IcmpCheck, literal: tuple[socket.AddressFamily, str] | None
) -> tuple[socket.AddressFamily, str]:
    addresses = [literal] if literal else await resolve(check.target, 0)
    ordered = by_ip_version(addresses, check.ip_version)
    if not ordered:
        family = "IPv4" if check.ip_version == "ipv4" else "IPv6"
        if literal:
            raise ProbeFailure(
                FailureClass.INTERNAL, f"{check.target} is not an {family} address (ip_version)"
            )
        raise ProbeFailure(
            FailureClass.DNS_NXDOMAIN, f"resolve {check.target}: no {family} address"
        )
    screen(ordered, check.target)  # the on-demand guard, if this run has one
    return ordered[0]


async def _exchange(
    check: IcmpCheck,
    mode: IcmpMode,
    family: socket.AddressFamily,
    address: str,
    tally: _Tally,
    deadline: float,
) -> None:
    """Send the requests on schedule and collect replies into ``tally`` until every
    request is settled; the caller's deadline cuts it short otherwise.

    Sending and listening are two tasks, as in ping(8): the listener always waits past the
    deadline, because icmplib drops a packet that it reads after its own receive timeout,
    so short waits between sends would lose replies.
    """
    socket_class = ICMPv6Socket if family == socket.AF_INET6 else ICMPv4Socket
    try:
        icmp_socket = socket_class(privileged=mode is IcmpMode.RAW)
    except ICMPLibError as exc:
        raise ProbeFailure(
            FailureClass.INTERNAL, f"icmp: cannot open a {mode.value} ICMP socket: {exc}"
        ) from None
    sock = AsyncSocket(icmp_socket)
    tally.identifier = next(_IDENTIFIERS) & 0xFFFF
    try:
        async with asyncio.TaskGroup() as group:
            listener = group.create_task(_listen(sock, family, tally, deadline))
            await _send_all(sock, check, address, tally)
            await tally.all_settled.wait()
            listener.cancel()
    finally:
        sock.close()


async def _send_all(sock: AsyncSocket, check: IcmpCheck, address: str, tally: _Tally) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for sequence in range(check.count):
        delay = start + sequence * check.packet_interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        request = ICMPRequest(address, tally.identifier, sequence, payload_size=check.payload_size)
        try:
            sock.send(request)
        except ICMPLibError as exc:
            # Not sent: settled at once as lost, with the kernel's reason.
            _note_error(tally, exc)
            tally.settle(sequence)
            continue
        tally.sent_at[sequence] = time.monotonic()
        tally.identifier = request.id  # a datagram socket's kernel picks the identifier


async def _listen(
    sock: AsyncSocket, family: socket.AddressFamily, tally: _Tally, deadline: float
) -> None:
    loop = asyncio.get_running_loop()
    # Checked on every turn, not left to cancellation alone: Python 3.11's wait_for, which
    # icmplib's receive uses, swallows a cancellation that meets a packet just read.
    while not tally.all_settled.is_set() and loop.time() < deadline:
        try:
            reply = await sock.receive(None, deadline - loop.time() + 1.0)
        except TimeoutExceeded:
            return  # the deadline has passed: the caller is done with us
        except ICMPLibError as exc:
            if not _note_error(tally, exc):
                return  # not the network speaking: the rest count as lost
            continue
        _record(tally, family, reply)


def _note_error(tally: _Tally, exc: ICMPLibError) -> bool:
    """Keep the reason ``exc`` gives; true when it says the network cannot reach the
    address (and the socket stays usable)."""
    # icmplib wraps socket errors in its own exceptions; the OSError is the context.
    cause = exc.__context__
    if isinstance(cause, OSError):
        text = describe_os_error(cause)
        if cause.errno in _UNREACHABLE:
            tally.unreachable = text
            return True
    else:
        text = str(exc)
    tally.error = text[:1].lower() + text[1:]
    return False


def _record(tally: _Tally, family: socket.AddressFamily, reply: Any) -> None:
    """Settle the request ``reply`` (an icmplib ICMPReply) answers, if it is ours."""
    received = time.monotonic()
    sequence = reply.sequence
    if reply.id != tally.identifier or sequence not in tally.sent_at or sequence in tally.settled:
        return  # another process's or probe's packet, or a duplicate
    if reply.type == _ECHO_REPLY[family]:
        tally.rtts.append(received - tally.sent_at[sequence])
        tally.settle(sequence)
    elif reply.type in _ERRORS[family]:
        tally.settle(sequence)
        try:
            reply.raise_for_status()
        except ICMPError as exc:
            text = str(exc)
            tally.unreachable = text[:1].lower() + text[1:]


def _outcome(check: IcmpCheck, clock: PhaseClock, tally: _Tally, address: str) -> ProbeOutcome:
    phases = clock.phases()
    received = len(tally.rtts)
    lost = check.count - received
    loss = 100.0 * lost / check.count
    rtts = tally.rtts or [0.0]
    details = IcmpDetails(
        sent=len(tally.sent_at),
        received=received,
        loss_percent=loss,
        rtt_min=min(rtts),
        rtt_avg=sum(rtts) / len(rtts),
        rtt_max=max(rtts),
        address=address,
    )
    if loss <= check.max_loss_percent:
        return ProbeOutcome(success=True, phases=phases, details=details)
    if received == 0 and tally.unreachable:
        message = f"{clock.step}: {tally.unreachable}, {lost}/{check.count} lost"
        return ProbeOutcome.failed(FailureClass.NETWORK_UNREACHABLE, message, phases, details)
    if received == 0:
        message = f"{clock.step}: {lost}/{check.count} lost"
        if tally.error:
            message += f" ({tally.error})"
    else:
        message = (
            f"{clock.step}: {lost}/{check.count} lost ({loss:.0f}%) > {check.max_loss_percent:g}%"
        )
    return ProbeOutcome.failed(FailureClass.ICMP_LOSS, message, phases, details)
