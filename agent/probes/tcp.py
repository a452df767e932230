"""The TCP probe: can a connection be opened to host:port within the timeout?

Contract of ``probe_tcp``: resolves the host (no resolve phase for an IP literal), opens
one TCP connection to the first address that accepts, closes it at once and reports the
peer it reached. It returns within the check's timeout and leaves no socket behind.
Failure classes: dns_nxdomain / dns_servfail / dns_timeout while resolving,
connect_refused / network_unreachable / connect_timeout while connecting.
"""

from __future__ import annotations

import asyncio

from vantage.checks import AnyCheck, TcpCheck, split_host_port
from vantage.results import ProbeOutcome, TcpDetails

from .network import ProbeFailure, addresses_for, connect, start_clock


async def probe_tcp(check: AnyCheck) -> ProbeOutcome:
    """Open and close one TCP connection for ``check`` and report what happened.

    Never raises for anything the target or the network does; TypeError for a check of
    another type.
    """
    if not isinstance(check, TcpCheck):
        raise TypeError(f"the tcp probe cannot run a {check.type} check")
    host, port = split_host_port(check.target)
    clock = start_clock(host)
    transport: asyncio.Transport | None = None
    deadline = asyncio.timeout(check.timeout)
    try:
        async with deadline:
            addresses = await addresses_for(clock, host, port, check.ip_version)
            transport, _, peer = await connect(clock, addresses, port, asyncio.Protocol)
    except ProbeFailure as failure:
        return ProbeOutcome.failed(failure.failure, failure.message, clock.phases())
    except TimeoutError:
        if not deadline.expired():
            raise
        expired = clock.timed_out(check.timeout)
        return ProbeOutcome.failed(expired.failure, expired.message, clock.phases())
    finally:
        if transport is not None:
            transport.abort()
    return ProbeOutcome(success=True, phases=clock.phases(), details=TcpDetails(peer=peer))
