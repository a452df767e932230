"""The query service (``vantage.v1.QueryService``): verdicts, history and the fleet.

Answers come from the engine's and the fleet's current state and from the transition
store; nothing here changes them (CheckNow asks agents to probe, but moves no verdict).
Every request field is validated: a bad one is INVALID_ARGUMENT with one line naming it.

``WatchVerdicts`` streams every transition recorded after the call or, with ``after_id``,
first every kept transition after that id (read from the store a page at a time), then
the live ones, without a gap or a duplicate at the seam: the watcher is subscribed in the
same step, with no await in between, as the last id is read, so the replay ends exactly
where the live stream begins. OUT_OF_RANGE when ``after_id`` is past the last id, or when
transitions after it are no longer kept (also when retention prunes them mid-replay). The
stream ends with RESOURCE_EXHAUSTED when the watcher reads too slowly to keep up (see
``TransitionFeed``).

``open_watch`` is that first step on its own, so the HTTP mirror (``coordinator.api``)
can answer a bad request with an HTTP status before it starts its event stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Literal, TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from vantage.logs import get_logger
from vantage.public_json import enum_names
from vantage_proto.v1 import query_pb2, query_pb2_grpc

from .auth import CALLER, peer_host
from .engine import VerdictEngine
from .fleet import AgentFleet
from .ondemand import OnDemandChecks, OnDemandError, answer_to_pb
from .registry import CheckRegistry
from .store import RecordedTransition, TransitionStore
from .transitions import TransitionFeed, TransitionLog, Watcher, WatcherOverflow
from .wire import agent_to_pb, state_to_pb, transition_to_pb, verdict_to_pb

log = get_logger("coordinator.query")

if TYPE_CHECKING:
    from grpc import aio

    Context: TypeAlias = aio.ServicerContext[object, object]

HISTORY_LIMIT = 1000  # GetHistory's limit when the request leaves it 0
MAX_HISTORY_LIMIT = 10_000
REPLAY_PAGE = 256  # transitions read from the store per step of a resumed watch
# Timestamp's valid range (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z).
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


class ReplayGone(Exception):
    """Retention pruned transitions a resumed watch had not replayed yet."""


def watch_end_code(exc: WatcherOverflow | ReplayGone) -> grpc.StatusCode:
    """The status a watch that cannot go on ends with, over gRPC and over HTTP."""
    if isinstance(exc, WatcherOverflow):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.OUT_OF_RANGE


class QueryService(query_pb2_grpc.QueryServiceServicer):
    """Servicer for ``vantage.v1.QueryService`` over the coordinator's live state.

    ``checks`` is the coordinator's live check registry, where a verdict's labels come
    from; ``history`` numbers and keeps the transitions that ``feed`` publishes.
    """

    def __init__(
        self,
        engine: VerdictEngine,
        fleet: AgentFleet,
        checks: CheckRegistry,
        feed: TransitionFeed,
        *,
        history: TransitionLog,
        on_demand: OnDemandChecks | None = None,
    ) -> None:
        self._engine = engine
        self._fleet = fleet
        self._checks = checks
        self._feed = feed
        self._history = history
        self._on_demand = on_demand  # None: CheckNow is not served

    def _labels(self, check: str) -> dict[str, str]:
        spec = self._checks.get(check)
        return {} if spec is None else dict(spec.labels)

    async def GetVerdict(
        self, request: query_pb2.GetVerdictRequest, context: Context
    ) -> query_pb2.Verdict:
        if not request.check:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "check: a check name is needed")
        verdict = self._engine.verdict(request.check)
        if verdict is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no check named {request.check!r}")
        return verdict_to_pb(verdict, self._labels(verdict.check))

    async def ListVerdicts(
        self, request: query_pb2.ListVerdictsRequest, context: Context
    ) -> query_pb2.ListVerdictsResponse:
        for number in request.states:
            if number not in _STATE_NAMES:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"states: {number} is not a verdict state "
                    f"({', '.join(f'{n} {name}' for n, name in _STATE_NAMES.items())})",
                )
        if "" in request.labels:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "labels: an empty label name")
        states = frozenset(request.states)
        wanted = dict(request.labels)
        answer = query_pb2.ListVerdictsResponse()
        for verdict in sorted(self._engine.verdicts(), key=lambda verdict: verdict.check):
            if states and state_to_pb(verdict.state) not in states:
                continue
            labels = self._labels(verdict.check)
            if any(labels.get(key) != value for key, value in wanted.items()):
                continue
            answer.verdicts.append(verdict_to_pb(verdict, labels))
        return answer

    async def WatchVerdicts(
        self, request: query_pb2.WatchVerdictsRequest, context: Context
    ) -> AsyncIterator[query_pb2.VerdictTransition]:
        peer = context.peer()
        with await self.open_watch(request, context) as stream:
            log.info("verdict watcher connected", peer=peer, after_id=stream.after_id)
            try:
                async for transition in stream:
                    yield transition
            except (WatcherOverflow, ReplayGone) as exc:
                if isinstance(exc, WatcherOverflow):
                    log.warning("verdict watcher too slow, ending its stream", peer=peer)
                await context.abort(watch_end_code(exc), str(exc))
            finally:
                log.info("verdict watcher gone", peer=peer)

    async def open_watch(
        self, request: query_pb2.WatchVerdictsRequest, context: Context
    ) -> VerdictStream:
        """Validate a watch and subscribe it; the stream is to be closed (``with``).

        Aborts (INVALID_ARGUMENT, OUT_OF_RANGE) before subscribing anything.
        """
        if "" in request.checks:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "checks: an empty check name")
        last_id = self._history.last_id
        after_id = request.after_id if request.HasField("after_id") else last_id
        if after_id > last_id:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"after_id {after_id} is past the last transition id, {last_id}",
            )
        if after_id < last_id:
            oldest = self._history.store.oldest_id()
            if oldest is None or after_id < oldest - 1:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"transitions after id {after_id} are no longer kept (the oldest kept "
                    f"is {oldest or 'none'}): list the verdicts, then watch again",
                )
        # No await since last_id was read (the aborts above raise): the watcher subscribed
        # now receives exactly the transitions after last_id, where the replay ends.
        checks = frozenset(request.checks)
        return VerdictStream(
            self._history.store,
            self._feed.subscribe(checks),
            after_id=after_id,
            upto=last_id,
            checks=checks,
            labels=self._labels,
        )

    async def ListAgents(
        self, request: query_pb2.ListAgentsRequest, context: Context
    ) -> query_pb2.ListAgentsResponse:
        return query_pb2.ListAgentsResponse(
            agents=[agent_to_pb(agent) for agent in self._fleet.agents(self._engine.impaired())]
        )

    async def GetHistory(
        self, request: query_pb2.GetHistoryRequest, context: Context
    ) -> query_pb2.GetHistoryResponse:
        if not request.check:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "check: a check name is needed")
        since = await _seconds(request, "since", context)
        until = await _seconds(request, "until", context)
        if since is not None and until is not None and since > until:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"since {request.since.ToJsonString()} is after until "
                f"{request.until.ToJsonString()}",
            )
        if request.limit > MAX_HISTORY_LIMIT:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit: {request.limit} is above the most, {MAX_HISTORY_LIMIT}",
            )
        store = self._history.store
        if self._engine.verdict(request.check) is None and not store.knows(request.check):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no check named {request.check!r}, and none on record"
            )
        kept, truncated = store.history(
            request.check, since=since, until=until, limit=request.limit or HISTORY_LIMIT
        )
        labels = self._labels(request.check)
        return query_pb2.GetHistoryResponse(
            transitions=[transition_to_pb(recorded, labels) for recorded in kept],
            truncated=truncated,
        )

    async def CheckNow(
        self, request: query_pb2.CheckNowRequest, context: Context
    ) -> query_pb2.CheckNowResponse:
        """Probe the target now from every connected agent and judge the answers (see
        ``coordinator.ondemand``). The rate limit keys on the caller the gate admitted
        (``auth.CALLER``: its token), or on ``context.peer()``'s address without one.
        Only ``peer()`` and ``abort()`` of the context are used, so the JSON mirror's
        context serves too."""
        if self._on_demand is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "CheckNow is not served here")
            raise AssertionError("unreachable")  # abort raises
        try:
            caller = CALLER.get()
            client = caller.key if caller is not None else f"client:{peer_host(context.peer())}"
            answer = await self._on_demand.check_now(
                request.target, request.type, request.timeout_ms, client
            )
        except OnDemandError as exc:
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from None  # abort raises
        return answer_to_pb(answer)


_STATE_NAMES = enum_names(query_pb2.VerdictState.DESCRIPTOR)  # {1: "up", ...}


async def _seconds(
    request: query_pb2.GetHistoryRequest, name: Literal["since", "until"], context: Context
) -> float | None:
    """The timestamp field ``name`` in seconds; None when unset; aborts when invalid."""
    if not request.HasField(name):
        return None
    stamp: Timestamp = getattr(request, name)
    if not 0 <= stamp.nanos < 1_000_000_000:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"{name}: nanos {stamp.nanos} is outside 0..999999999"
        )
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name}: seconds {stamp.seconds} is outside years 0001..9999",
        )
    return stamp.seconds + stamp.nanos / 1e9


class VerdictStream:
    """An open watch: the kept transitions after ``after_id`` up to ``upto`` (read from
    ``store`` a page at a time), then the live ones ``watcher`` receives, as protobuf
    messages; only those of ``checks`` when given.

    Iteration raises ``WatcherOverflow`` when the live side fell too far behind and
    ``ReplayGone`` when retention pruned what the replay had yet to send. Use as a
    context manager: leaving it unsubscribes the watcher.
    """

    def __init__(
        self,
        store: TransitionStore,
        watcher: Watcher,
        *,
        after_id: int,
        upto: int,
        checks: frozenset[str],
        labels: Callable[[str], Mapping[str, str]],
    ) -> None:
        self.after_id = after_id
        self._store = store
        self._watcher = watcher
        self._cursor = after_id  # the id of the last transition replayed
        self._upto = upto
        self._checks = checks
        self._labels = labels
        self._page: deque[RecordedTransition] = deque()

    def __enter__(self) -> VerdictStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._watcher.__exit__(*exc_info)

    def __aiter__(self) -> VerdictStream:
        return self

    async def __anext__(self) -> query_pb2.VerdictTransition:
        recorded = self._replayed()
        if recorded is None:
            recorded = await self._watcher.__anext__()
        return transition_to_pb(recorded, self._labels(recorded.transition.check))

    def _replayed(self) -> RecordedTransition | None:
        """The next transition of the replay; None once it is over."""
        if not self._page and self._cursor < self._upto:
            oldest = self._store.oldest_id()
            if oldest is None or oldest > self._cursor + 1:
                raise ReplayGone(
                    f"transitions after id {self._cursor} were pruned while being replayed: "
                    "list the verdicts, then watch again"
                )
            self._page.extend(
                self._store.after(
                    self._cursor, upto=self._upto, limit=REPLAY_PAGE, checks=self._checks
                )
            )
            if not self._page:
                self._cursor = self._upto
        if not self._page:
            return None
        recorded = self._page.popleft()
        self._cursor = recorded.id
        return recorded
