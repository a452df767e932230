"""A small client of the coordinator's query service, for the CLI and scripts.

Exceptions::

    ClientError            one line for the user; the CLI exits 2
    └── NotFound           the coordinator has no such check

The JSON shapes are the stable ``--json`` interface of ARCHITECTURE.md, built by
``vantage.public_json`` (the coordinator's JSON API uses the same converter): fields may
be added, never renamed or removed.
"""

from __future__ import annotations

from typing import Any

import grpc

from vantage_proto.v1 import common_pb2, query_pb2, query_pb2_grpc

from .public_json import enum_text, message_json, timestamp_text

__all__ = [
    "ClientError",
    "NotFound",
    "QueryClient",
    "agent_json",
    "failure_name",
    "region_state_name",
    "state_name",
    "timestamp_text",
    "verdict_json",
]


class ClientError(Exception):
    """The query failed; ``str()`` is one line naming the problem."""


class NotFound(ClientError):
    pass


def state_name(number: int) -> str:
    """VERDICT_STATE_REGIONAL -> 'regional'."""
    return enum_text(query_pb2.VerdictState.DESCRIPTOR, number) or "unspecified"


def region_state_name(number: int) -> str:
    return enum_text(query_pb2.RegionState.DESCRIPTOR, number) or "unspecified"


def failure_name(number: int) -> str | None:
    """FAILURE_CLASS_CONNECT_REFUSED -> 'connect_refused'; None for no failure."""
    return enum_text(common_pb2.FailureClass.DESCRIPTOR, number)


def verdict_json(verdict: query_pb2.Verdict) -> dict[str, Any]:
    return message_json(verdict)


def agent_json(agent: query_pb2.Agent) -> dict[str, Any]:
    return message_json(agent)


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
