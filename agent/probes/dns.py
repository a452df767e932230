"""The DNS probe: one query to one server, with the rcode and the answers as evidence.

Contract of ``probe_dns``:

- It asks ``check.server`` ("ip" or "ip:port"), or, when the check names none, the
  agent's system resolver: the first ``nameserver`` of /etc/resolv.conf, read once per
  process (``system_nameserver``). The probe queries that server directly instead of
  calling getaddrinfo because it needs what getaddrinfo hides: the rcode (getaddrinfo
  folds NXDOMAIN, NODATA, SERVFAIL and REFUSED into a couple of EAI codes), the answers
  themselves (MX, TXT, NS, SOA, CNAME are beyond it) and no detour through /etc/hosts or
  nsswitch caches that would answer for a server that is down.
- One query over UDP, repeated over TCP when the UDP reply is truncated
  (``DnsDetails.tcp_fallback``), or over TCP only when ``check.tcp`` is set. The UDP
  socket is connected to the server so that an ICMP port unreachable surfaces as a
  refusal instead of silence.
- It returns within the check's timeout (an ``asyncio.timeout`` around everything) and
  leaves no socket behind.
- Phases: the whole query is the ``resolve`` phase (for DNS, resolving *is* the probe);
  the other phases stay zero, so ``resolve`` equals the duration.
- ``DnsDetails``: the rcode ("NOERROR", "NXDOMAIN"...), the answers of the asked type in
  presentation format, sorted ("192.0.2.1", "10 mx.example.org.", TXT strings joined into
  one text), the server as "ip:port" and whether TCP was used after truncation.

Failure classes (exactly one per outcome):

=====================  ===========================================================
dns_nxdomain           the rcode is NXDOMAIN and another rcode was expected
dns_servfail           the rcode is SERVFAIL, REFUSED, FORMERR, NOTIMP or any other
                       error rcode that was not expected (the message names it); also
                       a reply that is not a valid answer to the query (garbage,
                       wrong id, cut short, TCP closed before answering): the server
                       is there but the DNS service is broken, which is what
                       dns_servfail reports (``internal`` is kept for our own bugs)
dns_timeout            no answer within the check's timeout
dns_answer_mismatch    the rcode is as expected but the answers are not:
                       ``expected_answers`` differ (compared as sets, addresses
                       canonically, names case- and trailing-dot-insensitively, TXT
                       exactly), no answer matches ``answer_match``, or, with neither
                       expectation and NOERROR expected, no record of the asked type.
                       Also NOERROR when an error rcode was expected: the name
                       answers when it should not.
connect_refused        the server refused the query (ICMP port unreachable for UDP,
                       RST for TCP)
network_unreachable    no route to the server
internal               no nameserver configured on the agent, an on-demand guard
                       refusing the server, or a bug
=====================  ===========================================================
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import re
import socket
from pathlib import Path

import dns.asyncbackend
import dns.asyncquery
import dns.exception
import dns.inet
import dns.message
import dns.nameserver
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.TXT import TXT

from vantage.checks import AnyCheck, DnsCheck, dns_server_address
from vantage.results import DnsDetails, FailureClass, ProbeOutcome

from .network import (
    PhaseClock,
    ProbeFailure,
    classify_connect_error,
    describe_os_error,
    format_peer,
    screen,
)

RESOLV_CONF = Path("/etc/resolv.conf")
# Large enough for most answers without IP fragmentation (DNS flag day 2020); a bigger
# answer comes back truncated and is asked again over TCP.
EDNS_PAYLOAD = 1232
_BACKEND = dns.asyncbackend.get_backend("asyncio")
# Errors that mean the agent cannot reach the server at all, whatever the server does.
_UNREACHABLE = frozenset(
    {
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
        errno.EADDRNOTAVAIL,  # e.g. an IPv6 server on an agent without IPv6
        errno.EAFNOSUPPORT,
    }
)
_NAME_TYPES = frozenset({"CNAME", "MX", "NS", "SOA"})


class NoNameserver(Exception):
    """The agent has no usable system resolver; ``str()`` says why."""


async def probe_dns(check: AnyCheck) -> ProbeOutcome:
    """Send ``check``'s query and judge the reply; see the module docstring.

    Never raises for anything the server or the network does; TypeError for a check of
    another type.
    """
    if not isinstance(check, DnsCheck):
        raise TypeError(f"the dns probe cannot run a {check.type} check")
    # The clock runs first so that the phases cover the whole probe, including the
    # once-per-process reading of resolv.conf.
    clock = PhaseClock("resolve", f"query {check.target} {check.record_type}")
    try:
        address, port = dns_server_address(check.server) if check.server else system_nameserver()
    except NoNameserver as exc:
        return ProbeOutcome.failed(FailureClass.INTERNAL, str(exc), clock.phases())
    server = format_peer(address, port)
    clock.step += f" @{server}"
    query = dns.message.make_query(
        check.target, check.record_type, use_edns=0, payload=EDNS_PAYLOAD
    )
    details = DnsDetails(server=server)
    deadline = asyncio.timeout(check.timeout)
    try:
        if check.server:
            # An on-demand guard applies to the server asked, not to the agent's own
            # resolver (which is the agent's, whatever its address).
            screen([(socket.AF_INET6 if ":" in address else socket.AF_INET, address)])
        async with deadline:
            response, tcp_fallback = await _exchange(clock, query, address, port, check.tcp)
    except ProbeFailure as failure:
        return ProbeOutcome.failed(failure.failure, failure.message, clock.phases(), details)
    except TimeoutError:
        if not deadline.expired():
            raise
        expired = clock.timed_out(check.timeout)
        return ProbeOutcome.failed(expired.failure, expired.message, clock.phases(), details)
    phases = clock.phases()
    details = DnsDetails(
        rcode=dns.rcode.to_text(response.rcode()),
        answers=answers_of(response, check.record_type),
        server=server,
        tcp_fallback=tcp_fallback,
    )
    mismatch = judge(check, details, clock.step)
    if mismatch is not None:
        return ProbeOutcome.failed(mismatch.failure, mismatch.message, phases, details)
    return ProbeOutcome(success=True, phases=phases, details=details)


async def _exchange(
    clock: PhaseClock, query: dns.message.Message, address: str, port: int, tcp_only: bool
) -> tuple[dns.message.Message, bool]:
    """The reply to ``query`` and whether TCP followed a truncated UDP reply.

    Does by hand what ``dns.asyncquery.udp_with_fallback`` does, for two reasons: the UDP
    socket is connected (so ICMP errors reach us) and ``clock.step`` says which transport
    failed. No timeout is given to dnspython: the caller's deadline covers both tries.
    """
    try:
        if tcp_only:
            clock.step += " over TCP"
            return await dns.asyncquery.tcp(query, address, port=port, backend=_BACKEND), False
        udp = await _BACKEND.make_socket(  # type: ignore[no-untyped-call]
            dns.inet.af_for_address(address), socket.SOCK_DGRAM, 0, None, (address, port)
        )
        try:
            async with udp:
                return await dns.asyncquery.udp(
                    query, address, port=port, raise_on_truncation=True, sock=udp
                ), False
        except dns.message.Truncated:
            clock.step += " over TCP after a truncated UDP reply"
            return await dns.asyncquery.tcp(query, address, port=port, backend=_BACKEND), True
    except (EOFError, ConnectionResetError, BrokenPipeError):
        raise ProbeFailure(
            FailureClass.DNS_SERVFAIL, f"{clock.step}: connection closed before the answer"
        ) from None
    except dns.exception.Timeout:
        # Only reachable if dnspython ever applies a timeout of its own.
        raise ProbeFailure(FailureClass.DNS_TIMEOUT, f"{clock.step}: timed out") from None
    except dns.exception.DNSException as exc:
        raise ProbeFailure(
            FailureClass.DNS_SERVFAIL, f"{clock.step}: malformed reply ({_describe(exc)})"
        ) from None
    except OSError as exc:  # the caller's deadline arrives as cancellation, not as this
        raise ProbeFailure(
            _classify_os_error(exc), f"{clock.step}: {describe_os_error(exc)}"
        ) from None


def _classify_os_error(exc: OSError) -> FailureClass:
    if exc.errno in _UNREACHABLE:
        return FailureClass.NETWORK_UNREACHABLE
    if isinstance(exc, TimeoutError):
        return FailureClass.DNS_TIMEOUT  # the kernel gave up on the TCP handshake
    return classify_connect_error(exc)


def _describe(exc: dns.exception.DNSException) -> str:
    text = str(exc).rstrip(".") or type(exc).__name__
    return text[:1].lower() + text[1:]


def answers_of(response: dns.message.Message, record_type: str) -> tuple[str, ...]:
    """The answer section's records of ``record_type`` (class IN), in presentation
    format and sorted; a CNAME chain leading to them is left out. TXT strings are joined
    into one text (RFC 7208's reading), undecodable bytes replaced."""
    rdtype = dns.rdatatype.from_text(record_type)
    texts: list[str] = []
    for rrset in response.answer:
        if rrset.rdtype != rdtype or rrset.rdclass != dns.rdataclass.IN:
            continue
        for rdata in rrset:
            if isinstance(rdata, TXT):
                texts.append(b"".join(rdata.strings).decode("utf-8", errors="replace"))
            else:
                texts.append(rdata.to_text())
    return tuple(sorted(texts))


def normalise_answer(record_type: str, text: str) -> str:
    """The form answers are compared in: canonical addresses for A/AAAA, lower-case names
    without trailing dots for name-bearing types, TXT as is."""
    if record_type == "TXT":
        return text
    if record_type in ("A", "AAAA"):
        try:
            return str(ipaddress.ip_address(text.strip()))
        except ValueError:
            return text.strip().lower()
    if record_type in _NAME_TYPES:
        return " ".join(token.rstrip(".") for token in text.lower().split())
    return text


def judge(check: DnsCheck, details: DnsDetails, step: str) -> ProbeFailure | None:
    """The failure a reply amounts to for ``check``, or None when it is as expected."""
    if details.rcode != check.expected_rcode:
        expected = (
            "" if check.expected_rcode == "NOERROR" else f" (expected {check.expected_rcode})"
        )
        message = f"{step}: {details.rcode}{expected}"
        if details.rcode == "NOERROR":
            return ProbeFailure(FailureClass.DNS_ANSWER_MISMATCH, message)
        if details.rcode == "NXDOMAIN":
            return ProbeFailure(FailureClass.DNS_NXDOMAIN, message)
        return ProbeFailure(FailureClass.DNS_SERVFAIL, message)
    got = details.answers
    if check.expected_answers is not None:
        wanted = {normalise_answer(check.record_type, a) for a in check.expected_answers}
        if {normalise_answer(check.record_type, a) for a in got} != wanted:
            return ProbeFailure(
                FailureClass.DNS_ANSWER_MISMATCH,
                f"{step}: answers {list(got)} differ from expected "
                f"{sorted(check.expected_answers)}",
            )
    if check.answer_match is not None:
        pattern = re.compile(check.answer_match)
        if not any(pattern.search(answer) for answer in got):
            return ProbeFailure(
                FailureClass.DNS_ANSWER_MISMATCH,
                f"{step}: no answer matches {check.answer_match!r} (got {list(got)})",
            )
    if (
        check.expected_answers is None
        and check.answer_match is None
        and check.expected_rcode == "NOERROR"
        and not got
    ):
        return ProbeFailure(
            FailureClass.DNS_ANSWER_MISMATCH, f"{step}: no {check.record_type} record"
        )
    return None


@functools.cache
def system_nameserver() -> tuple[str, int]:
    """(ip, port) of the agent's system resolver: the first nameserver of
    /etc/resolv.conf, read once per process. NoNameserver (not cached, so a fixed file is
    picked up) when there is none."""
    return read_nameserver(RESOLV_CONF)


def read_nameserver(path: Path) -> tuple[str, int]:
    """(ip, port) of the first nameserver in the resolv.conf-format file ``path``."""
    try:
        resolver = dns.resolver.Resolver(filename=str(path))
    except dns.resolver.NoResolverConfiguration as exc:
        raise NoNameserver(f"dns: no system resolver: {path}: {_describe(exc)}") from None
    first = resolver.nameservers[0]
    if isinstance(first, str):
        return first, resolver.port
    if isinstance(first, dns.nameserver.Do53Nameserver):
        return first.address, first.port
    raise NoNameserver(f"dns: no system resolver: {path}: {first} is not a plain DNS server")
