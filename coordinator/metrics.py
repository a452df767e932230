"""Prometheus metrics: the only module that knows metric names.

Everything the coordinator exposes on ``/metrics``, prefix ``vantage_``, base units:

From the current state, read at scrape time (so a removed check or a gone agent leaves no
stale series behind):

- ``vantage_check_verdict{check,state}``: 1 for the check's current state, 0 for the others.
- ``vantage_check_region_up{check,region}``: 1 up, 0 down; absent while the region's view
  is unknown.
- ``vantage_check_region_agents{check,region,view}``: agents of the region whose latest
  confirmed view of the check is ``up``, ``down`` or ``stale``.
- ``vantage_agents_connected{region}``: connected agents per region (0 once all left).
- ``vantage_agents_impaired{region}``: agents the engine judges impaired, per region.
- ``vantage_agent_connected{agent,region}``, ``vantage_agent_impaired{agent,region}``,
  ``vantage_agent_last_seen_timestamp_seconds{agent,region}``: only with
  ``per_agent_metrics``; bounded fleets only.

Counted as things happen:

- ``vantage_verdict_transitions_total{check,state}``: transitions into ``state``.
- ``vantage_agent_streams_open``: authenticated agent streams currently open.
- ``vantage_results_received_total{region}``: results ingested into the engine.
- ``vantage_results_dropped_total{reason}``: ``unassigned``, ``duplicate``, ``invalid``.
- ``vantage_agent_auth_failures_total``: streams refused for their token.
- ``vantage_rechecks_requested_total``: out-of-schedule probes (one per agent and check)
  sent to agents as second opinions the verdict engine asked for.
- ``vantage_watch_streams_open``, ``vantage_watch_streams_overflowed_total``: verdict
  watchers, and those ended because they fell behind.
- ``vantage_checks_reloads_total{result}``: ``applied``, ``unchanged``, ``failed``.
- ``vantage_build_info{version}``: always 1.

Plus the standard ``process_*`` and ``python_info`` collectors. Each ``CoordinatorMetrics``
owns its ``CollectorRegistry``, so several coordinators can live in one process (tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .fleet import AgentInfo
from .verdicts import RegionState, Verdict, VerdictState

# Counters per check would each get a ``*_created`` twin that nothing reads, doubling the
# series count at 10,000 checks. The switch is process-wide in prometheus_client.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

DROP_REASONS = ("unassigned", "duplicate", "invalid")
RELOAD_RESULTS = ("applied", "unchanged", "failed")
_VIEWS = ("up", "down", "stale")


class CoordinatorMetrics:
    """The coordinator's metrics on its own registry; methods are the events it counts.

    ``verdicts`` and ``agents`` are read at every scrape, on the scraping thread of
    control (the event loop, for the aiohttp handler), so they need no locking.
    """

    def __init__(
        self,
        *,
        version: str,
        verdicts: Callable[[], Iterable[Verdict]],
        agents: Callable[[], Iterable[AgentInfo]],
        per_agent: bool = False,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_StateCollector(verdicts, agents, per_agent))

        build = Gauge(
            "vantage_build_info",
            "Build of the running coordinator; always 1.",
            ["version"],
            registry=self.registry,
        )
        build.labels(version).set(1)
        self._transitions = Counter(
            "vantage_verdict_transitions",
            "Verdict transitions, by check and the state entered.",
            ["check", "state"],
            registry=self.registry,
        )
        self._streams_open = Gauge(
            "vantage_agent_streams_open",
            "Authenticated agent streams currently open.",
            registry=self.registry,
        )
        self._received = Counter(
            "vantage_results_received",
            "Probe results ingested into the verdict engine, by the agent's region.",
            ["region"],
            registry=self.registry,
        )
        self._dropped = Counter(
            "vantage_results_dropped",
            "Probe results dropped before the verdict engine, by reason.",
            ["reason"],
            registry=self.registry,
        )
        for reason in DROP_REASONS:
            self._dropped.labels(reason)
        self._auth_failures = Counter(
            "vantage_agent_auth_failures",
            "Agent streams refused because of their token.",
            registry=self.registry,
        )
        self._rechecks = Counter(
            "vantage_rechecks_requested",
            "Out-of-schedule probes asked of agents (one per agent and check) for second "
            "opinions the verdict engine wanted.",
            registry=self.registry,
        )
        self._watchers_open = Gauge(
            "vantage_watch_streams_open",
            "WatchVerdicts streams currently open.",
            registry=self.registry,
        )
        self._watchers_overflowed = Counter(
            "vantage_watch_streams_overflowed",
            "WatchVerdicts streams ended because the watcher fell behind.",
            registry=self.registry,
        )
        self._reloads = Counter(
            "vantage_checks_reloads",
            "Checks file reloads, by result.",
            ["result"],
            registry=self.registry,
        )
        for result in RELOAD_RESULTS:
            self._reloads.labels(result)

    def transition(self, check: str, state: VerdictState) -> None:
        self._transitions.labels(check, state.value).inc()

    def forget_check(self, check: str) -> None:
        """Drop a removed check's counters so removed checks do not accumulate series."""
        for state in VerdictState:
            with contextlib.suppress(KeyError):  # that state was never entered
                self._transitions.remove(check, state.value)

    def stream_opened(self) -> None:
        self._streams_open.inc()

    def stream_closed(self) -> None:
        self._streams_open.dec()

    def result_received(self, region: str, count: int = 1) -> None:
        """``count`` results from an agent of ``region`` went into the engine (one call
        per batch: a label lookup per result would cost more than the result itself)."""
        self._received.labels(region).inc(count)

    def result_dropped(self, reason: str) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        self._dropped.labels(reason).inc()

    def auth_failed(self) -> None:
        self._auth_failures.inc()

    def rechecks_requested(self, count: int) -> None:
        """``count`` out-of-schedule probes were asked of connected agents."""
        self._rechecks.inc(count)

    def watcher_opened(self) -> None:
        self._watchers_open.inc()

    def watcher_closed(self) -> None:
        self._watchers_open.dec()

    def watcher_overflowed(self) -> None:
        self._watchers_overflowed.inc()

    def checks_reloaded(self, result: str) -> None:
        if result not in RELOAD_RESULTS:
            raise ValueError(f"unknown reload result {result!r}")
        self._reloads.labels(result).inc()


