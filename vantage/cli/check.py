"""``vantage check URL|HOST``: is it down for everyone, or just me?

At the same moment the command asks the coordinator to probe the target from every
connected agent (``CheckNow``) and probes it from this machine with the agent's own probe
functions (``agent.probes``), on the same check spec (``vantage.targets``) and without
the on-demand guard (this is the user's own machine). Then it answers in one line, from
the coordinator's verdict on the agents' answers and the local result:

- ``up: from 6 agents in 3 regions and from here``
- ``it's just you: up from 6 agents in 3 regions, failing here (connect_timeout)``
- ``down for everyone: connection refused from 6 agents in ap, eu, us``
- ``down in eu only (dns_nxdomain); up from here``
- ``up, except from 1/6 agents: eu-1 (connect_timeout); up from here``
- ``unknown: no agent is connected; up from here``

followed by a table per region (agents up and down, without an answer, the dominant
failure, the median latency of the successful probes) and a row for here. A local probe
that cannot run at all (ICMP without the privilege, say) is "not probed here", never
"failing here". ``--json`` prints one object instead (see ``check_json``); a progress
line goes to stderr while waiting, when stderr is a terminal.

Exit codes: 0 when the agents' verdict is up and the local probe did not fail; 1 when
anything is not up (it's just you included); 2 for usage and connection errors and for
refusals (guard, rate limit), each one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..checks import PROBE_TYPES, AnyCheck
from ..client import failure_name, region_state_name, state_name
from ..results import FailureClass, ProbeResult
from ..targets import TargetError, on_demand_check
from .common import UsageError, add_connection_flags, client_tls, client_token, print_table

if TYPE_CHECKING:
    from ..tls import ClientTls

EXIT_UP = 0
EXIT_NOT_UP = 1
MAX_TIMEOUT = 60.0
# The coordinator may take the timeout to resolve the target, the timeout to probe and
# a margin to collect: the call's deadline leaves room for all of it.
_RPC_SLACK = 10.0
_PROGRESS_EVERY = 0.25
# How failure classes read in a sentence ("down for everyone: connection refused ...").
_FAILURE_WORDS = {
    "dns_nxdomain": "no such name (dns_nxdomain)",
    "dns_servfail": "DNS failure (dns_servfail)",
    "dns_timeout": "DNS timed out (dns_timeout)",
    "connect_refused": "connection refused",
    "connect_timeout": "connection timed out",
    "network_unreachable": "network unreachable",
    "tls_handshake": "TLS handshake failed",
    "tls_cert_invalid": "invalid certificate",
    "tls_cert_expired": "certificate expired",
    "http_status": "unexpected HTTP status",
    "body_mismatch": "unexpected body",
    "dns_answer_mismatch": "unexpected DNS answer",
    "icmp_loss": "pings lost",
    "timeout": "timed out",
    "internal": "probe could not run (internal)",
}


@dataclass(frozen=True, slots=True)
class Here:
    """The local probe: its result, and whether it could run at all (an ``internal``
    failure is this machine's problem, not the target's)."""

    result: ProbeResult

    @property
    def probed(self) -> bool:
        return self.result.outcome.failure is not FailureClass.INTERNAL

    @property
    def failed(self) -> bool:
        return self.probed and not self.result.outcome.success


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check",
        help="is it down for everyone or just me?",
        description="Probe a URL or host now from every agent the coordinator has and, at "
        "the same moment, from this machine; answer down for everyone, regional, or just "
        "you. Exit 0 when up, 1 when not up (it's just you included), 2 on errors.",
    )
    check.add_argument("target", metavar="URL|HOST", help="http(s)://..., HOST:PORT or HOST")
    check.add_argument(
        "--type",
        choices=PROBE_TYPES,
        help="probe type (default: http for a URL, tcp for HOST:PORT, icmp for HOST)",
    )
    check.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="probe timeout (default 5)"
    )
    check.add_argument("--json", action="store_true", help="one JSON object for scripts")
    add_connection_flags(check)
    check.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    """The command (see the module docstring); UsageError for a bad flag or target and
    for every way the coordinator does not answer."""
    if not 0 < args.timeout <= MAX_TIMEOUT:
        raise UsageError(f"--timeout must be above 0 and at most {MAX_TIMEOUT:g} seconds")
    try:
        check = on_demand_check(args.target, args.type or "", args.timeout)
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    tls = client_tls(args)
    token = client_token(args)
    progress = sys.stderr.isatty() and not args.json
    response, here = asyncio.run(_ask_and_probe(args, check, progress, tls, token))
    answer, line = summary(response, here)
    if args.json:
        print(json.dumps(check_json(args.target, response, here, answer, line)))
    else:
        print(line)
        print()
        print_table(region_rows(response, here))
        for label, names in (("no answer from", response.missing), ("cannot run", response.unable)):
            if names:
                kind = f" {check.type} probes" if label == "cannot run" else ""
                print(f"{label}{kind}: {', '.join(names)}")
    return EXIT_UP if answer == "up" else EXIT_NOT_UP


async def _ask_and_probe(
    args: argparse.Namespace,
    check: AnyCheck,
    progress: bool,
    tls: ClientTls,
    token: str | None,
) -> tuple[Any, Here]:
    """The coordinator's CheckNow response and the local probe's result, run at once.
    A failed call ends everything at once (UsageError)."""
    remote = asyncio.create_task(_check_now(args, tls, token))
    local = asyncio.create_task(probe_here(check))
    ticker = asyncio.create_task(_progress(args.target)) if progress else None
    try:
        await asyncio.wait({remote, local}, return_when=asyncio.FIRST_EXCEPTION)
        if remote.done() and remote.exception() is not None:
            local.cancel()
        return await remote, await local
    finally:
        for task in (remote, local, ticker):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, UsageError):
                    await task
        if ticker is not None:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


async def _check_now(args: argparse.Namespace, tls: ClientTls, token: str | None) -> Any:
    # Imported here: grpc reads GRPC_VERBOSITY, which the CLI sets, when first imported.
    import grpc.aio

    from vantage_proto.v1 import query_pb2, query_pb2_grpc

    from ..client import refusal_reason

    request = query_pb2.CheckNowRequest(
        target=args.target, type=args.type or "", timeout_ms=round(args.timeout * 1000)
    )
    deadline = 2 * args.timeout + _RPC_SLACK
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with tls.aio_channel(args.coordinator) as channel:
        stub = query_pb2_grpc.QueryServiceStub(channel)
        try:
            return await stub.CheckNow(request, timeout=deadline, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            refused_by = refusal_reason(exc.trailing_metadata())
            line = _call_failed(args.coordinator, tls, exc.code(), exc.details(), refused_by)
            raise UsageError(line) from None


def _call_failed(
    address: str, tls: ClientTls, code: Any, details: str | None, refused_by: object
) -> str:
    """The line for a failed CheckNow. A refusal of the gate's (``refused_by``: the
    caller's token) reads as the other commands' do; one of the guard's names it."""
    import grpc

    from ..client import call_error

    text = details or code.name
    if code == grpc.StatusCode.PERMISSION_DENIED and refused_by is None:
        return f"refused by the on-demand guard: {text}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"the coordinator at {address} does not serve CheckNow: {text}"
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
        return text
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return str(call_error(address, tls, code, details))
    return f"CheckNow failed ({code.name}): {text}"


