"""On-demand checks ("check now"): probe any target once, now, from every connected agent.

Lifecycle of one ``OnDemandChecks.check_now`` (what ``QueryService.CheckNow`` serves):

1. **The check.** The target and type become a check of the ordinary model
   (``vantage.targets``), named ``checknow-<id>``, with the request's timeout (a default
   when 0, at most ``on_demand.max_timeout``). INVALID_ARGUMENT otherwise.
2. **Rate limit.** A token bucket per caller (``coordinator.auth.Principal.key``: its
   token, or its address where queries need none): ``on_demand.rate`` tokens a second
   up to ``on_demand.burst``, in a table of at most ``limits.MAX_CLIENTS`` callers (the
   least recently seen go first). RESOURCE_EXHAUSTED saying when to retry.
3. **Bounded work.** At most ``on_demand.max_in_flight`` checks at once, whoever asks;
   RESOURCE_EXHAUSTED past it.
4. **The guard** (``vantage.guard``; on unless ``on_demand.guard: false``): the target's
   host is resolved with the coordinator's resolver and every address it gets must be
   allowed; PERMISSION_DENIED naming the address and why otherwise. A name that does not
   resolve here goes on: the agents will say what they find.
5. **Asking.** A ``ProbeRequest`` carrying the check and the guard goes to every
   connected agent that announced the check's type in its Hello, over its stream; the
   others are ``unable``.
6. **Collecting** until every agent asked has answered or left, or the deadline: the
   timeout plus ``ANSWER_MARGIN`` for the round trips. Agents that did not answer by
   then, or whose stream ended first, are ``missing``.
7. **Judging.** An agent's guard that refused (``ProbeResponse.refused``) makes the whole
   call PERMISSION_DENIED, naming the agent, the address and why, as soon as it
   arrives. Otherwise the answers are judged with the verdict engine's own rules for
   regions and verdicts (``coordinator.judgement.judge``) and the coordinator's ``engine:``
   thresholds: a success is an agent up, a failure an agent down, a missing agent counts
   as stale in its region. Nothing else goes in: not the engine's state of any check,
   not which agents it judges impaired.

Concurrent checks are independent (one table entry each, keyed by request id). A client
that cancels its call ends only its own wait: what the agents run is theirs to finish,
and answers that come for a request no longer waited for are dropped (debug log). Agents'
scheduled work is never touched.

Errors: ``OnDemandError`` carries the gRPC status code and the one line for the client;
the servicer aborts the call with them.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vantage.checks import AnyCheck, Seconds
from vantage.durations import duration_within, format_duration
from vantage.guard import AddressGuard, refusal_message
from vantage.logs import get_logger
from vantage.results import ProbeResult
from vantage.targets import DEFAULT_TIMEOUT, TargetError, on_demand_check, target_host
from vantage.wire import WireError, check_to_pb, result_from_pb, result_to_pb
from vantage_proto.v1 import agent_pb2, query_pb2

from .fleet import AgentFleet
from .judgement import EngineSettings, RegionTally, judge
from .limits import Rate, RateLimiter, format_rate, retry_after
from .verdicts import Verdict
from .wire import verdict_to_pb

log = get_logger("coordinator.ondemand")

# Time past the probe's timeout to wait for answers: the request's and the answer's trip
# over the agents' streams, and the agent's own grace for cutting a probe off.
ANSWER_MARGIN = 2.0
# How long the guard waits for the coordinator's resolver, at most.
RESOLVE_TIMEOUT = 5.0
MIN_TIMEOUT = 0.1
MAX_TIMEOUT = 60.0


class OnDemandConfig(BaseModel):
    """The coordinator's ``on_demand:`` settings (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    guard: bool = True
    allow: tuple[str, ...] = ()
    rate: Rate = 10 / 60
    burst: int = Field(default=5, ge=1, le=10_000)
    max_in_flight: int = Field(default=16, ge=1, le=1_000)
    max_timeout: Seconds = 30.0

    @field_validator("allow")
    @classmethod
    def _allow_is_cidrs(cls, allow: tuple[str, ...]) -> tuple[str, ...]:
        AddressGuard.of(allow)  # ValueError naming the bad entry
        return allow

    @field_validator("max_timeout")
    @classmethod
    def _max_timeout_in_range(cls, seconds: float) -> float:
        return duration_within(seconds, MIN_TIMEOUT, MAX_TIMEOUT)

    def address_guard(self) -> AddressGuard | None:
        """The guard these settings ask for; None when it is off."""
        return AddressGuard.of(self.allow) if self.guard else None


