"""The agent-facing service (``vantage.v1.AgentService``): one long-lived stream per agent.

Lifecycle of a ``Connect`` stream, as the coordinator runs it:

0. While the coordinator drains (SIGTERM), every stream is refused with UNAVAILABLE.
1. **Authenticate** from the ``authorization: Bearer <token>`` metadata (or the client
   certificate standing in for it; ``coordinator.auth``), before anything else: a
   missing, malformed, unknown or revoked token ends the stream with UNAUTHENTICATED.
2. **Hello** must come first, within ``HELLO_TIMEOUT``, with a valid name and region;
   otherwise INVALID_ARGUMENT. A name or region other than the token's ends the stream
   with PERMISSION_DENIED. A refused stream creates no fleet or engine state; it is
   logged (peer and, when the agent sent one, the name and region it claimed) and
   counted.
3. The agent joins the fleet (replacing an older stream with its name, which ends with
   ABORTED) and the engine, and is sent Welcome (with the highest sequence number already
   handled for its instance) and its full assignments.
4. Then, in any order: a ResultBatch is folded in and acknowledged with the highest
   sequence number handled; a Heartbeat is answered; both carry the agent's own counters;
   check set changes are pushed as incremental Assignments; second opinions the engine
   asks for are sent as Recheck; on-demand ProbeRequests go out (``send_probe``) and their
   ProbeResponses go to ``coordinator.ondemand``, which also hears of the stream's end.
   Every one of these events is applied by ``coordinator.state``, the one owner of the
   engine, fleet, registry and store; this module is the stream mechanics.
5. The stream ends when the agent closes it, is silent for ``SILENCE_HEARTBEATS``
   heartbeat intervals (UNAVAILABLE), is replaced (ABORTED), stops reading so that its
   outbox fills (RESOURCE_EXHAUSTED), sends a message over ``limits.max_message_bytes``
   (RESOURCE_EXHAUSTED, by ``coordinator.gate``), its token is revoked
   (UNAUTHENTICATED), or the coordinator drains (UNAVAILABLE: reconnect later) or stops.
   Whatever the cause, the agent is marked disconnected in the fleet and, unless the
   coordinator is stopping, leaves the engine.

**Pacing.** Each stream has a budget of messages (``limits.agent_message_rate``) and of
results (``limits.agent_result_rate``: by default four times what the agent's checks
produce on schedule). Above it the next message is read only once the budget allows
(gRPC's flow control holds the agent back), with a heartbeat to the agent every
heartbeat interval meanwhile so that it does not give up on a silent coordinator. Every
delayed message counts in ``vantage_requests_refused_total{endpoint="agent",
reason="throttled"}``; one warning per episode names the agent.

Results are dropped (and counted in ``vantage_results_dropped_total``) when they do not
convert (``invalid``), name a check not currently assigned (``unassigned``) or have a
sequence number at or below the highest already handled for that agent instance
(``duplicate``, also across the coordinator's restarts). Dropped results are still
acknowledged: the agent must not replay them.

Everything here runs on the event loop; state calls are synchronous, so the state they
see never changes under them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeAlias

import grpc
from structlog.typing import FilteringBoundLogger

from vantage import __version__, names
from vantage.client import REFUSAL_METADATA
from vantage.logs import get_logger
from vantage.wire import check_to_pb
from vantage_proto.v1 import agent_pb2, agent_pb2_grpc

from .auth import Authenticator, AuthError, Principal, bearer_token, certificate_names
from .fleet import AgentHello
from .limits import LimitsConfig, TokenBucket
from .metrics import CoordinatorMetrics
from .ondemand import OnDemandChecks
from .registry import CheckChange, CheckRegistry
from .state import MAX_FIELD, CoordinatorState

if TYPE_CHECKING:
    from grpc import aio

    Context: TypeAlias = aio.ServicerContext[agent_pb2.AgentMessage, agent_pb2.CoordinatorMessage]

log = get_logger("coordinator.agents")

HELLO_TIMEOUT = 10.0
# How long a refused peer gets to send the Hello that names it, for the log line only.
REFUSED_HELLO_TIMEOUT = 2.0
# An agent heartbeats every interval when idle; this many missed in a row ends its stream.
SILENCE_HEARTBEATS = 3
# Messages waiting to be written to one agent. Acks and heartbeat answers are small and
# the agent reads continuously; a full outbox means it stopped reading.
OUTBOX_CAPACITY = 256
MAX_CAPABILITIES = 32
_US = 1_000_000


class _StreamEnd(Exception):
    """Ends the stream's tasks; ``code`` None is a clean end (the agent closed)."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _AgentStream:
    """The coordinator's side of one agent stream: a bounded outbox and an end signal.

    ``send`` never blocks; ``transmit`` writes the outbox in order. ``end`` ends the stream
    at once with a status (even while a write is stuck on an agent that stopped reading);
    ``finish`` ends it cleanly once everything queued so far has been written.
    """

    def __init__(
        self,
        checks: CheckRegistry,
        stream_log: FilteringBoundLogger,
        limits: LimitsConfig,
        heartbeat_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.messages = TokenBucket(
            limits.agent_message_rate, limits.agent_message_burst, clock=clock
        )
        self.results = TokenBucket(*limits.result_rate(checks.scheduled_rate, len(checks)))
        self._limits = limits
        self._heartbeat_interval = heartbeat_interval
        self.throttled = False
        # None in the outbox: finish cleanly after the messages queued before it.
        self._outbox: asyncio.Queue[agent_pb2.CoordinatorMessage | None] = asyncio.Queue(
            maxsize=OUTBOX_CAPACITY
        )
        self._checks = checks
        self._log = stream_log
        self._ending: _StreamEnd | None = None
        self._ended = asyncio.Event()

    def send(self, message: agent_pb2.CoordinatorMessage | None) -> None:
        if self._ending is not None:
            return
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.end(
                f"agent not reading: {OUTBOX_CAPACITY} messages waiting",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )

    def finish(self) -> None:
        self.send(None)

    def welcome(self, last_seq: int) -> None:
        self.send(
            agent_pb2.CoordinatorMessage(
                welcome=agent_pb2.Welcome(
                    coordinator_version=__version__,
                    heartbeat_interval_ms=round(self._heartbeat_interval * 1000),
                    last_seq=last_seq,
                )
            )
        )
        self.assign_all()

    def acknowledge(self, seq: int) -> None:
        self.send(agent_pb2.CoordinatorMessage(ack=agent_pb2.ResultAck(seq=seq)))

    def assign(self, change: CheckChange) -> None:
        """Send a check set change (the registry holds the new set already), and take
        the result budget of the new set."""
        self.results.set_rate(
            *self._limits.result_rate(self._checks.scheduled_rate, len(self._checks))
        )
        self.send(
            agent_pb2.CoordinatorMessage(
                assignments=agent_pb2.Assignments(
                    full=False,
                    checks=[check_to_pb(check) for check in change.upserts],
                    removed=change.removed,
                )
            )
        )

    def assign_all(self) -> None:
        self.send(
            agent_pb2.CoordinatorMessage(
                assignments=agent_pb2.Assignments(
                    full=True, checks=[check_to_pb(check) for check in self._checks]
                )
            )
        )

    def recheck(self, checks: Sequence[str]) -> None:
        self.send(agent_pb2.CoordinatorMessage(recheck=agent_pb2.Recheck(checks=checks)))

    def end(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.ABORTED) -> None:
        if self._ending is not None:
            return
        self._ending = _StreamEnd(code, reason)
        self._log.info("ending agent stream", why=reason, code=code.name)
        while not self._outbox.empty():  # nobody will write these; free them now
            self._outbox.get_nowait()
        self._ended.set()

    async def transmit(self, context: Context) -> NoReturn:
        while True:
            message = await self._outbox.get()
            if message is None:
                raise _StreamEnd(None, "agent closed the stream")
            await context.write(message)

    async def wait_end(self) -> NoReturn:
        await self._ended.wait()
        assert self._ending is not None
        raise self._ending


class AgentService(agent_pb2_grpc.AgentServiceServicer):
    """Servicer for ``vantage.v1.AgentService``; see the module docstring for the lifecycle.

    Stream mechanics only: every event of a stream (connect, results, heartbeat,
    disconnect) is applied by ``state`` (``coordinator.state``).
    """

    def __init__(
        self,
        *,
        state: CoordinatorState,
        authenticator: Authenticator,
        metrics: CoordinatorMetrics,
        heartbeat_interval: float,
        limits: LimitsConfig | None = None,
        clock: Callable[[], float] = time.time,
        on_demand: OnDemandChecks | None = None,
    ) -> None:
        self._on_demand = on_demand
        self._state = state
        self._auth = authenticator
        self._limits = limits or LimitsConfig()
        self._metrics = metrics
        self._heartbeat_interval = heartbeat_interval
        self._clock = clock
        self._streams: set[_AgentStream] = set()
        self._draining: str | None = None  # why new streams are refused, once draining
        self._none_open = asyncio.Event()
        self._none_open.set()

    def send_probe(self, agent: str, request: agent_pb2.ProbeRequest) -> object | None:
        """Send an on-demand ProbeRequest on ``agent``'s live stream (never blocks);
        returns that stream, or None when the agent is not connected."""
        link = self._state.fleet.link(agent)
        if not isinstance(link, _AgentStream):
            return None
        link.send(agent_pb2.CoordinatorMessage(probe_request=request))
        return link

    def drain(self, reason: str) -> int:
        """End every agent stream with UNAVAILABLE and ``reason``, and refuse new ones so
        (agents reconnect with backoff: here once the coordinator is back); returns how
        many streams were open."""
        self._draining = reason
        streams = list(self._streams)
        for stream in streams:
            stream.end(reason, grpc.StatusCode.UNAVAILABLE)
        return len(streams)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def all_ended(self) -> None:
        """Return once no agent stream is open (after ``drain``: once all have ended)."""
        await self._none_open.wait()

    async def Connect(  # type: ignore[override]  # a coroutine writing via context.write
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: Context
    ) -> None:
        peer = context.peer()
        if self._draining is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._draining)
        messages = aiter(request_iterator)
        try:
            principal = self._auth.agent(
                bearer_token(context.invocation_metadata()),
                certificate_names(context.auth_context()),
            )
        except AuthError as exc:
            claimed = await _claimed_hello(messages)
            await self._refuse(context, peer, claimed, exc)
        hello = await self._read_hello(messages, context, peer)
        try:
            self._auth.admit_agent(principal, hello.name, hello.region)
        except AuthError as exc:
            await self._refuse(context, peer, hello, exc, principal)
        await self._serve(hello, principal, messages, context, peer)

    async def _refuse(
        self,
        context: Context,
        peer: str,
        hello: AgentHello | None,
        error: AuthError,
        principal: Principal | None = None,
    ) -> NoReturn:
        self._metrics.auth_failed()
        self._metrics.refused("agent", error.reason)
        log.warning(
            "agent refused",
            why=error.message,
            code=error.code.name,
            peer=peer,
            token=None if principal is None else principal.name,
            agent=None if hello is None else hello.name,
            region=None if hello is None else hello.region,
        )
        await context.abort(
            error.code,
            error.message,
            trailing_metadata=((REFUSAL_METADATA, error.reason),),
        )

    async def _read_hello(
        self,
        messages: AsyncIterator[agent_pb2.AgentMessage],
        context: Context,
        peer: str,
    ) -> AgentHello:
        problem: str
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await anext(messages)
        except TimeoutError:
            problem = f"no Hello within {HELLO_TIMEOUT:g}s"
        except StopAsyncIteration:
            problem = "stream closed before Hello"
        else:
            if first.WhichOneof("kind") != "hello":
                problem = f"the first message must be Hello, not {first.WhichOneof('kind')}"
            else:
                try:
                    return _hello_from_pb(first.hello)
                except ValueError as exc:
                    problem = str(exc)
        log.warning("agent hello refused", peer=peer, why=problem)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    async def _serve(
        self,
        hello: AgentHello,
        principal: Principal,
        messages: AsyncIterator[agent_pb2.AgentMessage],
        context: Context,
        peer: str,
    ) -> None:
        stream_log: FilteringBoundLogger = log.bind(
            agent=hello.name, region=hello.region, instance_id=hello.instance_id
        )
        state = self._state
        stream = _AgentStream(state.checks, stream_log, self._limits, self._heartbeat_interval)
        session = self._auth.open_session(
            principal,
            lambda why: stream.end(why, grpc.StatusCode.UNAUTHENTICATED),
            capped=False,
        )
        self._metrics.stream_opened()
        self._streams.add(stream)
        self._none_open.clear()
        ending: _StreamEnd | None = None
        try:
            # Welcome and the full assignments are queued here, synchronously with the
            # fleet entry, so a reload can only queue its change after this full set.
            replaced = state.agent_connected(hello, stream)
            last_seq = state.fleet.last_seq(hello.name, hello.instance_id)
            stream_log.info(
                "agent connected",
                peer=peer,
                token=principal.name,
                via=principal.via,
                version=hello.version,
                capabilities=list(hello.capabilities),
                last_seq=last_seq,
                replaced=replaced is not None,
            )
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._receive(hello, messages, stream, stream_log))
                    tasks.create_task(stream.transmit(context))
                    tasks.create_task(stream.wait_end())
            except* _StreamEnd as group:
                first = group.exceptions[0]
                assert isinstance(first, _StreamEnd)
                ending = first
        finally:
            # Synchronous on purpose: this also runs when the RPC is cancelled.
            self._auth.close_session(session)
            self._metrics.stream_closed()
            self._streams.discard(stream)
            if not self._streams:
                self._none_open.set()
            if self._on_demand is not None:
                self._on_demand.stream_ended(hello.name, stream)
            if state.agent_disconnected(hello, stream):
                stream_log.info(
                    "agent disconnected", why=ending.details if ending else "stream cancelled"
                )
        if ending is not None and ending.code is not None:
            await context.abort(ending.code, ending.details)

    async def _receive(
        self,
        hello: AgentHello,
        messages: AsyncIterator[agent_pb2.AgentMessage],
        stream: _AgentStream,
        stream_log: FilteringBoundLogger,
    ) -> NoReturn:
        silence = SILENCE_HEARTBEATS * self._heartbeat_interval
        while True:
            try:
                async with asyncio.timeout(silence):
                    message = await anext(messages)
            except TimeoutError:
                raise _StreamEnd(
                    grpc.StatusCode.UNAVAILABLE, f"no message from the agent for {silence:g}s"
                ) from None
            except StopAsyncIteration:
                # The agent is done sending: deliver what is queued (acks), then end. An
                # agent that also stops reading cannot hold the stream open for long.
                stream.finish()
                await asyncio.sleep(silence)
                raise _StreamEnd(
                    grpc.StatusCode.UNAVAILABLE, "agent closed its side and stopped reading"
                ) from None
            self._state.seen(hello.name)
            kind = message.WhichOneof("kind")
            wait = stream.messages.debit(1)
            if kind == "results":
                wait = max(wait, stream.results.debit(len(message.results.results)))
            if wait > 0:
                await self._pace(hello, stream, stream_log, wait)
            elif stream.throttled:
                stream.throttled = False
                stream_log.info("agent back within its message and result rates")
            if kind == "results":
                self._state.results(hello, stream, message.results, stream_log)
            elif kind == "heartbeat":
                self._state.heartbeat(hello, message.heartbeat.counters)
                now_us = round(self._clock() * _US)
                stream.send(
                    agent_pb2.CoordinatorMessage(heartbeat=agent_pb2.Heartbeat(sent_unix_us=now_us))
                )
            elif kind == "hello":
                raise _StreamEnd(grpc.StatusCode.INVALID_ARGUMENT, "Hello sent twice")
            elif kind == "probe_response" and self._on_demand is not None:
                self._on_demand.answered(hello.name, stream, message.probe_response)
            else:
                stream_log.debug("agent message ignored", kind=kind)

    async def _pace(
        self,
        hello: AgentHello,
        stream: _AgentStream,
        stream_log: FilteringBoundLogger,
        wait: float,
    ) -> None:
        """Hold the stream for ``wait`` seconds (the agent is over its budget), telling
        the agent the coordinator is alive every heartbeat interval meanwhile."""
        self._metrics.refused("agent", "throttled")
        if not stream.throttled:
            stream.throttled = True
            stream_log.warning(
                "agent over its message or result rate: pacing its stream",
                wait=round(wait, 3),
                message_rate=self._limits.agent_message_rate,
                result_rate=round(
                    self._limits.result_rate(
                        self._state.checks.scheduled_rate, len(self._state.checks)
                    )[0],
                    1,
                ),
            )
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        while (left := until - loop.time()) > 0:
            await asyncio.sleep(min(left, self._heartbeat_interval))
            if until - loop.time() > 0:
                now_us = round(self._clock() * _US)
                stream.send(
                    agent_pb2.CoordinatorMessage(heartbeat=agent_pb2.Heartbeat(sent_unix_us=now_us))
                )


def _hello_from_pb(message: agent_pb2.Hello) -> AgentHello:
    """Validate a Hello; ValueError (one line) naming the bad field."""
    names.agent_name(message.name)
    names.agent_name(message.region, "region")
    return AgentHello(
        name=message.name,
        region=message.region,
        version=message.version[:MAX_FIELD],
        capabilities=tuple(c[:MAX_FIELD] for c in message.capabilities[:MAX_CAPABILITIES]),
        instance_id=message.instance_id[:MAX_FIELD],
    )


async def _claimed_hello(messages: AsyncIterator[agent_pb2.AgentMessage]) -> AgentHello | None:
    """The Hello a refused peer sends, if it comes soon and is valid; only for the log."""
    try:
        async with asyncio.timeout(REFUSED_HELLO_TIMEOUT):
            first = await anext(messages)
        return _hello_from_pb(first.hello) if first.WhichOneof("kind") == "hello" else None
    except (TimeoutError, StopAsyncIteration, ValueError, grpc.RpcError):
        return None