async def probe_here(check: AnyCheck) -> Here:
    """Probe ``check`` from this machine with the agent's probe, as an agent runs an
    on-demand check (``agent.ondemand.probe_once``), without a guard. A bug in a probe
    is an internal failure: it must not hide the coordinator's answer."""
    from agent.ondemand import probe_once
    from agent.probes import PROBES

    started_at = time.time()
    started = time.monotonic()
    outcome = await probe_once(PROBES[check.type], check)
    duration = time.monotonic() - started
    return Here(ProbeResult(check.name, check.revision, 0, started_at, duration, outcome))


async def _progress(target: str) -> None:
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        sys.stderr.write(
            f"\r\x1b[Kchecking {target[:60]} from the coordinator's agents and from here... "
            f"{elapsed:.0f}s"
        )
        sys.stderr.flush()
        await asyncio.sleep(_PROGRESS_EVERY)


# -- the answer -------------------------------------------------------------------------


def summary(response: Any, here: Here) -> tuple[str, str]:
    """(answer, one line): the answer is the verdict's state, or ``just_you`` when the
    agents see the target up and this machine does not."""
    verdict = response.verdict
    state = state_name(verdict.state)
    regions = sorted(verdict.regions.items())
    outcome = here.result.outcome
    local_class = outcome.failure.value if outcome.failure is not None else None
    if state == "up":
        up_agents = sum(view.up for _, view in regions)
        known = sum(1 for _, view in regions if region_state_name(view.state) == "up")
        evidence = f"from {_count(up_agents, 'agent')} in {_count(known, 'region')}"
        if here.failed:
            return "just_you", f"it's just you: up {evidence}, failing here ({local_class})"
        if not here.probed:
            return "up", f"up: {evidence} (not probed here: {outcome.message})"
        return "up", f"up: {evidence} and from here"
    if state == "global":
        down_agents = sum(view.down for _, view in regions)
        words = _failure_words(failure_name(verdict.failure))
        down = ", ".join(verdict.regions_down)
        line = f"down for everyone: {words} from {_count(down_agents, 'agent')} in {down}"
        return state, line + _here_note(here, state)
    if state == "regional":
        down_regions = [
            (name, view) for name, view in regions if region_state_name(view.state) == "down"
        ]
        up_regions = [name for name, view in regions if region_state_name(view.state) == "up"]
        if len(down_regions) == 1:
            name, view = down_regions[0]
            line = f"down in {name} only{_parenthesised(failure_name(view.failure))}"
        else:
            where = ", ".join(
                f"{name}{_parenthesised(failure_name(view.failure))}" for name, view in down_regions
            )
            line = f"down in {where}; up in {', '.join(up_regions)}"
        return state, line + _here_note(here, state)
    if state == "local":
        failing = [
            f"{result.agent}{_parenthesised(failure_name(result.result.failure))}"
            for result in response.results
            if not result.result.success
        ]
        counted = sum(view.up + view.down for _, view in regions)
        line = f"up, except from {len(failing)}/{counted} agents: {', '.join(failing)}"
        return state, line + _here_note(here, state)
    return state, f"{state}: {verdict.reason}" + _here_note(here, state)


