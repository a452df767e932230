"""The coordinator's HTTP endpoint (``http_listen``): ``/metrics``, ``/healthz`` and the
JSON API (``/api/v1/``, see ``coordinator.api``).

``build_app`` is the one place routes are added. ``HttpEndpoint`` serves an app until
cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping

from aiohttp import web

from vantage.configfile import split_host_port
from vantage.logs import get_logger

from .api import add_routes
from .errors import ListenError
from .metrics import EXPOSITION_TYPE
from .query_service import QueryService

log = get_logger("coordinator.http")


def build_app(
    *,
    metrics: Callable[[Collection[str] | None], bytes],
    health: Callable[[], Mapping[str, object]],
    queries: QueryService | None = None,
) -> web.Application:
    """The HTTP routes.

    ``/metrics`` is ``metrics()`` (``CoordinatorMetrics.exposition``), the Prometheus text
    format, collected on the event loop at each scrape and compressed when asked;
    ``?name[]=NAME`` (repeated) narrows it to those families, as prometheus_client's does.
    ``/healthz`` answers 200 with ``{"status": "ok", **health()}`` while the process
    serves at all (liveness, not "verdicts are known"). With ``queries``, the JSON API
    mirrors it under ``/api/v1/`` (``coordinator.api``).
    """

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **health()})

    async def exposition(request: web.Request) -> web.Response:
        names = request.query.getall("name[]", None)
        response = web.Response(body=metrics(names), headers={"Content-Type": EXPOSITION_TYPE})
        response.enable_compression()  # aiohttp compresses large bodies off the loop
        return response

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    app.router.add_get("/healthz", healthz)
    if queries is not None:
        add_routes(app, queries)
    return app


class HttpEndpoint:
    """Serves ``app`` on ``address`` (``host:port``; port 0 picks a free one).

    Lifecycle: ``run()`` binds (``ListenError`` when it cannot), sets ``bound`` with
    ``port`` filled in, then serves until cancelled and closes its sockets on the way out.
    """

    def __init__(self, address: str, app: web.Application) -> None:
        self.address = address
        self.port: int | None = None
        self.bound = asyncio.Event()
        self._app = app

    async def run(self) -> None:
        host, port = split_host_port(self.address, port_zero=True)
        # Scrapes every few seconds would drown the log; errors are still logged.
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {self.address} (http_listen): {exc.strerror or exc}"
                ) from exc
            self.port = int(runner.addresses[0][1])
            self.bound.set()
            await asyncio.Future()  # serve until cancelled
        finally:
            await runner.cleanup()