class OnDemandError(Exception):
    """A check-now call refused or failed: ``code`` for the gRPC status, ``str()`` one
    line for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


SendProbe = Callable[[str, agent_pb2.ProbeRequest], object | None]
"""Sends a ProbeRequest on the named agent's live stream; returns that stream (anything
that tells it from a later one of the same agent), or None when the agent is not
connected. ``AgentService.send_probe``."""


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """One agent's result for an on-demand check."""

    agent: str
    region: str
    result: ProbeResult


@dataclass(frozen=True, slots=True)
class CheckNowAnswer:
    """What a check-now call found: the check as the agents ran it, the verdict judged
    from these answers alone, every answer, and who did not (could not) answer."""

    check: AnyCheck
    verdict: Verdict
    answers: tuple[AgentAnswer, ...]
    missing: tuple[str, ...]
    unable: tuple[str, ...]


@dataclass(slots=True)
class _Pending:
    """One check-now call waiting for answers."""

    check: AnyCheck
    regions: dict[str, str]  # every agent asked -> its region
    streams: dict[str, object]  # agents still to answer -> the stream they were asked on
    answers: dict[str, ProbeResult] = field(default_factory=dict)
    refusal: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self, agent: str) -> None:
        self.streams.pop(agent, None)
        if not self.streams:
            self.done.set()


