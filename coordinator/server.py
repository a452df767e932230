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
- the file reloader: on SIGHUP and when the checks file or the tokens file changes
  (polled every ``RELOAD_POLL_INTERVAL``). A bad file logs one error line and changes
  nothing. A good checks file is applied and the change pushed to every connected agent;
  a good tokens file replaces the admitted tokens, and every stream whose token it no
  longer lists ends (``coordinator.auth``);
- with ``tls:``, the certificate reloader (``vantage.tls.ServerCertificates``);
- the transition store's pruner (``history_retention``); the store is closed when
  ``run()`` ends;
- the MQTT publisher (``coordinator.mqtt``), only when ``mqtt.url`` is configured.

Every call passes the gate first (``coordinator.gate``: authentication, scopes, size
limits, stream and connection caps). A listener beyond loopback needs TLS (or
``tls: off``) and query tokens (or ``query_auth: none``): ``ConfigError`` otherwise.

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
from vantage.tls import ServerCertificates, TlsError
from vantage_proto.v1 import agent_pb2_grpc, query_pb2_grpc

from .agent_service import AgentService
from .auth import Authenticator, QueryAuth
from .config import CoordinatorConfig, exposure_problem
from .engine import VerdictEngine
from .errors import ListenError
from .fleet import AgentFleet
from .gate import AGENT_SERVICE, QUERY_SERVICE, GrpcGate, http_gate
from .http import HttpEndpoint, build_app
from .limits import GRPC_SLACK, LimitsConfig
from .metrics import CoordinatorMetrics
from .mqtt import MqttPublisher
from .ondemand import OnDemandChecks
from .query_service import QueryService
from .registry import CheckRegistry
from .state import CoordinatorState
from .store import TransitionStore
from .tokens import Scope, TokenRegistry
from .transitions import TransitionFeed, TransitionLog, TransitionRecorder

log = get_logger("coordinator")

TICK_INTERVAL = 1.0
# Half a second: a revoked token's streams end within a second.
RELOAD_POLL_INTERVAL = 0.5
GRPC_GRACE = 2.0
# A SIGTERM's drain ends within this (systemd's TimeoutStopSec is twice it), GRPC_GRACE
# for the open calls included.
DRAIN_TIMEOUT = 10.0
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Agents sit behind NAT and cheap links: pings keep idle streams open through middleboxes
# and let the server notice a peer that vanished without closing its connection.
_GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A connection with no call for this long is closed (clients reconnect by themselves).
    ("grpc.max_connection_idle_ms", 300_000),
]


