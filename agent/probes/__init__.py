"""Probes: one module and one function per probe type, and the table that names them.

A probe is an ``async`` function from a check to a ``ProbeOutcome``. It enforces the
check's timeout itself (so it can say which phase ran out of time), never raises for
anything the target or the network does, and leaves no socket or task behind. Adding a
probe type is one module here, one entry in ``PROBES`` and one message in the protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vantage.checks import AnyCheck
from vantage.results import ProbeOutcome

from .dns import probe_dns
from .http import prepare_http, probe_http
from .icmp import probe_icmp
from .launch import Prepare
from .tcp import probe_tcp

ProbeFn = Callable[[AnyCheck], Awaitable[ProbeOutcome]]

PROBES: dict[str, ProbeFn] = {
    "http": probe_http,
    "tcp": probe_tcp,
    "dns": probe_dns,
    "icmp": probe_icmp,
}

# Probes that can also run on loop callbacks, without a task (see ``launch``), keyed by
# the probe function they stand in for.
LAUNCHERS: dict[ProbeFn, Prepare] = {probe_http: prepare_http}

__all__ = ["LAUNCHERS", "PROBES", "ProbeFn", "probe_dns", "probe_http", "probe_icmp", "probe_tcp"]