class _StateCollector(Collector):
    """Series derived from the engine's verdicts and the fleet, built at scrape time."""

    def __init__(
        self,
        verdicts: Callable[[], Iterable[Verdict]],
        agents: Callable[[], Iterable[AgentInfo]],
        per_agent: bool,
    ) -> None:
        self._verdicts = verdicts
        self._agents = agents
        self._per_agent = per_agent

    def describe(self) -> Iterator[Metric]:
        # Names only: lets the registry refuse a clash at registration without a scrape.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        (
            verdict,
            region_up,
            region_agents,
            connected,
            impaired,
            agent_up,
            agent_impaired,
            agent_seen,
        ) = self._families()
        for current in self._verdicts():
            for state in VerdictState:
                verdict.add_metric([current.check, state.value], float(state == current.state))
            for region, view in sorted(current.regions.items()):
                if view.state != RegionState.UNKNOWN:
                    region_up.add_metric(
                        [current.check, region], float(view.state == RegionState.UP)
                    )
                for name, count in zip(_VIEWS, (view.up, view.down, view.stale), strict=True):
                    region_agents.add_metric([current.check, region, name], count)
        yield verdict
        yield region_up
        yield region_agents

        agents = list(self._agents())
        per_region: dict[str, int] = {}
        impaired_per_region: dict[str, int] = {}
        for agent in agents:
            per_region[agent.region] = per_region.get(agent.region, 0) + agent.connected
            impaired_per_region[agent.region] = (
                impaired_per_region.get(agent.region, 0) + agent.impaired
            )
        for region, count in sorted(per_region.items()):
            connected.add_metric([region], count)
            impaired.add_metric([region], impaired_per_region[region])
        yield connected
        yield impaired
        if self._per_agent:
            for agent in agents:
                agent_up.add_metric([agent.name, agent.region], float(agent.connected))
                agent_impaired.add_metric([agent.name, agent.region], float(agent.impaired))
                agent_seen.add_metric([agent.name, agent.region], agent.last_seen)
            yield agent_up
            yield agent_impaired
            yield agent_seen

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        families = (
            GaugeMetricFamily(
                "vantage_check_verdict",
                "Current verdict of each check: 1 for its state, 0 for the others.",
                labels=["check", "state"],
            ),
            GaugeMetricFamily(
                "vantage_check_region_up",
                "1 when the region sees the check up, 0 when down; absent when unknown.",
                labels=["check", "region"],
            ),
            GaugeMetricFamily(
                "vantage_check_region_agents",
                "Agents of a region by their current view of the check (up, down, stale).",
                labels=["check", "region", "view"],
            ),
            GaugeMetricFamily(
                "vantage_agents_connected",
                "Agents with a live stream, by region.",
                labels=["region"],
            ),
            GaugeMetricFamily(
                "vantage_agents_impaired",
                "Connected agents the verdict engine judges impaired (failing most of their "
                "checks while peers see them work), by region.",
                labels=["region"],
            ),
            GaugeMetricFamily(
                "vantage_agent_connected",
                "1 while the agent has a live stream (per_agent_metrics only).",
                labels=["agent", "region"],
            ),
            GaugeMetricFamily(
                "vantage_agent_impaired",
                "1 while the verdict engine judges the agent impaired (per_agent_metrics only).",
                labels=["agent", "region"],
            ),
            GaugeMetricFamily(
                "vantage_agent_last_seen_timestamp_seconds",
                "When the agent last sent a message, Unix seconds (per_agent_metrics only).",
                labels=["agent", "region"],
            ),
        )
        return families
