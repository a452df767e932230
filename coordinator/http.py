"""The coordinator's HTTP endpoint (``http_listen``): ``/metrics`` and ``/healthz``.

``build_app`` is the one place routes are added (the ``/api/v1/`` JSON mirrors of the
query service go there too). ``HttpEndpoint`` serves an app until cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from vantage.configfile import split_host_port
from vantage.logs import get_logger

from .errors import ListenError

log = get_logger("coordinator.http")


def build_app(
    *, registry: CollectorRegistry, health: Callable[[], Mapping[str, object]]
) -> web.Application:
    """The HTTP routes.

    ``/metrics`` is the Prometheus exposition of ``registry``, collected on the event loop
    at each scrape. ``/healthz`` answers 200 with ``{"status": "ok", **health()}`` while
    the process serves at all (liveness, not "verdicts are known").
    """

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **health()})

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
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
