"""A small client of the coordinator's query service, for the CLI and scripts.

Exceptions::

    ClientError            one line for the user; the CLI exits 2
    └── NotFound           the coordinator has no such check

The JSON shapes built here are the stable ``--json`` interface of ARCHITECTURE.md:
fields may be added, never renamed or removed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from vantage_proto.v1 import common_pb2, query_pb2, query_pb2_grpc


class ClientError(Exception):
    """The query failed; ``str()`` is one line naming the problem."""


class NotFound(ClientError):
    pass


def state_name(number: int) -> str:
    """VERDICT_STATE_REGIONAL -> 'regional'."""
    return query_pb2.VerdictState.Name(number).removeprefix("VERDICT_STATE_").lower()  # type: ignore[arg-type]


def region_state_name(number: int) -> str:
    return query_pb2.RegionState.Name(number).removeprefix("REGION_STATE_").lower()  # type: ignore[arg-type]


def failure_name(number: int) -> str | None:
    """FAILURE_CLASS_CONNECT_REFUSED -> 'connect_refused'; None for no failure."""
    if number == common_pb2.FAILURE_CLASS_UNSPECIFIED:
        return None
    return common_pb2.FailureClass.Name(number).removeprefix("FAILURE_CLASS_").lower()  # type: ignore[arg-type]


def timestamp_text(stamp: Timestamp) -> str | None:
    """RFC 3339 in UTC with a Z, to the second; None when unset."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    moment = datetime.fromtimestamp(stamp.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def verdict_json(verdict: query_pb2.Verdict) -> dict[str, Any]:
    return {
        "check": verdict.check,
        "state": state_name(verdict.state),
        "since": timestamp_text(verdict.since),
        "regions_down": list(verdict.regions_down),
        "failure": failure_name(verdict.failure),
        "reason": verdict.reason,
        "labels": dict(verdict.labels),
        "regions": {
            region: {
                "state": region_state_name(view.state),
                "up": view.up,
                "down": view.down,
                "stale": view.stale,
                "failure": failure_name(view.failure),
                "failing_agents": list(view.failing_agents),
            }
            for region, view in sorted(verdict.regions.items())
        },
    }


def agent_json(agent: query_pb2.Agent) -> dict[str, Any]:
    return {
        "name": agent.name,
        "region": agent.region,
        "connected": agent.connected,
        "impaired": agent.impaired,
        "last_seen": timestamp_text(agent.last_seen),
        "connected_since": timestamp_text(agent.connected_since),
        "version": agent.version,
        "capabilities": list(agent.capabilities),
        "results_received": agent.results_received,
    }


class QueryClient:
    """Blocking calls to one coordinator; each call has its own deadline."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = query_pb2_grpc.QueryServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> QueryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def verdicts(self, check: str | None = None) -> list[query_pb2.Verdict]:
        if check is not None:
            return [self._call(self._stub.GetVerdict, query_pb2.GetVerdictRequest(check=check))]
        response = self._call(self._stub.ListVerdicts, query_pb2.ListVerdictsRequest())
        return list(response.verdicts)

    def agents(self) -> list[query_pb2.Agent]:
        response = self._call(self._stub.ListAgents, query_pb2.ListAgentsRequest())
        return list(response.agents)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            detail = exc.details() or code.name
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(detail) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = f"cannot reach the coordinator at {self.address} ({code.name.lower()})"
            raise ClientError(detail) from None
