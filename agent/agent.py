"""The agent process: a scheduler running the assigned checks and a link to the
coordinator, wired together by one bounded result store: the on-disk spool
(``agent.spool``) when ``spool_dir`` is set, else a ``ResultBuffer`` in memory.

Entry point (what ``vantage agent`` does)::

    settings = AgentSettings(coordinator="coord.example:7400", name="eu-1",
                             region="eu", token=token)
    try:
        asyncio.run(Agent(settings).run())   # uvloop.run(...) when installed
    except FatalError as exc:                # the coordinator refused the agent
        sys.exit(f"vantage agent: {exc}")

``Agent.run`` returns only by cancellation (Ctrl-C, SIGTERM handled by the runner) or by
raising ``FatalError``; transient trouble with the coordinator is retried inside.

With a spool, ``Agent(settings)`` opens and locks it (``SpoolError``, a ``FatalError``, when
the directory cannot be used or another agent has it) and announces its id as the
instance id, so that sequence numbers go on across restarts; ``run`` flushes it every
``flush_interval`` and closes it (a last flush, the lock released) however it ends.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vantage import names, native
from vantage.checks import split_host_port
from vantage.logs import get_logger
from vantage.tls import ClientTls

from .buffer import ResultBuffer, ResultStore
from .errors import FatalError, most_severe
from .link import CoordinatorLink
from .probes import PROBES, ProbeFn
from .scheduler import DEFAULT_GRACE, DEFAULT_MAX_IN_FLIGHT, Scheduler
from .spool import DEFAULT_FLUSH_INTERVAL, DEFAULT_SPOOL_BYTES, MIN_SPOOL_BYTES, Spool

__all__ = ["Agent", "AgentSettings", "FatalError"]

# Cyclic GC thresholds while an agent runs. Each probe allocates a few dozen container
# objects, nearly all freed by reference counting; with the default 700 the collector ran
# every few dozen probes and, traversing thousands of live tasks and futures each time,
# took over 40% of the agent's CPU at 6,000 probes/s (py-spy), enough to tip it into
# overload. Cycles still get collected, just in larger, rarer batches.
_GC_THRESHOLD = (50_000, 20, 100)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything an agent needs, validated once at construction (ValueError, one line).

    ``coordinator`` is "host:port" (``[v6]:port`` for an IPv6 literal). The tunables have
    production defaults; tests shorten the timings.
    """

    coordinator: str
    name: str
    region: str
    # None: a client certificate (``tls.cert_file``) stands in for the token.
    token: str | None = field(repr=False)
    # How to dial the coordinator; None: TLS unless it is on a loopback address.
    tls: ClientTls | None = None
    # Where results not yet acknowledged by the coordinator are kept (agent.spool); None:
    # in memory only, lost with the process, and a new instance id at every start.
    spool_dir: Path | None = None
    # The spool's bound on disk; beyond it the oldest results are dropped and counted.
    spool_bytes: int = DEFAULT_SPOOL_BYTES
    # How often the spool writes: a kill -9 loses at most this much of the results.
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    # Without a spool: results not yet acknowledged, sent or not; beyond this the oldest
    # are dropped and counted.
    buffer_size: int = 100_000
    # Results per ResultBatch at most. A stream write costs a roughly fixed wall time that
    # grows with the event loop's load (grpc.aio completes it through its poller thread):
    # 100-300 ms per write with the loop saturated. At 500 results a batch that capped
    # delivery near 3,000 results/s while the agent probed 6,000/s, and the rest piled up
    # unsent in the link's buffer (no drops until its 100,000 fill). 2,000 a batch (~200 KB,
    # far below gRPC's 4 MB message limit) lets each write carry the backlog of a round trip.
    batch_size: int = 2_000
    batch_interval: float = 0.2
    # Used until the coordinator's Welcome names its own.
    heartbeat_interval: float = 10.0
    # Reconnect when a result batch or heartbeat stays unanswered this long.
    reply_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # Extra time past a check's timeout before the scheduler cuts a probe off.
    probe_grace: float = DEFAULT_GRACE
    # Probes running at once; runs due beyond this are skipped and counted.
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        try:
            split_host_port(self.coordinator)
        except ValueError:
            raise ValueError(f"coordinator address {self.coordinator!r} is not host:port") from None
        names.agent_name(self.name)
        names.agent_name(self.region, "region")
        if self.token is not None and not self.token.strip():
            raise ValueError("the token is empty")
        if self.token is None and (self.tls is None or self.tls.cert_file is None):
            raise ValueError("an agent needs a token or a client certificate")
        for label, number in (
            ("buffer_size", self.buffer_size),
            ("batch_size", self.batch_size),
            ("batch_interval", self.batch_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("reply_timeout", self.reply_timeout),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
            ("max_in_flight", self.max_in_flight),
            ("flush_interval", self.flush_interval),
        ):
            if number <= 0:
                raise ValueError(f"{label} must be positive, not {number}")
        if self.spool_bytes < MIN_SPOOL_BYTES:
            raise ValueError(
                f"spool_bytes must be at least {MIN_SPOOL_BYTES} (64KiB), not {self.spool_bytes}"
            )
        if self.flush_interval > 60:
            raise ValueError(f"flush_interval must be 60s at most, not {self.flush_interval:g}s")
        if self.probe_grace < 0:
            raise ValueError(f"probe_grace must not be negative, not {self.probe_grace}")


class Agent:
    """One agent: ``run`` it in an event loop; cancel it to stop.

    ``probes`` defaults to every probe this build has; they are also the capabilities the
    agent announces.
    """

    def __init__(self, settings: AgentSettings, *, probes: Mapping[str, ProbeFn] = PROBES) -> None:
        self.settings = settings
        self.spool: Spool | None = None
        self.results: ResultStore
        if settings.spool_dir is not None:
            self.results = self.spool = Spool(
                settings.spool_dir,
                max_bytes=settings.spool_bytes,
                flush_interval=settings.flush_interval,
                agent=settings.name,
                region=settings.region,
            )
        else:
            self.results = ResultBuffer(settings.buffer_size)
        self.scheduler = Scheduler(
            self.results,
            agent=settings.name,
            region=settings.region,
            probes=probes,
            grace=settings.probe_grace,
            max_in_flight=settings.max_in_flight,
        )
        self.link = CoordinatorLink(
            settings.coordinator,
            name=settings.name,
            region=settings.region,
            token=settings.token,
            results=self.results,
            apply=self.scheduler.apply,
            run_now=self.scheduler.run_now,
            counters=lambda: (self.results.dropped, self.scheduler.skipped),
            instance_id=self.spool.id if self.spool is not None else None,
            capabilities=tuple(probes),
            probes=probes,
            batch_size=settings.batch_size,
            batch_interval=settings.batch_interval,
            heartbeat_interval=settings.heartbeat_interval,
            reply_timeout=settings.reply_timeout,
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
            tls=settings.tls,
        )
        self._log = get_logger("agent").bind(agent=settings.name, region=settings.region)

    async def run(self) -> None:
        """Run scheduler and link until cancelled; FatalError (unwrapped from the task
        group) when the coordinator refuses this agent."""
        self._log.info(
            "agent starting",
            coordinator=self.settings.coordinator,
            instance_id=self.link.instance_id,
            spool=str(self.settings.spool_dir) if self.spool is not None else None,
            compiled=len(native.compiled()),
        )
        stale = native.stale()
        if stale:
            self._log.warning(
                "compiled modules older than their source: run `make native`", modules=stale
            )
        previous = gc.get_threshold()
        gc.set_threshold(*_GC_THRESHOLD)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.scheduler.run(), name="scheduler")
                group.create_task(self.link.run(), name="coordinator link")
                if self.spool is not None:
                    group.create_task(self.spool.run(), name="spool")
        except BaseExceptionGroup as group:
            raise most_severe(group) from None
        finally:
            gc.set_threshold(*previous)
            if self.spool is not None:
                self.spool.close()
