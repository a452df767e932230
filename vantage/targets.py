"""Targets of on-demand checks: what a person types after ``vantage check``.

``on_demand_check`` turns a target and an optional probe type into a check of the
ordinary check model (``vantage.checks``), so an on-demand check is validated exactly as
the checks file is. The coordinator builds the agents' check with it and ``vantage
check`` builds its local probe's check with it, so both run the same spec.

What the target says, and what it becomes:

==========================  ======  ======================  =========================
target                      type    http                    tcp / dns / icmp
==========================  ======  ======================  =========================
``http(s)://HOST[:P]/...``  http    the URL                 HOST:port (the URL's or
                                                            80/443) / HOST / HOST
``HOST:PORT``               tcp     ``http://HOST:PORT/``   as is / refused / HOST
                                    (https for 443)
``HOST`` (name or IP)       icmp    ``http://HOST/``        refused / HOST / HOST
==========================  ======  ======================  =========================

An IPv6 address is written bare (``2001:db8::1``) or in brackets with a port
(``[2001:db8::1]:443``). Everything else about the check takes the checks file's
defaults (follow redirects, expect 200-399, three pings...).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from pydantic import ValidationError

from .checks import PROBE_TYPES, AnyCheck, parse_check, split_host_port
from .durations import format_duration

__all__ = ["DEFAULT_TIMEOUT", "MAX_TARGET", "TargetError", "on_demand_check", "target_host"]

DEFAULT_TIMEOUT = 5.0
MAX_TARGET = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}


class TargetError(ValueError):
    """The target (or type) does not make a check; ``str()`` is one line saying why."""


def on_demand_check(
    target: str, probe_type: str = "", timeout: float = DEFAULT_TIMEOUT, name: str = "checknow"
) -> AnyCheck:
    """The check that probes ``target`` once with ``probe_type`` (empty: from the
    target's shape) within ``timeout`` seconds; TargetError when there is none."""
    if not target:
        raise TargetError("the target is empty")
    if len(target) > MAX_TARGET:
        raise TargetError(f"the target is longer than {MAX_TARGET} characters")
    if not target.isprintable() or any(char.isspace() for char in target):
        raise TargetError(f"target {_shown(target)} has spaces or control characters")
    if probe_type and probe_type not in PROBE_TYPES:
        raise TargetError(f"unknown type {_shown(probe_type)} (known: {', '.join(PROBE_TYPES)})")
    kind, probe_target = _shape(target, probe_type)
    data = {
        "name": name,
        "type": kind,
        "target": probe_target,
        "timeout": timeout,
        # Never used (the check runs once), but the model wants one above the timeout.
        "interval": max(2 * timeout, 1.0),
    }
    try:
        return parse_check(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        message = (
            str(error["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
        )
        field = ".".join(str(part) for part in error["loc"][1:])
        if field == "timeout" and "timeout" not in message:
            message = f"timeout {format_duration(timeout)}: {message}"
        elif field not in ("", "target", "timeout", "interval") and not message.startswith(field):
            message = f"{field}: {message}"
        raise TargetError(message) from None


def target_host(check: AnyCheck) -> str | None:
    """The host an on-demand check connects to (a name or an IP address), or None when
    it connects to no host of the target's (a DNS query goes to a resolver)."""
    if check.type == "http":
        return urlsplit(check.target).hostname
    if check.type == "tcp":
        return split_host_port(check.target)[0]
    if check.type == "icmp":
        return check.target
    return None


def _shape(target: str, probe_type: str) -> tuple[str, str]:
    """(type, the check's target) for what ``target`` looks like."""
    if "://" in target:
        parts = urlsplit(target)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise TargetError(f"target {_shown(target)} is not an http:// or https:// URL")
        try:
            port = parts.port or _DEFAULT_PORTS[scheme]
        except ValueError:
            raise TargetError(f"target {_shown(target)} has an invalid port") from None
        host = parts.hostname
        kind = probe_type or "http"
        if kind == "http":
            return kind, target
        if kind == "tcp":
            return kind, _host_port(host, port)
        return kind, host
    name, given_port = _host_and_port(target)
    if given_port is None:
        kind = probe_type or "icmp"
        if kind == "http":
            return kind, f"http://{_bracketed(name)}/"
        if kind == "tcp":
            raise TargetError(f"a tcp check needs HOST:PORT, not {_shown(target)}")
        return kind, name
    kind = probe_type or "tcp"
    if kind == "http":
        scheme = "https" if given_port == 443 else "http"
        return kind, f"{scheme}://{_host_port(name, given_port)}/"
    if kind == "dns":
        raise TargetError(f"a dns check takes a name, not {_shown(target)}")
    if kind == "tcp":
        return kind, _host_port(name, given_port)
    return kind, name


def _host_and_port(target: str) -> tuple[str, int | None]:
    """HOST or HOST:PORT (``[v6]:PORT``; a bare IPv6 address is a host)."""
    bare = target[1:-1] if target.startswith("[") and target.endswith("]") else target
    try:
        return str(ipaddress.ip_address(bare)), None
    except ValueError:
        pass
    if ":" not in target:
        return target, None
    try:
        return split_host_port(target)
    except ValueError as exc:
        if "IPv6" in str(exc):
            raise TargetError(str(exc)) from None
        raise TargetError(
            f"target {_shown(target)} is not HOST or HOST:PORT with a port in 1-65535"
        ) from None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _host_port(host: str, port: int) -> str:
    return f"{_bracketed(host)}:{port}"


def _shown(text: str) -> str:
    return repr(text[:100] + ("..." if len(text) > 100 else ""))