def _here_note(here: Here, state: str) -> str:
    """What the local probe adds to a line about the agents' ``state``."""
    outcome = here.result.outcome
    if not here.probed:
        return f"; not probed here ({outcome.message})"
    if outcome.success:
        return "; but up from here" if state == "global" else "; up from here"
    if state == "global":
        return ""  # down for everyone: here is one of them
    failure = outcome.failure.value if outcome.failure is not None else "failing"
    too = "" if state == "unknown" else " too"
    return f"; failing here{too} ({failure})"


def region_rows(response: Any, here: Here) -> list[tuple[str, ...]]:
    """The table: one row per region of the verdict, then one for here."""
    rows: list[tuple[str, ...]] = [("REGION", "UP", "DOWN", "NO ANSWER", "FAILURE", "LATENCY")]
    durations: dict[str, list[float]] = {}
    for answer in response.results:
        if answer.result.success:
            durations.setdefault(answer.region, []).append(answer.result.duration_us / 1e6)
    for region, view in sorted(response.verdict.regions.items()):
        latency = durations.get(region)
        rows.append(
            (
                region,
                str(view.up),
                str(view.down),
                str(view.stale),
                failure_name(view.failure) or "-",
                _latency(statistics.median(latency)) if latency else "-",
            )
        )
    outcome = here.result.outcome
    if here.probed:
        rows.append(
            (
                "(here)",
                "1" if outcome.success else "0",
                "0" if outcome.success else "1",
                "0",
                outcome.failure.value if outcome.failure is not None else "-",
                _latency(here.result.duration) if outcome.success else "-",
            )
        )
    else:
        rows.append(("(here)", "-", "-", "-", "not probed", "-"))
    return rows


def check_json(target: str, response: Any, here: Here, answer: str, line: str) -> dict[str, Any]:
    """The ``--json`` object: the CheckNow response in the API's JSON shape
    (``vantage.public_json``: ``check``, ``verdict``, ``results``, ``missing``,
    ``unable``) plus ``target`` as typed, ``answer``, ``summary`` (the line) and ``here``
    (``probed`` and the local ``result``, shaped like an agent's)."""
    from vantage.public_json import message_json
    from vantage.wire import result_to_pb

    data: dict[str, Any] = {"target": target, "answer": answer, "summary": line}
    data.update(message_json(response))
    data["here"] = {"probed": here.probed, "result": message_json(result_to_pb(here.result))}
    return data


def _failure_words(failure: str | None) -> str:
    if failure is None:
        return "failing"
    return _FAILURE_WORDS.get(failure, failure)


def _parenthesised(failure: str | None) -> str:
    return f" ({failure})" if failure else ""


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _latency(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.1f}s"


__all__ = [
    "EXIT_NOT_UP",
    "EXIT_UP",
    "Here",
    "add_commands",
    "check_json",
    "probe_here",
    "run_check",
    "summary",
]
