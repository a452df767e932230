"""Protobuf conversions for what the coordinator serves: verdicts, transitions, agents.

Wire types stop here (and in the servicers that call these); the engine, the fleet and the
metrics work on the domain values of ``coordinator.verdicts`` and ``coordinator.fleet``.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp

from vantage.wire import failure_to_pb
from vantage_proto.v1 import query_pb2

from .fleet import AgentInfo
from .transitions import RecordedTransition
from .verdicts import RegionState, RegionView, Verdict, VerdictState

_STATE_TO_PB: dict[VerdictState, query_pb2.VerdictState.ValueType] = {
    state: query_pb2.VerdictState.Value(f"VERDICT_STATE_{state.name}") for state in VerdictState
}
_REGION_TO_PB: dict[RegionState, query_pb2.RegionState.ValueType] = {
    state: query_pb2.RegionState.Value(f"REGION_STATE_{state.name}") for state in RegionState
}


def state_to_pb(state: VerdictState | None) -> query_pb2.VerdictState.ValueType:
    """None (no previous verdict) is VERDICT_STATE_UNSPECIFIED."""
    return query_pb2.VERDICT_STATE_UNSPECIFIED if state is None else _STATE_TO_PB[state]


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def region_to_pb(view: RegionView) -> query_pb2.RegionView:
    return query_pb2.RegionView(
        state=_REGION_TO_PB[view.state],
        up=view.up,
        down=view.down,
        stale=view.stale,
        failure=failure_to_pb(view.failure),
        failing_agents=view.failing_agents,
    )


def verdict_to_pb(verdict: Verdict, labels: Mapping[str, str] | None = None) -> query_pb2.Verdict:
    """``labels`` are the check's labels from its spec (the engine does not keep them)."""
    return query_pb2.Verdict(
        check=verdict.check,
        state=_STATE_TO_PB[verdict.state],
        since=timestamp(verdict.since),
        regions_down=verdict.regions_down,
        failure=failure_to_pb(verdict.failure),
        regions={region: region_to_pb(view) for region, view in verdict.regions.items()},
        reason=verdict.reason,
        labels=dict(labels or {}),
        unconfirmed=verdict.unconfirmed,
    )


def transition_to_pb(
    recorded: RecordedTransition, labels: Mapping[str, str] | None = None
) -> query_pb2.VerdictTransition:
    transition = recorded.transition
    return query_pb2.VerdictTransition(
        id=recorded.id,
        check=transition.check,
        previous=state_to_pb(transition.previous),
        at=timestamp(transition.at),
        verdict=verdict_to_pb(transition.verdict, labels),
    )


def agent_to_pb(agent: AgentInfo) -> query_pb2.Agent:
    message = query_pb2.Agent(
        name=agent.name,
        region=agent.region,
        connected=agent.connected,
        impaired=agent.impaired,
        last_seen=timestamp(agent.last_seen),
        version=agent.version,
        capabilities=agent.capabilities,
        results_received=agent.results_received,
        results_dropped=agent.results_dropped,
        runs_skipped=agent.runs_skipped,
        results_late=agent.results_late,
    )
    if agent.connected_since is not None:
        message.connected_since.CopyFrom(timestamp(agent.connected_since))
    return message
