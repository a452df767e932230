"""The coordinator link: one long-lived gRPC stream that carries the agent's results out
and its assignments in, kept alive across coordinator restarts and network trouble.

Lifecycle: ``await link.run()`` runs until cancelled or until the coordinator refuses the
agent for good (``FatalError``). Each stream goes:

1. dial ``host:port`` (TLS or plaintext as ``tls`` says: ``vantage.tls.ClientTls``, its
   files read again at each dial, so renewed certificates are picked up), call
   ``AgentService.Connect`` with the token in the ``authorization: Bearer`` metadata
   (none when the client certificate stands in for it), send ``Hello``;
2. wait for ``Welcome``: forget buffered results at or below its ``last_seq``, adopt its
   heartbeat interval, then send every result still unacknowledged, oldest first;
3. then, concurrently: send ``ResultBatch``es (up to ``batch_size`` results, or whatever
   arrived within ``batch_interval``) and a ``Heartbeat`` when idle for the heartbeat
   interval; apply ``Assignments`` to the scheduler; hand a ``Recheck``'s names to the
   scheduler to probe at once (``run_now``); run a ``ProbeRequest`` (an on-demand check)
   at once and answer it with a ``ProbeResponse`` (``agent.ondemand``; probes still
   running when the stream ends go with it); forget acknowledged results. The
   coordinator acknowledges every batch and answers every heartbeat: one left unanswered
   for ``reply_timeout`` means the coordinator went silent, and the stream is abandoned.

Results are read from the agent's result store (``agent.buffer.ResultStore``: the disk
spool, ``agent.spool``, or memory; the scheduler fills it, connected or not) and stay
there until acknowledged. Every heartbeat and batch carries the agent's counters (results
the store dropped when full, runs skipped) so the coordinator can show them.

Errors (see ``agent.errors``)::

    AgentError
     ├── TransientError   unreachable, stream closed or broken, coordinator silent:
     │                    log why, back off (full jitter, initial doubling to a cap,
     │                    reset after a stream that lived a while), reconnect
     └── FatalError       UNAUTHENTICATED (token refused), PERMISSION_DENIED (the token
                          is another agent's or another region's) or INVALID_ARGUMENT
                          (hello refused): log an error and raise; the process exits 1

A TLS problem (an untrusted certificate, a plaintext port, a refused client certificate)
is transient, since a fix on either side needs no restart here, and its log line says
which flag or file would fix it (``vantage.tls.connection_problem``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NoReturn

import grpc
import grpc.aio

import vantage
from vantage.client import unreachable_reason
from vantage.durations import format_duration
from vantage.logs import get_logger
from vantage.tls import ClientTls, TlsError
from vantage.wire import WireError, check_from_pb, results_to_pb
from vantage_proto.v1 import agent_pb2
from vantage_proto.v1.agent_pb2_grpc import AgentServiceStub

from .buffer import ResultStore
from .errors import FatalError, TransientError, most_severe
from .ondemand import OnDemandProbes
from .probes import PROBES, ProbeFn
from .scheduler import Assignment

__all__ = ["ApplyAssignments", "CoordinatorLink", "FatalError", "RunNow", "TransientError"]

ApplyAssignments = Callable[[bool, Sequence[Assignment], Sequence[str]], None]
"""Receives each assignment message: (full, checks, removed); ``Scheduler.apply``."""

RunNow = Callable[[Iterable[str]], int]
"""Receives each Recheck's check names, validated; returns how many runs it started;
``Scheduler.run_now``."""

Counters = Callable[[], tuple[int, int]]
"""The agent's (results dropped, runs skipped) so far, reported in every ResultBatch and
Heartbeat so that the coordinator shows them."""

# Longest check name worth logging from a message the link refuses.
_LOGGED_NAME = 128

_Call = grpc.aio.StreamStreamCall[agent_pb2.AgentMessage, agent_pb2.CoordinatorMessage]

_FATAL = {
    grpc.StatusCode.UNAUTHENTICATED: "coordinator refused the token (UNAUTHENTICATED)",
    grpc.StatusCode.PERMISSION_DENIED: "coordinator refused this agent (PERMISSION_DENIED)",
    grpc.StatusCode.INVALID_ARGUMENT: "coordinator refused this agent (INVALID_ARGUMENT)",
}
# Messages from the coordinator can be large (a full set of checks with their CA files);
# what the agent accepts is bounded all the same.
MAX_RECEIVE = 64 << 20


class CoordinatorLink:
    """Keeps one stream to the coordinator open and moves results and assignments.

    ``results`` is the store the scheduler fills. ``instance_id`` identifies this agent
    process to the coordinator; sequence numbers are per instance.
    """

    def __init__(
        self,
        coordinator: str,
        *,
        name: str,
        region: str,
        token: str | None,
        results: ResultStore,
        apply: ApplyAssignments,
        run_now: RunNow,
        counters: Counters | None = None,
        instance_id: str | None = None,
        capabilities: Sequence[str] = tuple(PROBES),
        probes: Mapping[str, ProbeFn] | None = None,
        batch_size: int = 500,
        batch_interval: float = 0.2,
        heartbeat_interval: float = 10.0,
        hello_timeout: float = 10.0,
        reply_timeout: float = 30.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        rng: random.Random | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        self._target = coordinator
        self._tls = tls if tls is not None else ClientTls.choose(coordinator)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._apply = apply
        self._run_now = run_now
        self._counters: Counters = counters or (lambda: (results.dropped, 0))
        # Names assigned on the current stream: bounds what a Recheck may name.
        self._assigned: set[str] = set()
        self.instance_id = instance_id or uuid.uuid4().hex
        self._hello = agent_pb2.Hello(
            name=name,
            region=region,
            version=vantage.__version__,
            capabilities=sorted(capabilities),
            instance_id=self.instance_id,
        )
        self._buffer = results
        self._batch_size = batch_size
        self._batch_interval = batch_interval
        self._default_heartbeat = heartbeat_interval
        self._heartbeat_interval = heartbeat_interval
        self._hello_timeout = hello_timeout
        self._reply_timeout = reply_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._stable_after = stable_after
        self._rng = rng or random.Random()
        self._log = get_logger("agent.link").bind(
            agent=name, region=region, coordinator=coordinator, tls=self._tls.describe()
        )
        self._welcomed_at: float | None = None  # loop time of the current stream's Welcome
        self._last_sent = 0.0
        self._awaiting_since: float | None = None  # a batch or heartbeat is unanswered
        # On-demand checks run with ``probes`` (default: this build's probes of the
        # announced capabilities); writes to a stream are serialised by ``_write_lock``.
        if probes is None:
            probes = {kind: PROBES[kind] for kind in capabilities if kind in PROBES}
        self._on_demand = OnDemandProbes(probes, agent=name, region=region)
        self._write_lock = asyncio.Lock()

    @property
    def unacknowledged(self) -> int:
        """Results buffered until the coordinator acknowledges them."""
        return len(self._buffer)

    async def run(self) -> None:
        """Stay connected until cancelled; FatalError when the coordinator refuses the
        agent (already logged as an error)."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            try:
                await self._session()
            except FatalError as exc:
                self._log.error("giving up on the coordinator", reason=str(exc))
                raise
            except TransientError as exc:
                reason = str(exc)
            lived = loop.time() - self._welcomed_at if self._welcomed_at is not None else 0.0
            if lived >= self._stable_after:
                failures = 0
            ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(failures, 32))
            delay = self._rng.uniform(0.0, ceiling)
            failures += 1
            self._log.warning(
                "reconnecting to coordinator",
                reason=reason,
                delay=round(delay, 3),
                attempt=failures,
                unacknowledged=len(self._buffer),
            )
            await asyncio.sleep(delay)

    async def _session(self) -> NoReturn:
        """One stream, from dialling to its end, which is always an error."""
        self._welcomed_at = None
        self._awaiting_since = None
        self._assigned.clear()  # each stream starts with a full set
        self._write_lock = asyncio.Lock()
        try:
            channel = self._tls.aio_channel(
                self._target, [("grpc.max_receive_message_length", MAX_RECEIVE)]
            )
        except TlsError as exc:
            raise TransientError(str(exc)) from None
        async with channel:
            call: _Call = AgentServiceStub(channel).Connect(None, metadata=self._metadata)
            try:
                await self._greet(call)
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._receive(call), name="link receive")
                    group.create_task(self._send(call), name="link send")
                    group.create_task(self._watch_silence(), name="link watchdog")
                    group.create_task(
                        self._on_demand.serve(lambda message: self._write(call, message)),
                        name="link on-demand",
                    )
            except BaseExceptionGroup as group:
                raise most_severe(group) from None
            finally:
                call.cancel()
        # The tasks above loop until they fail; a group that ends otherwise is a bug.
        raise AssertionError("stream tasks ended without an error")

    async def _greet(self, call: _Call) -> None:
        """Send Hello, take Welcome; both within the hello timeout, which also bounds a
        coordinator that accepts connections but never answers."""
        try:
            async with asyncio.timeout(self._hello_timeout):
                await self._write(call, agent_pb2.AgentMessage(hello=self._hello))
                message = await self._read(call)
        except TimeoutError:
            raise TransientError(
                "coordinator did not answer the hello within "
                f"{format_duration(self._hello_timeout)}"
            ) from None
        kind = message.WhichOneof("kind")
        if kind != "welcome":
            raise TransientError(f"coordinator sent {kind} before welcome")
        welcome = message.welcome
        self._welcomed_at = asyncio.get_running_loop().time()
        self._heartbeat_interval = (
            welcome.heartbeat_interval_ms / 1000
            if welcome.heartbeat_interval_ms
            else self._default_heartbeat
        )
        already = self._buffer.ack(welcome.last_seq)
        self._buffer.rewind()
        self._log.info(
            "connected to coordinator",
            coordinator_version=welcome.coordinator_version,
            last_seq=welcome.last_seq,
            already_ingested=already,
            resending=self._buffer.unsent,
        )

    async def _receive(self, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await self._read(call)
            # Any message shows the coordinator alive; results still in flight keep the
            # clock running, from now.
            self._awaiting_since = loop.time() if self._buffer.in_flight else None
            kind = message.WhichOneof("kind")
            if kind == "ack":
                self._buffer.ack(message.ack.seq)
            elif kind == "assignments":
                self._on_assignments(message.assignments)
            elif kind == "recheck":
                self._on_recheck(message.recheck)
            elif kind == "heartbeat":
                pass  # hearing anything is what counts
            elif kind == "welcome":
                self._buffer.ack(message.welcome.last_seq)
            elif kind == "probe_request":
                self._on_demand.submit(message.probe_request)
            else:
                self._log.debug("coordinator message ignored", kind=kind)

    def _on_assignments(self, message: agent_pb2.Assignments) -> None:
        checks: list[Assignment] = []
        removed = list(message.removed)
        for spec in message.checks:
            try:
                check = check_from_pb(spec)
            except (WireError, ValueError) as exc:
                self._log.error("assigned check is invalid: not running it", error=str(exc))
                # Running the previous revision would report results for a spec the
                # coordinator no longer has.
                removed.append(spec.name)
                continue
            if check.type not in self._hello.capabilities:
                self._log.error(
                    "assigned check has a type this agent cannot probe: not running it",
                    check=check.name,
                    type=check.type,
                )
                removed.append(spec.name)
                continue
            checks.append(Assignment(check, spec.revision))
        self._log.info(
            "assignments received", full=message.full, checks=len(checks), removed=len(removed)
        )
        if message.full:
            self._assigned = {assignment.name for assignment in checks}
        else:
            self._assigned.difference_update(removed)
            self._assigned.update(assignment.name for assignment in checks)
        self._apply(message.full, checks, removed)

    def _on_recheck(self, message: agent_pb2.Recheck) -> None:
        """Probe the named checks now. The coordinator names each check once and only
        checks it assigned, so a message naming more checks than are assigned is refused
        whole (a warning) before anything looks at the names; names not assigned are
        ignored."""
        names = message.checks
        if len(names) > len(self._assigned):
            self._log.warning(
                "recheck refused: it names more checks than are assigned",
                names=len(names),
                assigned=len(self._assigned),
                first=names[0][:_LOGGED_NAME],
            )
            return
        wanted = [name for name in names if name in self._assigned]
        started = self._run_now(wanted)
        self._log.debug(
            "recheck received",
            checks=len(names),
            not_assigned=len(names) - len(wanted),
            started=started,
        )

    async def _send(self, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        self._last_sent = loop.time()
        while True:
            idle_until = self._last_sent + self._heartbeat_interval
            if not await self._buffer.wait_unsent(1, idle_until):
                heartbeat = agent_pb2.Heartbeat(
                    sent_unix_us=_now_us(), counters=self._counters_pb()
                )
                self._await_reply()
                await self._write(call, agent_pb2.AgentMessage(heartbeat=heartbeat))
                self._last_sent = loop.time()
                continue
            # Linger briefly so that results arriving together travel together.
            await self._buffer.wait_unsent(self._batch_size, loop.time() + self._batch_interval)
            while self._buffer.unsent:
                self._await_reply()
                batch = self._buffer.take_unsent(self._batch_size)
                message = agent_pb2.AgentMessage()
                results_to_pb(batch, message.results)
                message.results.sent_unix_us = _now_us()
                message.results.counters.CopyFrom(self._counters_pb())
                await self._write(call, message)
                self._last_sent = loop.time()

    def _counters_pb(self) -> agent_pb2.AgentCounters:
        dropped, skipped = self._counters()
        return agent_pb2.AgentCounters(results_dropped=dropped, runs_skipped=skipped)

    def _await_reply(self) -> None:
        if self._awaiting_since is None:
            self._awaiting_since = asyncio.get_running_loop().time()

    async def _watch_silence(self) -> None:
        """TransientError when a batch or heartbeat stays unanswered (the coordinator
        acknowledges every batch and answers every heartbeat) for the reply timeout."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self._reply_timeout / 4))
            since = self._awaiting_since
            if since is not None and loop.time() - since > self._reply_timeout:
                raise TransientError(
                    f"coordinator went silent: no reply for {format_duration(self._reply_timeout)}"
                )

    async def _read(self, call: _Call) -> agent_pb2.CoordinatorMessage:
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._failure(exc.code(), exc.details()) from None
        except asyncio.InvalidStateError:
            raise self._failure(await call.code(), await call.details()) from None
        if not isinstance(message, agent_pb2.CoordinatorMessage):  # grpc.aio.EOF
            raise TransientError("stream closed by coordinator")
        return message

    async def _write(self, call: _Call, message: agent_pb2.AgentMessage) -> None:
        # One write at a time: batches, heartbeats and on-demand answers come from
        # different tasks.
        try:
            async with self._write_lock:
                await call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise self._failure(exc.code(), exc.details()) from None
        except asyncio.InvalidStateError:
            # The call already ended; its status says why.
            raise self._failure(await call.code(), await call.details()) from None

    def _failure(self, code: grpc.StatusCode, details: str | None) -> TransientError | FatalError:
        fatal = _FATAL.get(code)
        if fatal is not None:
            return FatalError(f"{fatal}: {details}" if details else fatal)
        detail = unreachable_reason(details or code.name, self._tls)
        if code == grpc.StatusCode.UNAVAILABLE:
            if self._welcomed_at is None:
                return TransientError(f"coordinator unreachable: {detail}")
            return TransientError(f"connection to coordinator lost: {detail}")
        return TransientError(f"stream failed ({code.name}): {detail}")


def _now_us() -> int:
    """The wall clock in microseconds since the epoch, as the wire carries times."""
    return round(time.time() * 1_000_000)