def _grpc_options(limits: LimitsConfig) -> list[tuple[str, int]]:
    return [
        *_GRPC_OPTIONS,
        # gRPC's own ceiling: above ours (coordinator.gate counts what is between).
        ("grpc.max_receive_message_length", int(limits.max_message_bytes) + GRPC_SLACK),
        # The TLS handshake and HTTP/2's settings exchange, on a connection that stalls.
        ("grpc.server_handshake_timeout_ms", round(limits.handshake_timeout * 1000)),
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

    def __init__(
        self,
        address: str,
        agents: AgentService,
        queries: QueryService,
        *,
        gate: GrpcGate,
        limits: LimitsConfig,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.address = address
        self.port: int | None = None
        self.bound = asyncio.Event()
        self._agents = agents
        self._queries = queries
        self._gate = gate
        self._limits = limits
        self._credentials = credentials
        self._health: HealthServicer | None = None

    async def not_serving(self) -> None:
        """Report NOT_SERVING for every service from now on (a drain has begun)."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def run(self) -> None:
        server = grpc.aio.server(
            interceptors=[self._gate],
            options=_grpc_options(self._limits),
            maximum_concurrent_rpcs=self._limits.max_concurrent_rpcs,
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(self._agents, server)
        query_pb2_grpc.add_QueryServiceServicer_to_server(self._queries, server)
        health = self._health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (AGENT_SERVICE, QUERY_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        try:
            if self._credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, self._credentials)
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

    The constructor reads the checks and tokens files named in ``config`` (and the TLS
    files, MQTT's password and CA files), opens the transition store (``store_file``),
    and raises ``ConfigError`` (one line) when one of them is unusable or the listeners
    would be exposed unprotected; nothing listens until ``run()``.
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
        checks = self._load_checks() if config.checks_file is not None else ()
        self._tokens_signature = _signature(config.tokens_file)
        tokens = (
            TokenRegistry.load(config.tokens_file)
            if config.tokens_file is not None
            else TokenRegistry()
        )
        problem = exposure_problem(config, tokens.has_scope(Scope.QUERY, Scope.CHECKNOW))
        if problem is not None:
            raise ConfigError(problem)
        self.authenticator = Authenticator(
            tokens,
            query_auth=config.query_auth,
            max_streams=config.limits.max_streams_per_token,
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
        self.feed = feed = TransitionFeed(self.metrics)
        self.state = CoordinatorState(
            engine=self.engine,
            fleet=self.fleet,
            checks=self.checks,
            recorder=TransitionRecorder(self.transitions, feed, self.metrics),
            store=self.transitions.store,
            metrics=self.metrics,
        )
        self.state.restore()
        self.certificates: ServerCertificates | None = None
        if (tls := config.server_tls) is not None:
            try:
                self.certificates = ServerCertificates(tls, on_reload=self._tls_reloaded)
            except TlsError as exc:
                raise ConfigError(str(exc)) from None
            self.metrics.tls_serving(self.certificates.not_after)

        self.on_demand = OnDemandChecks(
            config.on_demand,
            config.engine.settings(),
            fleet=self.fleet,
            send=lambda agent, request: self._agents.send_probe(agent, request),
            clock=clock,
        )
        self._agents = AgentService(
            state=self.state,
            authenticator=self.authenticator,
            metrics=self.metrics,
            heartbeat_interval=config.heartbeat_interval,
            limits=config.limits,
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
        gate = GrpcGate(
            self.authenticator,
            self.metrics,
            max_message_bytes=int(config.limits.max_message_bytes),
        )
        self._grpc = GrpcEndpoint(
            config.listen,
            self._agents,
            queries,
            gate=gate,
            limits=config.limits,
            credentials=self.certificates.grpc_credentials() if self.certificates else None,
        )
        app = build_app(
            metrics=self.metrics.exposition,
            health=self._health,
            queries=queries,
            gate=http_gate(self.authenticator, self.metrics),
            authenticator=self.authenticator,
            limits=config.limits,
        )
        self._http = HttpEndpoint(
            config.http_listen,
            app,
            ssl_context=self.certificates.ssl_context() if self.certificates else None,
            limits=config.limits,
            on_refused=lambda reason: self.metrics.refused("http", reason),
        )
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
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Drain and stop (what SIGTERM does): ``run()`` returns within DRAIN_TIMEOUT
        plus GRPC_GRACE. Cancelling ``run()`` instead stops at once, without a drain."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until cancelled. ``ListenError`` when an address cannot be bound."""
        if self._ran:
            raise RuntimeError("a Coordinator runs once")
        self._ran = True
        try:
            async with asyncio.TaskGroup() as tasks:
                parts = [
                    tasks.create_task(self._grpc.run()),
                    tasks.create_task(self._http.run()),
                    tasks.create_task(self._announce()),
                    tasks.create_task(self._tick()),
                    tasks.create_task(self._watch_files()),
                    tasks.create_task(self.transitions.store.run()),
                ]
                if self.certificates is not None:
                    parts.append(tasks.create_task(self.certificates.run()))
                if self.mqtt is not None:
                    parts.append(tasks.create_task(self.mqtt.run()))
                await self._stop.wait()
                await self._drain()
                for part in parts:
                    part.cancel()
        except ExceptionGroup as group:
            # A bind failure is an operator's problem with one clear line: raise it bare.
            for error in _leaves(group):
                if isinstance(error, ListenError):
                    raise error from None
            raise
        finally:
            self.transitions.store.close()
            log.info("coordinator stopped")

    async def _drain(self) -> None:
        """Stop taking part, in order: verdicts stop moving (everything is about to
        leave), health says NOT_SERVING, every agent stream ends with UNAVAILABLE (its
        agent reconnects with backoff, to this coordinator once it is back, having
        spooled meanwhile) and new ones are refused, clients' watches end cleanly, and
        MQTT gets what is queued, all within DRAIN_TIMEOUT; the store is committed."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + DRAIN_TIMEOUT
        log.info("coordinator draining", timeout_s=DRAIN_TIMEOUT)
        self.state.stop()
        await self._grpc.not_serving()
        agents = self._agents.drain("coordinator shutting down: reconnect later")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._agents.all_ended()
        watchers = self.feed.close_watchers()
        mqtt_flushed = None
        if self.mqtt is not None:
            mqtt_flushed = await self.mqtt.flush(max(0.0, deadline - loop.time()))
        self.transitions.store.flush()
        log.info(
            "coordinator drained",
            agents=agents,
            agents_left=self._agents.open_streams,
            watchers=watchers,
            mqtt_flushed=mqtt_flushed,
            seconds=round(loop.time() - started, 3),
        )

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
            checks = self._load_checks()
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

    def _load_checks(self) -> tuple[AnyCheck, ...]:
        """The checks file, within ``limits.max_checks_per_agent``; ConfigError."""
        assert self.config.checks_file is not None
        checks = load_checks(self.config.checks_file)
        most = self.config.limits.max_checks_per_agent
        if len(checks) > most:
            raise ConfigError(
                f"{self.config.checks_file}: {len(checks):,} checks is more than "
                f"limits.max_checks_per_agent ({most:,}); every agent runs every check"
            )
        return checks

    def reload_tokens(self) -> bool:
        """Re-read the tokens file and admit by it from now on; False when there is none
        or it is invalid (one error line; the admitted tokens stay). Every open stream
        the new file no longer admits ends at once."""
        path = self.config.tokens_file
        if path is None:
            return False
        try:
            tokens = TokenRegistry.load(path)
        except ConfigError as exc:
            self.metrics.tokens_reloaded("failed")
            log.error("tokens file refused, the admitted tokens stay", error=str(exc))
            return False
        self.metrics.tokens_reloaded("applied")
        ended = self.authenticator.replace(tokens)
        for warning in tokens.warnings:
            log.warning(warning)
        log.info("tokens reloaded", tokens=len(tokens), streams_ended=len(ended))
        return True

    def _tls_reloaded(self, result: str) -> None:
        self.metrics.tls_reloaded(result)
        if self.certificates is not None:
            self.metrics.tls_serving(self.certificates.not_after)

    def _apply(self, checks: tuple[AnyCheck, ...]) -> None:
        change = self.state.set_checks(checks)
        if not change:
            self.metrics.checks_reloaded("unchanged")
            log.info("checks file reloaded, no change", checks=len(checks))
            return
        self.metrics.checks_reloaded("applied")
        log.info(
            "checks reloaded",
            checks=len(checks),
            upserted=[check.name for check in change.upserts],
            removed=list(change.removed),
        )
        if self.mqtt is not None:
            self.mqtt.checks_changed(change)

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
        tokens = self.authenticator.tokens
        if not tokens.has_scope(Scope.AGENT):
            log.warning(
                "no agent tokens configured: every agent will be refused",
                tokens_file=str(self.config.tokens_file) if self.config.tokens_file else None,
            )
        for warning in tokens.warnings:
            log.warning(warning)
        exposed = self.config.exposed()
        if exposed and self.certificates is None:
            log.warning(
                "serving plaintext beyond loopback (tls: off): tokens and verdicts cross "
                "the network unencrypted",
                listeners=[getattr(self.config, name) for name in exposed],
            )
        if self.authenticator.query_auth is QueryAuth.NONE:
            log.warning(
                "query_auth: none: anyone who reaches the ports may query verdicts and run "
                "on-demand checks",
            )
        elif self.authenticator.queries_open:
            log.info("no query tokens: queries are answered for loopback clients only")
        log.info(
            "coordinator listening",
            grpc_port=self.bound_ports.grpc,
            http_port=self.bound_ports.http,
            listen=self.config.listen,
            http_listen=self.config.http_listen,
            tls="off"
            if self.certificates is None
            else ("mutual" if self.certificates.mutual else "on"),
            checks=len(self.checks),
            version=__version__,
        )
        self.started.set()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            self.state.tick()

    async def _watch_files(self) -> None:
        """Reload the checks and tokens files on SIGHUP and when they change."""
        hangup = asyncio.Event()
        hup = getattr(signal, "SIGHUP", None) if self._reload_on_sighup else None
        with _signal_handler(hup, hangup.set):
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELOAD_POLL_INTERVAL):
                        await hangup.wait()
                if hangup.is_set():
                    hangup.clear()
                    log.info(
                        "SIGHUP: reloading checks and tokens",
                        checks_file=_str(self.config.checks_file),
                        tokens_file=_str(self.config.tokens_file),
                    )
                    self._checks_signature = _signature(self.config.checks_file)
                    self._tokens_signature = _signature(self.config.tokens_file)
                    self.reload_tokens()
                    self.reload_checks()
                    continue
                # Remember each signature first: a bad file is reported once, not every poll.
                signature = _signature(self.config.tokens_file)
                if signature != self._tokens_signature:
                    self._tokens_signature = signature
                    log.info("tokens file changed", tokens_file=_str(self.config.tokens_file))
                    self.reload_tokens()
                signature = _signature(self.config.checks_file)
                if signature != self._checks_signature:
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