class OnDemandChecks:
    """Check-now calls and the agents' answers to them. Runs on the event loop: the
    agent service hands it every ``ProbeResponse`` (``answered``) and every stream's end
    (``stream_ended``); ``check_now`` serves one call."""

    def __init__(
        self,
        config: OnDemandConfig,
        engine: EngineSettings,
        *,
        fleet: AgentFleet,
        send: SendProbe,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._engine = engine
        self._fleet = fleet
        self._send = send
        self._clock = clock
        self._guard = config.address_guard()
        self._limiter = RateLimiter(config.rate, config.burst, clock=monotonic)
        self._pending: dict[str, _Pending] = {}
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Check-now calls being served."""
        return self._in_flight

    async def check_now(
        self, target: str, probe_type: str, timeout_ms: int, client: str
    ) -> CheckNowAnswer:
        """Serve one check-now call from ``client`` (what its rate limit keys on: its
        token, or its address; see the module docstring); OnDemandError when refused."""
        request_id = uuid.uuid4().hex[:16]
        check = self._check(target, probe_type, timeout_ms, f"checknow-{request_id}")
        wait = self._limiter.take(client)
        if wait:
            log.info("check-now refused: rate limit", client=client, target=target[:256])
            raise OnDemandError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit reached: {format_rate(self.config.rate)} on-demand checks per "
                f"caller (burst {self.config.burst}); {retry_after(wait)}",
            )
        if self._in_flight >= self.config.max_in_flight:
            raise OnDemandError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._in_flight} on-demand checks are running, the most this coordinator "
                "runs at once (on_demand.max_in_flight); retry in a few seconds",
            )
        self._in_flight += 1
        started = time.monotonic()
        try:
            await self._screen(check)
            answer = await self._ask(request_id, check)
        except OnDemandError as exc:
            log.info(
                "check-now refused",
                client=client,
                check=check.name,
                target=check.target,
                code=exc.code.name,
                why=exc.message,
            )
            raise
        finally:
            self._in_flight -= 1
        log.info(
            "check-now answered",
            client=client,
            check=check.name,
            type=check.type,
            target=check.target,
            state=answer.verdict.state.value,
            answered=len(answer.answers),
            missing=list(answer.missing),
            unable=list(answer.unable),
            seconds=round(time.monotonic() - started, 3),
        )
        return answer

    def answered(self, agent: str, stream: object, response: agent_pb2.ProbeResponse) -> None:
        """An agent's ProbeResponse, from its stream ``stream``. Dropped (debug log) when
        nobody waits for it any more, when it was not asked of this agent on this stream,
        or when it does not convert (warning)."""
        pending = self._pending.get(response.request_id)
        if pending is None or pending.streams.get(agent) is not stream:
            log.debug(
                "on-demand answer dropped: not waited for",
                agent=agent,
                request_id=response.request_id[:64],
            )
            return
        refused = response.refused[:512]
        if refused:
            pending.refusal = pending.refusal or f"agent {agent} refused: {refused}"
            pending.done.set()
            return
        try:
            result = _result_from_pb(response.result, pending.check.name)
        except WireError as exc:
            log.warning("on-demand answer dropped: invalid", agent=agent, error=str(exc))
            return
        pending.answers[agent] = result
        pending.settle(agent)

    def stream_ended(self, agent: str, stream: object) -> None:
        """``agent``'s stream ``stream`` ended: what was asked on it will not be answered."""
        for pending in self._pending.values():
            if pending.streams.get(agent) is stream:
                pending.settle(agent)

    def _check(self, target: str, probe_type: str, timeout_ms: int, name: str) -> AnyCheck:
        limit = self.config.max_timeout
        if timeout_ms:
            timeout = timeout_ms / 1000
            if timeout > limit:
                raise OnDemandError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"timeout {format_duration(timeout)} is above the maximum of "
                    f"{format_duration(limit)} (on_demand.max_timeout)",
                )
        else:
            timeout = min(DEFAULT_TIMEOUT, limit)
        try:
            return on_demand_check(target, probe_type, timeout, name)
        except TargetError as exc:
            raise OnDemandError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    async def _screen(self, check: AnyCheck) -> None:
        """PERMISSION_DENIED when the guard refuses an address of the target's host."""
        guard = self._guard
        host = target_host(check)
        if guard is None or host is None:
            return
        for address in await _addresses(host, min(check.timeout, RESOLVE_TIMEOUT)):
            why = guard.reason(address)
            if why is not None:
                message = refusal_message(address, why, host)
                raise OnDemandError(grpc.StatusCode.PERMISSION_DENIED, message)

    async def _ask(self, request_id: str, check: AnyCheck) -> CheckNowAnswer:
        message = agent_pb2.ProbeRequest(request_id=request_id, check=check_to_pb(check))
        if self._guard is not None:
            message.guard.enabled = True
            message.guard.allow.extend(self._guard.cidrs)
        regions: dict[str, str] = {}
        streams: dict[str, object] = {}
        unable: list[str] = []
        for agent in self._fleet.agents():
            if not agent.connected:
                continue
            if check.type not in agent.capabilities:
                unable.append(agent.name)
                continue
            stream = self._send(agent.name, message)
            if stream is None:
                continue  # gone since the listing: not asked
            regions[agent.name] = agent.region
            streams[agent.name] = stream
        pending = _Pending(check, regions, streams)
        if not streams:
            pending.done.set()
        self._pending[request_id] = pending
        try:
            async with asyncio.timeout(check.timeout + ANSWER_MARGIN):
                await pending.done.wait()
        except TimeoutError:
            pass  # whoever has not answered is missing
        finally:
            del self._pending[request_id]
        if pending.refusal is not None:
            raise OnDemandError(grpc.StatusCode.PERMISSION_DENIED, pending.refusal)
        return self._judged(pending, tuple(sorted(unable)))

    def _judged(self, pending: _Pending, unable: tuple[str, ...]) -> CheckNowAnswer:
        check = pending.check
        tallies: dict[str, RegionTally] = {}
        missing: list[str] = []
        for agent, region in pending.regions.items():
            tally = tallies.get(region)
            if tally is None:
                tally = tallies[region] = RegionTally()
            result = pending.answers.get(agent)
            if result is None:
                tally.stale += 1
                missing.append(agent)
            elif result.outcome.success:
                tally.up += 1
            else:
                tally.failing.append((agent, result.outcome.failure))
        judgement = judge(self._engine, tallies, [])
        reason = judgement.reason
        if not pending.regions:
            if unable:
                reason = f"no connected agent can run {check.type} probes ({_listed(unable)})"
            else:
                reason = "no agent is connected"
        elif missing:
            reason = f"{reason}; no answer from {_listed(sorted(missing))}"
        verdict = Verdict(
            check=check.name,
            state=judgement.state,
            since=self._clock(),
            regions=judgement.regions,
            regions_down=judgement.regions_down,
            failure=judgement.failure,
            reason=reason,
        )
        answers = tuple(
            AgentAnswer(agent, pending.regions[agent], result)
            for agent, result in sorted(pending.answers.items())
        )
        return CheckNowAnswer(check, verdict, answers, tuple(sorted(missing)), unable)


async def _addresses(host: str, within: float) -> list[str]:
    """The addresses ``host`` resolves to here (itself for an IP address); none when it
    does not resolve within ``within`` seconds."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _result_from_pb(message: agent_pb2.ProbeResult, check: str) -> ProbeResult:
    """Validate an on-demand result as scheduled results are validated (bounded text,
    consistent failure class); it carries no sequence number of the agent's."""
    if message.check != check:
        raise WireError(f"answer for check {message.check[:128]!r}, not {check!r}")
    return result_from_pb(message, numbered=False)


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    if len(names) > 5:
        return ", ".join(names[:5]) + f" and {len(names) - 5} more"
    return ", ".join(names)


def answer_to_pb(answer: CheckNowAnswer) -> query_pb2.CheckNowResponse:
    """The CheckNow response for ``answer``."""
    return query_pb2.CheckNowResponse(
        check=check_to_pb(answer.check),
        verdict=verdict_to_pb(answer.verdict),
        results=[
            query_pb2.AgentProbe(agent=a.agent, region=a.region, result=result_to_pb(a.result))
            for a in answer.answers
        ],
        missing=answer.missing,
        unable=answer.unable,
    )
