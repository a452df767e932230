"""The coordinator's HTTP endpoint (``http_listen``): ``/metrics``, ``/healthz`` and the
JSON API (``/api/v1/``, see ``coordinator.api``), over TLS when the coordinator has a
certificate.

``build_app`` is the one place routes are added; every request passes ``gate`` (the
``coordinator.gate.http_gate`` middleware) first. ``HttpEndpoint`` serves an app until
cancelled, within the HTTP limits of ``coordinator.limits``: the TLS handshake within
``handshake_timeout``, a connection's first request head within ``http_idle_timeout``
(else ``408`` and closed), later ones likewise (aiohttp's keep-alive timeout closes the
connection), bodies of at most ``max_body_bytes`` (``413``), and the connection caps of
``coordinator.gate.ConnectionGate``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Collection, Mapping
from typing import Any

from aiohttp import web

from vantage.configfile import split_host_port
from vantage.logs import get_logger

from .api import add_routes
from .auth import Authenticator
from .errors import ListenError
from .gate import ConnectionGate
from .limits import LimitsConfig
from .metrics import EXPOSITION_TYPE
from .query_service import QueryService

log = get_logger("coordinator.http")


def build_app(
    *,
    metrics: Callable[[Collection[str] | None], bytes],
    health: Callable[[], Mapping[str, object]],
    queries: QueryService | None = None,
    gate: Any = None,
    authenticator: Authenticator | None = None,
    limits: LimitsConfig | None = None,
) -> web.Application:
    """The HTTP routes.

    ``/metrics`` is ``metrics()`` (``CoordinatorMetrics.exposition``), the Prometheus text
    format, collected on the event loop at each scrape and compressed when asked;
    ``?name[]=NAME`` (repeated) narrows it to those families, as prometheus_client's does.
    ``/healthz`` answers 200 with ``{"status": "ok", **health()}`` while the process
    serves at all (liveness, not "verdicts are known"). With ``queries``, the JSON API
    mirrors it under ``/api/v1/`` (``coordinator.api``); its watches are sessions of
    ``authenticator`` (capped per caller, ended on revocation).
    """
    limits = limits or LimitsConfig()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **health()})

    async def exposition(request: web.Request) -> web.Response:
        names = request.query.getall("name[]", None)
        response = web.Response(body=metrics(names), headers={"Content-Type": EXPOSITION_TYPE})
        response.enable_compression()  # aiohttp compresses large bodies off the loop
        return response

    app = web.Application(
        client_max_size=limits.max_body_bytes, middlewares=[gate] if gate is not None else []
    )
    app.router.add_get("/metrics", exposition)
    app.router.add_get("/healthz", healthz)
    if queries is not None:
        add_routes(app, queries, authenticator, body_timeout=limits.http_idle_timeout)
    return app


class HttpEndpoint:
    """Serves ``app`` on ``address`` (``host:port``; port 0 picks a free one), over TLS
    with ``ssl_context``, within ``limits`` (see the module docstring); ``on_refused``
    hears the reason of every connection refused or timed out.

    Lifecycle: ``run()`` binds (``ListenError`` when it cannot), sets ``bound`` with
    ``port`` filled in, then serves until cancelled and closes its sockets on the way out.
    """

    def __init__(
        self,
        address: str,
        app: web.Application,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: LimitsConfig | None = None,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.address = address
        self.port: int | None = None
        self.bound = asyncio.Event()
        self._app = app
        self._ssl = ssl_context
        self._limits = limits or LimitsConfig()
        self._on_refused = on_refused

    async def run(self) -> None:
        host, port = split_host_port(self.address, port_zero=True)
        limits = self._limits
        # Scrapes every few seconds would drown the log; errors are still logged.
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=limits.http_idle_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        gate = ConnectionGate(
            runner.server,
            total=limits.max_http_connections,
            per_client=limits.max_http_connections_per_client,
            head_timeout=limits.http_idle_timeout,
            on_refused=self._on_refused,
        )
        loop = asyncio.get_running_loop()
        server: asyncio.Server | None = None
        try:
            try:
                server = await loop.create_server(
                    gate,
                    host or None,
                    port,
                    ssl=self._ssl,
                    ssl_handshake_timeout=limits.handshake_timeout if self._ssl else None,
                    reuse_address=True,
                )
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {self.address} (http_listen): {exc.strerror or exc}"
                ) from exc
            self.port = int(server.sockets[0].getsockname()[1])
            self.bound.set()
            await asyncio.Future()  # serve until cancelled
        finally:
            if server is not None:
                server.close()
            await runner.cleanup()
