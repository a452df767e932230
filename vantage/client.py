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
from .tls import ClientTls, connection_problem

__all__ = [
    "REFUSAL_METADATA",
    "ClientError",
    "NotFound",
    "QueryClient",
    "agent_json",
    "call_error",
    "failure_name",
    "refusal_reason",
    "region_state_name",
    "state_name",
    "timestamp_text",
    "unreachable_reason",
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
    """Blocking calls to one coordinator, over ``tls`` (default: plaintext to a loopback
    address, TLS otherwise) with ``token`` as the bearer token when given; each call has
    its own deadline."""

    def __init__(
        self,
        address: str,
        timeout: float = 5.0,
        *,
        tls: ClientTls | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.tls = tls if tls is not None else ClientTls.choose(address)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = self.tls.channel(address)
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
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise call_error(self.address, self.tls, exc.code(), exc.details()) from None


# The trailing metadata with which the coordinator's gate marks the calls it refuses
# (the reason of vantage_requests_refused_total): their caller, not their request, is
# the problem.
REFUSAL_METADATA = "vantage-refusal"


def refusal_reason(metadata: Any) -> str | None:
    """The gate's refusal reason in a failed call's trailing metadata; None for a call
    the gate let through."""
    for key, value in metadata or ():
        if key == REFUSAL_METADATA:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def unreachable_reason(details: str, tls: ClientTls) -> str:
    """Why gRPC could not reach the coordinator, short: TLS trouble in words
    (``vantage.tls.connection_problem``), else the last clause of gRPC's details:
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:...: Failed to
    connect to remote host: Connection refused" -> "connection refused"."""
    problem = connection_problem(details, tls)
    if problem is not None:
        return problem
    clause = details.rsplit(": ", 1)[-1].strip() or details
    # The clause may close brackets opened before it: "... (Socket closed: server shutdown))".
    for opening, closing in ("()", "[]"):
        while clause.endswith(closing) and clause.count(closing) > clause.count(opening):
            clause = clause[:-1]
    return clause[:1].lower() + clause[1:]


def call_error(
    address: str, tls: ClientTls, code: grpc.StatusCode, details: str | None
) -> ClientError:
    """The one line a failed call becomes: what the coordinator said, or why it could
    not be reached (``vantage.tls.connection_problem`` for TLS trouble)."""
    detail = details or code.name
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(detail)
    if code == grpc.StatusCode.UNAVAILABLE:
        why = unreachable_reason(detail, tls)
        return ClientError(f"cannot reach the coordinator at {address}: {why}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"the coordinator at {address} did not answer in time")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ClientError(f"refused by the coordinator (unauthenticated): {detail}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return ClientError(f"refused by the coordinator (permission denied): {detail}")
    return ClientError(detail)
