"""The coordinator process: every part wired together and run in one TaskGroup.

Lifecycle::

    coordinator = Coordinator(load_config(path))   # reads checks and tokens: ConfigError
    await coordinator.run()                        # binds (ListenError), serves until cancelled

``run()`` runs, in one ``asyncio.TaskGroup``:

- the gRPC server (``listen``): ``vantage.v1.AgentService``, ``vantage.v1.QueryService``,
  the standard health service (SERVING for "" and both services) and server reflection;
- the HTTP endpoint (``http_listen``): ``/metrics``, ``/healthz`` and the JSON API
  (``/api/v1/``, ``coordinator.api``);
- the engine ticker: ``engine.tick()`` every second, so stale views move verdicts and
  rounds of second opinions end on time (and the rechecks it asks for are sent);
- the checks reloader: on SIGHUP and when the checks file changes (polled every 2 s).
  A bad file logs one error line and changes nothing; a good one is applied and the
  change pushed to every connected agent;
- the transition store's pruner (``history_retention``); the store is closed when
  ``run()`` ends;
- the MQTT publisher (``coordinator.mqtt``), only when ``mqtt.url`` is configured.

Once both listeners are bound it logs ``coordinator listening`` with the actual
``grpc_port`` and ``http_port`` (end-to-end tests read them from that line), fills
``bound_ports`` and sets ``started``. Cancelling ``run()`` shuts down: the gRPC server
reports NOT_SERVING, gives open calls ``GRPC_GRACE`` seconds, and every part closes.

Every transition the engine returns, from any of these, goes through one
``TransitionRecorder``: numbered, logged, counted and published to watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from vantage import __version__
from vantage.checks import AnyCheck, load_checks
from vantage.configfile import ConfigError
from vantage.logs import get_logger
from vantage_proto.v1 import agent_pb2, agent_pb2_grpc, query_pb2, query_pb2_grpc

from .agent_service import AgentService
from .config import CoordinatorConfig
from .engine import VerdictEngine
from .errors import ListenError
from .fleet import AgentFleet
from .http import HttpEndpoint, build_app
from .metrics import CoordinatorMetrics
from .mqtt import MqttPublisher
from .ondemand import OnDemandChecks
from .query_service import QueryService
from .registry import CheckRegistry
from .store import TransitionStore
from .tokens import TokenRegistry
from .transitions import TransitionFeed, TransitionLog, TransitionRecorder

log = get_logger("coordinator")

TICK_INTERVAL = 1.0
RELOAD_POLL_INTERVAL = 2.0
GRPC_GRACE = 2.0
AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
QUERY_SERVICE = query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Agents sit behind NAT and cheap links: pings keep idle streams open through middleboxes
# and let the server notice a peer that vanished without closing its connection.
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass(frozen=True, slots=True)
class BoundPorts:
    """The ports the listeners actually bound (differs from the config with port 0)."""

    grpc: int
    http: int


class GrpcEndpoint:
    """The gRPC server on ``address``: the two Vantage services, health and reflection.

    Lifecycle like ``HttpEndpoint``: ``run()`` binds (``ListenError``), sets ``bound``
    with ``port`` filled in, serves until cancelled, then stops with ``GRPC_GRACE``.
    """

    def __init__(self, address: str, agents: AgentService, queries: QueryService) -> None:
        self.address = address
        self.port: int | None = None
        self.bound = asyncio.Event()
        self._agents = agents
        self._queries = queries

    async def run(self) -> None:
        server = grpc.aio.server(options=_GRPC_OPTIONS)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self._agents, server)
        query_pb2_grpc.add_QueryServiceServicer_to_server(self._queries, server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (AGENT_SERVICE, QUERY_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as exc:  # grpcio raises this, with no reason, on a failed bind
            raise ListenError(f"cannot listen on {self.address} (listen): {exc}") from exc
        await server.start()
        try:
            for service in ("", AGENT_SERVICE, QUERY_SERVICE):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self.port = port
            self.bound.set()
            await server.wait_for_termination()
        finally:
            await health.enter_graceful_shutdown()
            await server.stop(GRPC_GRACE)


class Coordinator:
    """One coordinator: fleet, checks, engine, services, metrics and listeners.

    The constructor reads the checks and tokens files named in ``config`` (and MQTT's
    password and CA files), opens the transition store (``store_file``), and raises
    ``ConfigError`` (one line) when one of them is unusable; nothing listens until
    ``run()``.
    ``clock`` (wall-clock seconds) drives the engine and the fleet's timestamps.
    ``reload_on_sighup`` installs a SIGHUP handler on the running loop during ``run()``
    (main thread only; leave it off when several coordinators share a process).

    ``run()`` may be called once. ``started`` is set, and ``bound_ports`` filled in, once
    both listeners are bound.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float] = time.time,
        reload_on_sighup: bool = True,
    ) -> None:
        self.config = config
        self._reload_on_sighup = reload_on_sighup
        self._checks_signature = _signature(config.checks_file)
        checks = load_checks(config.checks_file) if config.checks_file is not None else ()
        self._tokens = (
            TokenRegistry.load(config.tokens_file)
            if config.tokens_file is not None
            else TokenRegistry()
        )

        self.checks = CheckRegistry(checks)
        self.fleet = AgentFleet(clock)
        self.engine = VerdictEngine(config.engine.settings(), clock)
        self.metrics = CoordinatorMetrics(
            version=__version__,
            verdicts=self.engine.verdicts,
            agents=lambda: self.fleet.agents(self.engine.impaired()),
            measurements=self.engine.measurements,
            per_agent=config.per_agent_metrics,
        )
        self.transitions = TransitionLog(
            TransitionStore.open(config.store_file, retention=config.history_retention, clock=clock)
        )
        feed = TransitionFeed(self.metrics)
        self._recorder = TransitionRecorder(self.transitions, feed, self.metrics)
        self._recorder.record(self.engine.set_checks(checks))

        self.on_demand = OnDemandChecks(
            config.on_demand,
            config.engine.settings(),
            fleet=self.fleet,
            send=lambda agent, request: self._agents.send_probe(agent, request),
            clock=clock,
        )
        self._agents = AgentService(
            engine=self.engine,
            fleet=self.fleet,
            checks=self.checks,
            tokens=self._tokens,
            recorder=self._recorder,
            metrics=self.metrics,
            heartbeat_interval=config.heartbeat_interval,
            clock=clock,
            on_demand=self.on_demand,
        )
        queries = QueryService(
            self.engine,
            self.fleet,
            self.checks,
            feed,
            history=self.transitions,
            on_demand=self.on_demand,
        )
        self._grpc = GrpcEndpoint(config.listen, self._agents, queries)
        app = build_app(metrics=self.metrics.exposition, health=self._health, queries=queries)
        self._http = HttpEndpoint(config.http_listen, app)
        self.mqtt = (
            MqttPublisher(
                config.mqtt,
                engine=self.engine,
                fleet=self.fleet,
                checks=self.checks,
                history=self.transitions,
                feed=feed,
                registry=self.metrics.registry,
            )
            if config.mqtt.enabled
            else None
        )

        self.started = asyncio.Event()
        self.bound_ports: BoundPorts | None = None
        self._ran = False

    async def run(self) -> None:
        """Serve until cancelled. ``ListenError`` when an address cannot be bound."""
        if self._ran:
            raise RuntimeError("a Coordinator runs once")
        self._ran = True
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._grpc.run())
                tasks.create_task(self._http.run())
                tasks.create_task(self._announce())
                tasks.create_task(self._tick())
                tasks.create_task(self._watch_checks_file())
                tasks.create_task(self.transitions.store.run())
                if self.mqtt is not None:
                    tasks.create_task(self.mqtt.run())
        except ExceptionGroup as group:
            # A bind failure is an operator's problem with one clear line: raise it bare.
            for error in _leaves(group):
                if isinstance(error, ListenError):
                    raise error from None
            raise
        finally:
            self.transitions.store.close()
            log.info("coordinator stopped")

    def reload_checks(self) -> bool:
        """Re-read the checks file and apply it; False when there is none or it is invalid.

        An invalid file changes nothing (one error line in the log). A valid one replaces
        the check set in the engine and the registry, and pushes the change to every
        connected agent as incremental assignments.
        """
        path = self.config.checks_file
        if path is None:
            log.info("no checks_file configured, nothing to reload")
            return False
        try:
            checks = load_checks(path)
        except ConfigError as exc:
            self.metrics.checks_reloaded("failed")
            log.error(
                "checks file refused, the running checks stay",
                error=str(exc),
                checks=len(self.checks),
            )
            return False
        self._apply(checks)
        return True

    def _apply(self, checks: tuple[AnyCheck, ...]) -> None:
        change = self.checks.change_to(checks)
        if not change:
            self.metrics.checks_reloaded("unchanged")
            log.info("checks file reloaded, no change", checks=len(checks))
            return
        transitions = self.engine.set_checks(checks)
        self.checks.replace(checks)
        for name in change.removed:
            self.metrics.forget_check(name)
        self.metrics.checks_reloaded("applied")
        log.info(
            "checks reloaded",
            checks=len(checks),
            upserted=[check.name for check in change.upserts],
            removed=list(change.removed),
        )
        self._recorder.record(transitions)
        if self.mqtt is not None:
            self.mqtt.checks_changed(change)
        self._agents.push_assignments(change)
        self._agents.send_rechecks()

    def _health(self) -> dict[str, object]:
        return {
            "version": __version__,
            "agents_connected": self.fleet.connected_count(),
            "checks_loaded": len(self.checks),
        }

    async def _announce(self) -> None:
        await self._grpc.bound.wait()
        await self._http.bound.wait()
        assert self._grpc.port is not None
        assert self._http.port is not None
        self.bound_ports = BoundPorts(grpc=self._grpc.port, http=self._http.port)
        if not self.config.on_demand.guard:
            log.warning(
                "on-demand guard is off (on_demand.guard: false): CheckNow will probe any "
                "address, including private, loopback and cloud metadata ones"
            )
        if not self._tokens:
            log.warning(
                "no agent tokens configured: every agent will be refused",
                tokens_file=str(self.config.tokens_file) if self.config.tokens_file else None,
            )
        log.info(
            "coordinator listening",
            grpc_port=self.bound_ports.grpc,
            http_port=self.bound_ports.http,
            listen=self.config.listen,
            http_listen=self.config.http_listen,
            checks=len(self.checks),
            version=__version__,
        )
        self.started.set()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            started = time.perf_counter()
            self._recorder.record(self.engine.tick())
            self.metrics.engine_ticked(time.perf_counter() - started)
            self._agents.send_rechecks()

    async def _watch_checks_file(self) -> None:
        hangup = asyncio.Event()
        hup = getattr(signal, "SIGHUP", None) if self._reload_on_sighup else None
        with _signal_handler(hup, hangup.set):
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELOAD_POLL_INTERVAL):
                        await hangup.wait()
                if hangup.is_set():
                    hangup.clear()
                    log.info("SIGHUP: reloading checks", checks_file=_str(self.config.checks_file))
                    self._checks_signature = _signature(self.config.checks_file)
                    self.reload_checks()
                    continue
                signature = _signature(self.config.checks_file)
                if signature != self._checks_signature:
                    # Remember it first: a bad file is reported once, not every poll.
                    self._checks_signature = signature
                    log.info("checks file changed", checks_file=_str(self.config.checks_file))
                    self.reload_checks()


def _signature(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a changed file: modification time, size and inode (editors replace)."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


@contextlib.contextmanager
def _signal_handler(signum: int | None, callback: Callable[[], None]) -> Iterator[None]:
    """Install a loop signal handler for the block (no-op where signals are unsupported)."""
    loop = asyncio.get_running_loop()
    installed = False
    if signum is not None:
        try:
            loop.add_signal_handler(signum, callback)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            log.warning("cannot handle signal here; reload by editing the file", signal=signum)
    try:
        yield
    finally:
        if installed:
            assert signum is not None
            loop.remove_signal_handler(signum)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves
