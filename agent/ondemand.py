"""On-demand probes: the coordinator's ``ProbeRequest``s ("check now"), run once, at once.

Lifecycle: the link hands every ProbeRequest to ``submit`` (never blocks) and runs
``serve(send)`` beside its other tasks for as long as its stream lives; ``serve`` runs
each request in a task of its own and sends its ``ProbeResponse`` with ``send`` (on the
stream the request came on). When the stream ends, ``serve`` is cancelled and takes the
probes still running with it: their answers could not be delivered any more, and the
coordinator counts the agent missing.

Each request is validated as assignments are (``check_from_pb``); one that is invalid,
names a type this agent cannot probe, or carries an invalid guard is answered at once
with an ``internal`` failure saying so. The probe runs beside the scheduled ones (it is
not one of the agent's assignments: no sequence number, never in a ResultBatch), within
the check's timeout plus the scheduler's grace, with the request's guard
(``vantage.guard``) set for its task only (``agent.probes.network.ON_DEMAND_GUARD``):
every address it would connect to -- after the agent's own DNS resolution, on every
redirect -- is screened, and a refusal ends the probe and fills ``ProbeResponse.refused``.

At most ``max_in_flight`` requests are taken at once; past that a request is dropped
(the coordinator counts the agent missing) with a warning, at most one every
``DROP_LOG_PERIOD``. The coordinator bounds its own on-demand work well below that, so
only a misbehaving one gets there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import NoReturn

from structlog.typing import FilteringBoundLogger

from vantage.checks import AnyCheck
from vantage.durations import format_duration
from vantage.guard import AddressGuard, Screen
from vantage.logs import get_logger
from vantage.results import FailureClass, ProbeOutcome, ProbeResult
from vantage.wire import WireError, check_from_pb, result_to_pb
from vantage_proto.v1 import agent_pb2

from .probes import PROBES, ProbeFn
from .probes.network import ON_DEMAND_GUARD
from .scheduler import DEFAULT_GRACE

DEFAULT_MAX_IN_FLIGHT = 64
DROP_LOG_PERIOD = 10.0

Send = Callable[[agent_pb2.AgentMessage], Awaitable[None]]


class OnDemandProbes:
    """Runs on-demand ProbeRequests with ``probes`` (by type; by default every probe of
    this build). See the module docstring for the lifecycle."""

    def __init__(
        self,
        probes: Mapping[str, ProbeFn] = PROBES,
        *,
        agent: str = "",
        region: str = "",
        grace: float = DEFAULT_GRACE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self._probes = probes
        self._grace = grace
        self._max_in_flight = max_in_flight
        self._queue: asyncio.Queue[agent_pb2.ProbeRequest] | None = None
        self._taken = 0  # queued or running
        self._dropped = 0
        self._drop_logged_at = -DROP_LOG_PERIOD
        self._log = get_logger("agent.ondemand").bind(agent=agent, region=region)

    @property
    def dropped(self) -> int:
        """Requests dropped because ``max_in_flight`` were being run."""
        return self._dropped

    def submit(self, request: agent_pb2.ProbeRequest) -> None:
        """Take a request from the stream; it runs once ``serve`` runs (dropped when
        nothing serves, or when too many are in flight)."""
        queue = self._queue
        if queue is None:
            self._log.debug("probe request dropped: not serving", request_id=request.request_id)
            return
        if self._taken >= self._max_in_flight:
            self._dropped += 1
            now = time.monotonic()
            if now - self._drop_logged_at >= DROP_LOG_PERIOD:
                self._drop_logged_at = now
                self._log.warning(
                    "too many on-demand probes in flight: dropping requests",
                    max_in_flight=self._max_in_flight,
                    dropped_total=self._dropped,
                )
            return
        self._taken += 1
        queue.put_nowait(request)

    async def serve(self, send: Send) -> NoReturn:
        """Run what ``submit`` takes, answering each with ``send``, until cancelled
        (which cancels the probes still running). An error from ``send`` (the stream
        broke) ends it too."""
        queue = self._queue = asyncio.Queue()
        self._taken = 0
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    request = await queue.get()
                    group.create_task(self._answer(request, send), name="on-demand probe")
        finally:
            self._queue = None
            self._taken = 0
        raise AssertionError("the on-demand loop ended")  # pragma: no cover

    async def _answer(self, request: agent_pb2.ProbeRequest, send: Send) -> None:
        try:
            response = await self.run(request)
        finally:
            self._taken -= 1
        await send(agent_pb2.AgentMessage(probe_response=response))

    async def run(self, request: agent_pb2.ProbeRequest) -> agent_pb2.ProbeResponse:
        """Run one request and return its response; never raises for what the request,
        the target or the network does."""
        name = request.check.name
        try:
            check = check_from_pb(request.check)
        except (WireError, ValueError) as exc:
            return self._failed(request, name, f"invalid on-demand check: {exc}")
        probe = self._probes.get(check.type)
        if probe is None:
            return self._failed(request, name, f"this agent cannot run {check.type} probes")
        screen: Screen | None = None
        if request.guard.enabled:
            try:
                guard = AddressGuard.of(request.guard.allow, strict=False)
            except ValueError as exc:
                return self._failed(request, name, f"invalid on-demand guard: {exc}")
            screen = Screen(guard)
        started_at = time.time()
        started = time.monotonic()
        outcome = await self._probe(probe, check, screen)
        duration = time.monotonic() - started
        result = ProbeResult(check.name, request.check.revision, 0, started_at, duration, outcome)
        response = agent_pb2.ProbeResponse(request_id=request.request_id)
        response.result.CopyFrom(result_to_pb(result))
        if screen is not None and screen.refused:
            response.refused = screen.refused
            self._log.info(
                "on-demand probe refused by the guard", check=check.name, why=screen.refused
            )
        else:
            self._log.debug(
                "on-demand probe done",
                check=check.name,
                target=check.target,
                success=outcome.success,
                failure=outcome.failure,
            )
        return response

    async def _probe(self, probe: ProbeFn, check: AnyCheck, screen: Screen | None) -> ProbeOutcome:
        """The probe's outcome, with ``screen`` as the guard of this task's context."""
        # Set in this context (the request's task, and the tasks the probe starts) and
        # taken back after: no other run ever sees it.
        token = ON_DEMAND_GUARD.set(screen)
        try:
            return await probe_once(probe, check, grace=self._grace, log=self._log)
        finally:
            ON_DEMAND_GUARD.reset(token)

    def _failed(
        self, request: agent_pb2.ProbeRequest, name: str, message: str
    ) -> agent_pb2.ProbeResponse:
        self._log.warning("on-demand probe not run", why=message, check=name[:128])
        outcome = ProbeOutcome.failed(FailureClass.INTERNAL, message[:1024])
        result = ProbeResult(name[:128], request.check.revision, 0, time.time(), 0.0, outcome)
        response = agent_pb2.ProbeResponse(request_id=request.request_id)
        response.result.CopyFrom(result_to_pb(result))
        return response


async def probe_once(
    probe: ProbeFn,
    check: AnyCheck,
    *,
    grace: float = DEFAULT_GRACE,
    log: FilteringBoundLogger | None = None,
) -> ProbeOutcome:
    """Run ``probe`` on ``check`` once, cut off at the check's timeout plus ``grace`` as
    the scheduler cuts off its runs: an overrun is a timeout, a probe that raises (a bug)
    is internal, logged with its traceback on ``log`` when given. On-demand checks run
    with it, and ``vantage check``'s probe from the user's machine."""
    try:
        async with asyncio.timeout(check.timeout + grace):
            return await probe(check)
    except TimeoutError:
        return ProbeOutcome.failed(
            FailureClass.TIMEOUT,
            f"probe did not finish within its timeout of {format_duration(check.timeout)}",
        )
    except Exception as exc:
        if log is not None:
            log.exception("on-demand probe raised", check=check.name)
        return ProbeOutcome.failed(
            FailureClass.INTERNAL, f"probe failed: {type(exc).__name__}: {exc}"
        )
