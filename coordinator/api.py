"""The JSON API on the HTTP port (``/api/v1/``): a mirror of ``vantage.v1.QueryService``.

Every route calls the servicer method the gRPC server calls, with a request message built
from the path, the query string or the JSON body, and answers the response message; both
go through ``vantage.public_json``, the converter behind the CLI's ``--json``, so the API
speaks the shape users know: snake_case names, lower-case states and failure classes,
RFC 3339 times. ``coordinator/openapi.yaml`` describes every route and is served at
``/api/v1/openapi.yaml``.

    GET  /api/v1/verdicts?state=global&label=team=web             ListVerdicts
    GET  /api/v1/verdicts/{check}                                 GetVerdict
    GET  /api/v1/verdicts/{check}/history?since=&until=&limit=    GetHistory
    GET  /api/v1/agents                                           ListAgents
    GET  /api/v1/watch?after_id=&check=                           WatchVerdicts (SSE)
    POST /api/v1/checknow  {"target": ..., "type": ..., "timeout_ms": ...}   CheckNow

``state``, ``label`` (``NAME=VALUE``) and ``check`` may be repeated; any other query
parameter is refused. Times are RFC 3339; an ``until`` given to the second, as this API
writes times, reaches the end of that second.

Errors: the status a servicer aborts with becomes the HTTP status of ``HTTP_STATUS`` (the
mapping of google.rpc.Code and grpc-gateway: OUT_OF_RANGE is 400 like every "change the
request" status, UNIMPLEMENTED 501) and the body ``{"error": {"code": "not_found",
"message": "..."}}`` (the code is the gRPC status name in lower case). Unknown routes and
methods under ``/api/v1/`` answer in the same shape. The servicer sees the HTTP client's
address as ``context.peer()`` (``ipv4:HOST:PORT``, as gRPC spells it) and the request
headers as invocation metadata.

The watch is a stream of Server-Sent Events (``text/event-stream``): per transition an
event ``transition`` with ``id:`` the transition id and ``data:`` the transition as JSON;
a comment line every ``HEARTBEAT`` seconds keeps proxies from closing a quiet stream. A
client resumes with the ``Last-Event-ID`` header (what EventSource sends when it
reconnects) or ``?after_id=``; the header wins when both are given. A bad request or a
resume point no longer kept is an HTTP error before the stream starts. Once it runs, a
watcher that fell behind, or a replay that retention overtook, gets one ``error`` event
(``data:`` the error body) and the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from vantage.logs import get_logger
from vantage.names import shown
from vantage.public_json import JsonShapeError, message_from_json, message_json
from vantage_proto.v1 import query_pb2

from .auth import CALLER, Authenticator, AuthError
from .query_service import QueryService, ReplayGone, VerdictStream, watch_end_code
from .transitions import WatcherOverflow

log = get_logger("coordinator.api")
M = TypeVar("M", bound=Message)

PREFIX = "/api/v1"
HEARTBEAT = 15.0  # seconds between keep-alive comments on a quiet event stream
OPENAPI = "openapi.yaml"  # beside this module; package data

# google.rpc.Code's HTTP mapping (as grpc-gateway applies it).
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_SERVICE = query_pb2.DESCRIPTOR.services_by_name["QueryService"]


@dataclass(frozen=True, slots=True)
class Route:
    """One mirrored RPC: its HTTP method and path (``{check}`` fills the request field of
    that name) and which query parameters fill which request fields. ``range_ends`` are
    the parameters that end a time range: given to the second, as this API writes times,
    they reach the end of that second (an ``at`` copied from an answer includes it)."""

    method: str
    path: str
    rpc: str
    query: Mapping[str, str]
    range_ends: frozenset[str] = frozenset()

    @property
    def request_type(self) -> type[Message]:
        message: type[Message] = getattr(
            query_pb2, _SERVICE.methods_by_name[self.rpc].input_type.name
        )
        return message

    @property
    def streams(self) -> bool:
        return bool(_SERVICE.methods_by_name[self.rpc].server_streaming)


ROUTES = (
    Route("GET", f"{PREFIX}/verdicts", "ListVerdicts", {"state": "states", "label": "labels"}),
    Route("GET", f"{PREFIX}/verdicts/{{check}}", "GetVerdict", {}),
    Route(
        "GET",
        f"{PREFIX}/verdicts/{{check}}/history",
        "GetHistory",
        {"since": "since", "until": "until", "limit": "limit"},
        range_ends=frozenset({"until"}),
    ),
    Route("GET", f"{PREFIX}/agents", "ListAgents", {}),
    Route("GET", f"{PREFIX}/watch", "WatchVerdicts", {"after_id": "after_id", "check": "checks"}),
    Route("POST", f"{PREFIX}/checknow", "CheckNow", {}),
)


class RpcAbort(Exception):
    """What ``HttpContext.abort`` raises: the servicer ended the call with ``code``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class HttpContext(grpc.aio.ServicerContext[object, object]):
    """A servicer context for a call that came over HTTP.

    ``abort`` raises ``RpcAbort``, which the route turns into an HTTP error; ``peer()``
    is the HTTP client's address in gRPC's spelling; the request headers are the
    invocation metadata. Streaming by ``read``/``write`` is not offered (no mirrored RPC
    uses it).
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._code = grpc.StatusCode.OK
        self._details = ""

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Any = (),
    ) -> NoReturn:
        raise RpcAbort(code, details)

    async def abort_with_status(self, status: Any) -> NoReturn:
        raise RpcAbort(status.code, status.details)

    def peer(self) -> str:
        peername = (
            self._request.transport.get_extra_info("peername") if self._request.transport else None
        )
        if not peername:
            return "unknown"
        host, port = peername[0], peername[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    def invocation_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata(
            *((key.lower(), value) for key, value in self._request.headers.items())
        )

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def time_remaining(self) -> float:
        return float("inf")  # HTTP requests carry no deadline

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def add_done_callback(self, callback: Any) -> None:
        pass  # nothing to notify: the call ends with the HTTP response

    async def read(self) -> object:
        raise NotImplementedError("streaming requests are not mirrored over HTTP")

    async def write(self, message: object) -> None:
        raise NotImplementedError("streaming by context.write is not mirrored over HTTP")

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        pass

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        pass

    def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    def set_compression(self, compression: grpc.Compression) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass

    def peer_identities(self) -> Iterable[bytes] | None:
        return None

    def peer_identity_key(self) -> str | None:
        return None

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return {}


def add_routes(
    app: web.Application,
    queries: QueryService,
    authenticator: Authenticator | None = None,
    *,
    body_timeout: float = 30.0,
) -> None:
    """Add every ``ROUTES`` entry, the OpenAPI file, and JSON errors under ``PREFIX``.

    A request body must arrive within ``body_timeout`` seconds (408). A watch is a
    session of ``authenticator``'s for the caller the gate admitted (``auth.CALLER``):
    capped per caller (429) and ended by an ``error`` event when its token is revoked.
    """
    spec = Path(__file__).with_name(OPENAPI).read_text()
    streams: set[_EventStream] = set()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(text=spec, content_type="application/yaml")

    async def close_streams(app: web.Application) -> None:
        for stream in list(streams):
            stream.close()

    for route in ROUTES:
        if route.streams:
            handler = _watch_handler(route, queries, streams, authenticator, body_timeout)
        else:
            handler = _unary_handler(route, queries, body_timeout)
        app.router.add_route(route.method, route.path, handler)
    app.router.add_get(f"{PREFIX}/{OPENAPI}", openapi)
    app.middlewares.append(_json_errors)
    # Before aiohttp waits for open requests to finish: event streams never would.
    app.on_shutdown.append(close_streams)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _unary_handler(route: Route, queries: QueryService, body_timeout: float) -> _Handler:
    method = getattr(queries, route.rpc)

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            fields = await _request_fields(route, request, body_timeout)
            message = _parse(route, fields, route.request_type)
        except JsonShapeError as exc:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        context = HttpContext(request)
        try:
            answer = await method(message, context)
        except RpcAbort as abort:
            return error_response(abort.code, abort.details)
        if context.code() != grpc.StatusCode.OK:
            return error_response(context.code(), context.details())
        return web.json_response(message_json(answer))

    return handle


def _watch_handler(
    route: Route,
    queries: QueryService,
    streams: set[_EventStream],
    authenticator: Authenticator | None,
    body_timeout: float,
) -> _Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            fields = await _request_fields(route, request, body_timeout)
            last_event_id = request.headers.get("Last-Event-ID")
            if last_event_id is not None:
                fields["after_id"] = _integer("Last-Event-ID", last_event_id)
            message = _parse(route, fields, query_pb2.WatchVerdictsRequest)
        except JsonShapeError as exc:
            return error_response(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        context = HttpContext(request)
        try:
            watch = await queries.open_watch(message, context)
        except RpcAbort as abort:
            return error_response(abort.code, abort.details)
        peer = context.peer()
        stream = _EventStream()
        principal = CALLER.get()
        session = None
        if authenticator is not None and principal is not None:
            try:
                session = authenticator.open_session(
                    principal, lambda why: stream.close(grpc.StatusCode.UNAUTHENTICATED, why)
                )
            except AuthError as exc:
                watch.__exit__(None, None, None)
                return error_response(exc.code, exc.message)
        streams.add(stream)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx and the like: do not buffer events
            }
        )
        log.info("verdict watcher connected over HTTP", peer=peer, after_id=watch.after_id)
        try:
            with watch:
                await response.prepare(request)
                await stream.relay(watch, response)
        except ConnectionError:
            pass  # the client went away: nobody to tell
        finally:
            streams.discard(stream)
            if session is not None and authenticator is not None:
                authenticator.close_session(session)
            log.info("verdict watcher gone", peer=peer)
        return response

    return handle


class _EventStream:
    """Relays one watch to its HTTP response until the watch fails, the client goes, or
    ``close()``: the server is shutting down, or, with a ``code``, the caller is no
    longer admitted (one ``error`` event says why)."""

    def __init__(self) -> None:
        self._closing = asyncio.Event()
        self._error: tuple[grpc.StatusCode, str] | None = None

    def close(self, code: grpc.StatusCode | None = None, message: str = "") -> None:
        if code is not None and self._error is None:
            self._error = (code, message)
        self._closing.set()

    async def relay(self, watch: VerdictStream, response: web.StreamResponse) -> None:
        closing = asyncio.ensure_future(self._closing.wait())
        pending: asyncio.Future[query_pb2.VerdictTransition] | None = None
        try:
            while not self._closing.is_set():
                if pending is None:
                    pending = asyncio.ensure_future(anext(watch))
                waiting: set[asyncio.Future[Any]] = {pending, closing}
                done, _ = await asyncio.wait(
                    waiting, timeout=HEARTBEAT, return_when=asyncio.FIRST_COMPLETED
                )
                if pending not in done:
                    if not self._closing.is_set():
                        await response.write(b": keep-alive\n\n")
                    continue
                try:
                    transition = pending.result()
                except StopAsyncIteration:
                    return  # the coordinator is stopping: a clean end
                except (WatcherOverflow, ReplayGone) as exc:
                    body = json.dumps(error_body(watch_end_code(exc), str(exc)))
                    await response.write(f"event: error\ndata: {body}\n\n".encode())
                    return
                pending = None
                data = json.dumps(message_json(transition), separators=(",", ":"))
                await response.write(
                    f"id: {transition.id}\nevent: transition\ndata: {data}\n\n".encode()
                )
            if self._error is not None:
                body = json.dumps(error_body(*self._error))
                await response.write(f"event: error\ndata: {body}\n\n".encode())
        finally:
            closing.cancel()
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending


async def _request_fields(
    route: Route, request: web.Request, body_timeout: float
) -> dict[str, Any]:
    """The request in the public JSON shape: path parameters, query parameters (named in
    ``route.query``) and, for POST, the JSON body. ``JsonShapeError`` when malformed;
    413 and 408 (``web.HTTPException``) when the body is too large or too slow."""
    descriptor = route.request_type.DESCRIPTOR
    fields: dict[str, Any] = {}
    if request.method == "POST":
        try:
            async with asyncio.timeout(body_timeout):
                raw = await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                reason=f"the request body did not arrive within {body_timeout:g}s "
                "(limits.http_idle_timeout)"
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise web.HTTPRequestEntityTooLarge(
                max_size=request.client_max_size,
                actual_size=request.content_length or 0,
                reason=f"the request body is over {request.client_max_size:,} bytes "
                "(limits.max_body_bytes)",
            ) from None
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise JsonShapeError(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise JsonShapeError("the body: expected a JSON object")
        fields.update(body)
    for parameter in request.query:
        if parameter not in route.query:
            known = ", ".join(route.query) or "none"
            raise JsonShapeError(f"unknown query parameter {parameter!r} (known: {known})")
    for parameter, name in route.query.items():
        values = request.query.getall(parameter, [])
        if not values:
            continue
        field = descriptor.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            pairs = {}
            for value in values:
                key, equals, item = value.partition("=")
                if not equals:
                    raise JsonShapeError(f"{parameter}: {value!r} is not NAME=VALUE")
                pairs[key] = item
            fields[name] = pairs
        elif field.is_repeated:
            fields[name] = values
        elif len(values) > 1:
            raise JsonShapeError(f"{parameter}: given {len(values)} times, at most once")
        elif field.type in _INTEGER_TYPES:
            fields[name] = _integer(parameter, values[0])
        elif parameter in route.range_ends:
            fields[name] = _end_of_second(values[0])
        else:
            fields[name] = values[0]
    fields.update(request.match_info)
    return fields


def _parse(route: Route, fields: dict[str, Any], message_type: type[M]) -> M:
    """``message_from_json``, its errors naming the query parameter a field came from."""
    try:
        return message_from_json(fields, message_type)
    except JsonShapeError as exc:
        parameters = {field: parameter for parameter, field in route.query.items()}
        match = re.match(r"([\w.]*)(?:\[\d+\])?(.*)", str(exc), re.DOTALL)
        if match is not None and match.group(1) in parameters:
            raise JsonShapeError(f"{parameters[match.group(1)]}{match.group(2)}") from None
        raise


_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
    }
)


def _end_of_second(text: str) -> str:
    """2026-11-26T10:00:02Z -> 2026-11-26T10:00:02.999999999Z; other text as it is."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(Z|[+-]\d\d:\d\d)", text.strip(), re.IGNORECASE)
    return text if match is None else f"{match.group(1)}.999999999{match.group(2)}"


def _integer(parameter: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise JsonShapeError(f"{parameter}: {text!r} is not a whole number") from None


def error_body(code: grpc.StatusCode, message: str) -> dict[str, Any]:
    name: str = code.name
    return {"error": {"code": name.lower(), "message": message}}


def error_response(code: grpc.StatusCode, message: str) -> web.Response:
    return web.json_response(error_body(code, message), status=HTTP_STATUS.get(code, 500))


_HTTP_TO_STATUS = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Our own reasons say what went wrong; aiohttp's stock ones need the request named.
_OWN_REASONS = frozenset({408, 413})


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Unknown routes and methods under the API's prefix answer in its error shape; an
    exception in a servicer is logged and answered 500 without its details."""
    if not request.path.startswith(f"{PREFIX}/"):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_TO_STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
        message = (
            exc.reason
            if exc.status in _OWN_REASONS
            else f"{exc.reason}: {shown(request.method)} {shown(request.path)}"
        )
        response = web.json_response(error_body(code, message), status=exc.status)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
        return response
    except Exception:
        log.exception("JSON API request failed", method=request.method, path=request.path)
        return error_response(grpc.StatusCode.INTERNAL, "internal error; see the coordinator's log")
