"""The query service (``vantage.v1.QueryService``): verdicts and the fleet, read-only.

Answers come from the engine's and the fleet's current state; nothing here changes it.
``WatchVerdicts`` streams every transition recorded after the call, and ends with
RESOURCE_EXHAUSTED when the watcher reads too slowly to keep up (see ``TransitionFeed``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, TypeAlias

import grpc

from vantage.logs import get_logger
from vantage_proto.v1 import query_pb2, query_pb2_grpc

from .engine import VerdictEngine
from .fleet import AgentFleet
from .registry import CheckRegistry
from .transitions import TransitionFeed, WatcherOverflow
from .wire import agent_to_pb, transition_to_pb, verdict_to_pb

log = get_logger("coordinator.query")

if TYPE_CHECKING:
    from grpc import aio

    Context: TypeAlias = aio.ServicerContext[object, object]


class QueryService(query_pb2_grpc.QueryServiceServicer):
    """Servicer for ``vantage.v1.QueryService`` over the coordinator's live state.

    ``checks`` is the coordinator's live check registry, where a verdict's labels come
    from.
    """

    def __init__(
        self,
        engine: VerdictEngine,
        fleet: AgentFleet,
        checks: CheckRegistry,
        feed: TransitionFeed,
    ) -> None:
        self._engine = engine
        self._fleet = fleet
        self._checks = checks
        self._feed = feed

    def _labels(self, check: str) -> dict[str, str]:
        spec = self._checks.get(check)
        return {} if spec is None else dict(spec.labels)

    async def GetVerdict(
        self, request: query_pb2.GetVerdictRequest, context: Context
    ) -> query_pb2.Verdict:
        verdict = self._engine.verdict(request.check)
        if verdict is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no check named {request.check!r}")
        return verdict_to_pb(verdict, self._labels(verdict.check))

    async def ListVerdicts(
        self, request: query_pb2.ListVerdictsRequest, context: Context
    ) -> query_pb2.ListVerdictsResponse:
        verdicts = sorted(self._engine.verdicts(), key=lambda verdict: verdict.check)
        return query_pb2.ListVerdictsResponse(
            verdicts=[verdict_to_pb(v, self._labels(v.check)) for v in verdicts]
        )

    async def WatchVerdicts(
        self, request: query_pb2.WatchVerdictsRequest, context: Context
    ) -> AsyncIterator[query_pb2.VerdictTransition]:
        peer = context.peer()
        log.info("verdict watcher connected", peer=peer)
        try:
            with self._feed.subscribe() as watcher:
                async for recorded in watcher:
                    yield transition_to_pb(recorded, self._labels(recorded.transition.check))
        except WatcherOverflow as exc:
            log.warning("verdict watcher too slow, ending its stream", peer=peer)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:
            log.info("verdict watcher gone", peer=peer)

    async def ListAgents(
        self, request: query_pb2.ListAgentsRequest, context: Context
    ) -> query_pb2.ListAgentsResponse:
        return query_pb2.ListAgentsResponse(
            agents=[agent_to_pb(agent) for agent in self._fleet.agents(self._engine.impaired())]
        )

    async def GetHistory(
        self, request: query_pb2.GetHistoryRequest, context: Context
    ) -> query_pb2.GetHistoryResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "GetHistory is not served yet")
        raise AssertionError("unreachable")  # abort raises

    async def CheckNow(
        self, request: query_pb2.CheckNowRequest, context: Context
    ) -> query_pb2.CheckNowResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "CheckNow is not served yet")
        raise AssertionError("unreachable")  # abort raises
