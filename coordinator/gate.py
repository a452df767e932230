"""The gate every call passes before it is served, on both ports: who is calling (the
rules of ``coordinator.auth``), how big its messages are, how many streams it holds, and
on the HTTP port how many connections are open and how long a request may take to
arrive (``coordinator.limits``). Each refusal is a clear status, one log line and a count
in ``vantage_requests_refused_total{endpoint, reason}``.

- ``GrpcGate``, a server interceptor: every request message of every service is measured
  before it is parsed (over ``max_message_bytes``: RESOURCE_EXHAUSTED); calls to the query
  service are authorized (``QUERY`` scope, ``CHECKNOW`` for CheckNow) and their caller
  set in ``auth.CALLER``; a verdict watch is a session, capped per caller and ended when
  its token is revoked. The agent service authenticates its streams itself (it needs the
  Hello); health and reflection are open.
- ``http_gate``, an aiohttp middleware, does the same for ``/metrics`` and the JSON API
  (``/healthz`` and ``/api/v1/openapi.yaml`` are open) from the ``Authorization`` header.
- ``ConnectionGate`` wraps the HTTP server's protocol factory: at most
  ``max_http_connections`` connections, and ``max_http_connections_per_client`` from one
  address; one over is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
from aiohttp import web

from vantage.client import REFUSAL_METADATA
from vantage.logs import get_logger
from vantage.names import shown
from vantage_proto.v1 import agent_pb2, query_pb2

from .auth import (
    CALLER,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    Authenticator,
    AuthError,
    Principal,
    bearer_token,
    certificate_names,
    peer_host,
)
from .limits import Unreadable, sized
from .metrics import CoordinatorMetrics
from .tokens import Scope

log = get_logger("coordinator.gate")

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
QUERY_SERVICE = query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name
CHECK_NOW = "CheckNow"
# HTTP paths anyone may ask for: liveness and the API's own description.
OPEN_PATHS = frozenset({"/healthz", "/api/v1/openapi.yaml"})


def needed_scope(rpc: str) -> Scope:
    """The scope a query service method needs."""
    return Scope.CHECKNOW if rpc == CHECK_NOW else Scope.QUERY


class _Refused(Exception):
    """Raised inside a streaming call by the message iterator at an ``Unreadable``."""

    def __init__(self, unreadable: Unreadable) -> None:
        super().__init__(unreadable.message)
        self.unreadable = unreadable


if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not generic at run time
    _Interceptor = grpc.aio.ServerInterceptor


class GrpcGate(_Interceptor):
    """Size limits on every service, authorization and stream caps on the query service
    (see the module docstring)."""

    def __init__(
        self, authenticator: Authenticator, metrics: CoordinatorMetrics, *, max_message_bytes: int
    ) -> None:
        self._auth = authenticator
        self._metrics = metrics
        self._limit = max_message_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, rpc = handler_call_details.method.lstrip("/").rpartition("/")
        endpoint = "agent" if service == AGENT_SERVICE else "query"
        needed = needed_scope(rpc) if service == QUERY_SERVICE else None
        parse = handler.request_deserializer or _identity
        kind = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        deserializer = sized(parse, self._limit, kind.full_name if kind else f"{rpc} request")
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, endpoint, needed, rpc),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, endpoint, needed, rpc),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._streaming(handler.stream_unary, endpoint),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, endpoint),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )

    async def _admit(
        self, request: Any, context: Any, endpoint: str, needed: Scope | None, rpc: str
    ) -> Principal | None:
        """Abort the call unless its request fits and its caller may call ``rpc``."""
        if isinstance(request, Unreadable):
            await self._unreadable(context, endpoint, request)
        if needed is None:
            return None
        try:
            return self._auth.query(
                bearer_token(context.invocation_metadata()),
                certificate_names(context.auth_context()),
                peer_host(context.peer()),
                needed,
                rpc,
            )
        except AuthError as exc:
            await self._refuse(context, endpoint, exc, rpc)
            raise AssertionError("unreachable") from None  # abort raises

    def _unary(self, inner: Any, endpoint: str, needed: Scope | None, rpc: str) -> Any:
        async def behavior(request: Any, context: Any) -> Any:
            principal = await self._admit(request, context, endpoint, needed, rpc)
            token = CALLER.set(principal)
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                if rpc == CHECK_NOW and context.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._metrics.refused(endpoint, "rate_limited")
                raise
            finally:
                CALLER.reset(token)

        return behavior

    def _unary_stream(self, inner: Any, endpoint: str, needed: Scope | None, rpc: str) -> Any:
        if inspect.isasyncgenfunction(inner):

            async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
                async with self._watching(request, context, endpoint, needed, rpc) as ended:
                    async for item in _until(inner(request, context), ended):
                        yield item

            return generator

        async def coroutine(request: Any, context: Any) -> None:  # writes by context.write
            async with self._watching(request, context, endpoint, needed, rpc) as ended:
                await _first(inner(request, context), ended)

        return coroutine

    @contextlib.asynccontextmanager
    async def _watching(
        self, request: Any, context: Any, endpoint: str, needed: Scope | None, rpc: str
    ) -> AsyncIterator[asyncio.Event]:
        """Admit a server-streaming call and hold its session for the block; the event
        is set when its token is revoked, and the call then ends UNAUTHENTICATED."""
        principal = await self._admit(request, context, endpoint, needed, rpc)
        revoked: list[str] = []
        ended = asyncio.Event()

        def end(why: str) -> None:
            revoked.append(why)
            ended.set()

        session = None
        if principal is not None:
            try:
                session = self._auth.open_session(principal, end)
            except AuthError as exc:
                await self._refuse(context, endpoint, exc, rpc)
        token = CALLER.set(principal)
        try:
            yield ended
            if revoked:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, revoked[0])
        finally:
            CALLER.reset(token)
            if session is not None:
                self._auth.close_session(session)

    def _streaming(self, inner: Any, endpoint: str) -> Any:
        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for message in requests:
                if isinstance(message, Unreadable):
                    raise _Refused(message)
                yield message

        if inspect.isasyncgenfunction(inner):

            async def generator(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                refused: Unreadable | None = None
                try:
                    async for item in inner(checked(requests), context):
                        yield item
                except* _Refused as group:
                    refused = _leaf(group).unreadable
                if refused is not None:
                    await self._unreadable(context, endpoint, refused)

            return generator

        async def coroutine(requests: AsyncIterator[Any], context: Any) -> Any:
            refused: Unreadable | None = None
            result: Any = None
            try:
                result = await inner(checked(requests), context)
            except* _Refused as group:
                refused = _leaf(group).unreadable
            if refused is not None:
                await self._unreadable(context, endpoint, refused)
            return result

        return coroutine

    async def _unreadable(self, context: Any, endpoint: str, refused: Unreadable) -> None:
        self._metrics.refused(endpoint, refused.reason)
        log.warning("message refused", peer=context.peer(), why=refused.message)
        await context.abort(
            refused.code, refused.message, trailing_metadata=((REFUSAL_METADATA, refused.reason),)
        )

    async def _refuse(self, context: Any, endpoint: str, error: AuthError, rpc: str) -> None:
        self._metrics.refused(endpoint, error.reason)
        log.info(
            "call refused", rpc=rpc, peer=context.peer(), code=error.code.name, why=error.message
        )
        await context.abort(
            error.code, error.message, trailing_metadata=((REFUSAL_METADATA, error.reason),)
        )


def _identity(data: bytes) -> bytes:
    return data


def _leaf(group: BaseExceptionGroup[_Refused]) -> _Refused:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, _Refused)
    return first


async def _until(items: AsyncIterator[Any], ended: asyncio.Event) -> AsyncIterator[Any]:
    """``items`` until they end or ``ended`` is set. However it ends (also when the call
    is cancelled under it), the step in flight is finished before ``items`` is closed:
    closing a generator that is still running raises."""
    stop = asyncio.ensure_future(ended.wait())
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
    finally:
        stop.cancel()
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


async def _first(work: Awaitable[Any], ended: asyncio.Event) -> None:
    """Await ``work`` until it is done or ``ended`` is set (then it is cancelled)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(ended.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        for future in (task, stop):
            if not future.done():
                future.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await future


# -- HTTP ---------------------------------------------------------------------------------

_HttpHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HTTP_REFUSALS = {413: "too_large", 408: "timeout"}


def http_gate(authenticator: Authenticator, metrics: CoordinatorMetrics) -> Any:
    """The middleware that authorizes every HTTP request but ``OPEN_PATHS`` (see the
    module docstring) and counts the refusals the handlers answer (413, 408, CheckNow's
    429)."""
    from .api import PREFIX, error_response

    checknow = f"{PREFIX}/checknow"

    @web.middleware
    async def gate(request: web.Request, handler: _HttpHandler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        needed = Scope.CHECKNOW if request.path == checknow else Scope.QUERY
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = str(peer[0]) if peer else "unknown"
        try:
            principal = authenticator.query(
                bearer_token(request.headers.items()),
                (),
                client,
                needed,
                f"{shown(request.method)} {shown(request.path)}",
            )
        except AuthError as exc:
            metrics.refused("http", exc.reason)
            log.info(
                "HTTP request refused",
                method=request.method,
                path=request.path[:256],
                client=client,
                code=exc.code.name,
                why=exc.message,
            )
            refusal = error_response(exc.code, exc.message)
            if exc.reason == UNAUTHENTICATED:
                refusal.headers["WWW-Authenticate"] = 'Bearer realm="vantage"'
            elif exc.reason == PERMISSION_DENIED:
                refusal.headers["WWW-Authenticate"] = (
                    'Bearer realm="vantage", error="insufficient_scope"'
                )
            return refusal
        token = CALLER.set(principal)
        try:
            response = await handler(request)
        finally:
            CALLER.reset(token)
        reason = _HTTP_REFUSALS.get(response.status)
        if reason is None and response.status == 429 and request.path == checknow:
            reason = "rate_limited"
        if reason is not None:
            metrics.refused("http", reason)
        return response

    return gate


class ConnectionGate:
    """A protocol factory around ``factory`` (aiohttp's ``web.Server``): at most
    ``total`` connections at once, ``per_client`` of them from one address (one over is
    closed as soon as it is made: ``too_many_connections``), and each must send its first
    request head within ``head_timeout`` seconds (else ``408`` and closed: ``timeout``).
    ``on_refused(reason)`` hears each."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        *,
        total: int,
        per_client: int,
        head_timeout: float,
        on_refused: Callable[[str], None],
    ) -> None:
        self._factory = factory
        self._total = total
        self._per_client = per_client
        self.head_timeout = head_timeout
        self.on_refused = on_refused
        self._open: dict[str, int] = {}
        self.open = 0

    def __call__(self) -> asyncio.Protocol:
        return _GatedProtocol(self)

    def admit(self, client: str) -> bool:
        if self.open >= self._total or self._open.get(client, 0) >= self._per_client:
            self.on_refused("too_many_connections")
            log.info(
                "HTTP connection refused: too many open",
                client=client,
                from_client=self._open.get(client, 0),
                total=self.open,
            )
            return False
        self.open += 1
        self._open[client] = self._open.get(client, 0) + 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        left = self._open[client] - 1
        if left:
            self._open[client] = left
        else:
            del self._open[client]

    def protocol(self) -> asyncio.Protocol:
        return self._factory()


_HEAD_END = b"\r\n\r\n"
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class _GatedProtocol(asyncio.Protocol):
    """Admits the connection at ``connection_made`` (when the peer is known: after the
    handshake on a TLS port), watches for the end of the first request head, and hands
    everything to the real protocol."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's: no isinstance here.
        stream = cast(asyncio.Transport, transport)
        peer = stream.get_extra_info("peername")
        client = str(peer[0]) if peer else "unknown"
        if not self._gate.admit(client):
            stream.abort()
            return
        self._client = client
        self._transport = stream
        self._deadline = asyncio.get_running_loop().call_later(
            self._gate.head_timeout, self._too_slow
        )
        self._inner = self._gate.protocol()
        self._inner.connection_made(transport)

    def _too_slow(self) -> None:
        self._deadline = None
        self._gate.on_refused("timeout")
        log.info("HTTP connection closed: no request head in time", client=self._client)
        if self._transport is not None and not self._transport.is_closing():
            body = (
                b'{"error": {"code": "deadline_exceeded", "message": "no request within '
                + f"{self._gate.head_timeout:g}s".encode()
                + b' (limits.http_idle_timeout)"}}'
            )
            self._transport.write(_TIMED_OUT % (len(body), body))
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            window = self._tail + data
            if _HEAD_END in window:
                self._deadline.cancel()
                self._deadline = None
            else:
                self._tail = window[-3:]
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._client is not None:
            self._gate.release(self._client)
            self._client = None
        if self._inner is not None:
            self._inner.connection_lost(exc)
