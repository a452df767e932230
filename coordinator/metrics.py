"""Prometheus metrics: the only module that knows metric names.

Everything the coordinator exposes on ``/metrics``, prefix ``vantage_``, base units
(README.md has the same list as a table; keep the two in step).

Read at scrape time from the current state, so a removed check or a gone agent leaves no
stale series behind. Per check (the engine's verdicts):

- ``vantage_check_verdict{check,state}``: 1 for the check's current state, 0 for the
  other five (a one-hot state set: alert on ``{state="global"} == 1``).
- ``vantage_check_region_up{check,region}``: 1 up, 0 down; absent while the region's view
  is unknown.
- ``vantage_check_region_agents{check,region,view}``: agents of the region whose latest
  confirmed view of the check is ``up``, ``down`` or ``stale``.
- ``vantage_check_region_failure{check,region,class}``: 1, with the dominant failure class
  among the region's agents that see the check down; absent when none does. This is the
  *why* of a region's outage, for alert annotations and dashboards.

Per check, from what the engine keeps of the results it folded (``engine.measurements``):

- ``vantage_check_phase_seconds{check,region,phase}``: mean time of each probe phase
  (``resolve``, ``connect``, ``tls``, ``processing``, ``transfer``) over the region's
  agents that count (connected, not impaired, fresh) and whose latest result succeeded.
  A phase the check's probes do not go through (``tls`` on plain HTTP, ``resolve`` for
  an IP address) has no series; neither has a region where no such agent is left.
- ``vantage_check_failures_total{check,region,class}``: failed results folded into the
  engine, by the agent's region and the failure class (impaired agents' included).
- ``vantage_check_cert_expiry_timestamp_seconds{check}``: the earliest certificate expiry
  (notAfter, Unix seconds) in the latest TLS session each counted agent reported on the
  check (kept through failures that bring none); checks without TLS have no series.

The fleet, aggregated per region (always) and per agent (``per_agent_metrics`` only: the
series grow with the fleet):

- ``vantage_agents_connected{region}``, ``vantage_agents_disconnected{region}``: agents
  admitted since the coordinator started, with and without a live stream (0 once all
  left / all back).
- ``vantage_agents_impaired{region}``: connected agents the engine judges impaired.
- ``vantage_agent_connected{agent,region}``, ``vantage_agent_impaired{agent,region}``,
  ``vantage_agent_last_seen_timestamp_seconds{agent,region}``,
  ``vantage_agent_results_received_total{agent,region}``.
- ``vantage_agents_results_dropped_total{region}``, ``vantage_agents_runs_skipped_total``,
  ``vantage_agents_results_late_total``: what the region's agents last reported of their
  spool drops and skipped runs (``AgentCounters``, cumulative per agent, so a new spool
  resets its share), and results that arrived too old for the live verdict; the same per
  agent (``vantage_agent_*_total{agent,region}``) with ``per_agent_metrics``.

The coordinator's own health, counted as things happen:

- ``vantage_results_received_total{region}``: results ingested into the engine.
- ``vantage_results_dropped_total{reason}``: ``unassigned``, ``duplicate``, ``invalid``.
- ``vantage_results_ingest_seconds_total``: event-loop time spent ingesting result batches
  (converting, folding into the engine, recording transitions). Over
  ``vantage_results_received_total`` it is the cost of one result; its rate is the share
  of a core that ingest takes.
- ``vantage_engine_tick_duration_seconds`` (histogram): each ``engine.tick()``, about once
  a second (re-evaluating checks whose views went stale, ending rounds of second opinions).
- ``vantage_verdict_transitions_total{check,state}``: transitions into ``state``.
- ``vantage_agent_streams_open``: authenticated agent streams currently open.
- ``vantage_agent_auth_failures_total``: streams refused for their token.
- ``vantage_rechecks_requested_total``: out-of-schedule probes (one per agent and check)
  sent to agents as second opinions the verdict engine asked for.
- ``vantage_watch_streams_open``, ``vantage_watch_streams_overflowed_total``: clients'
  verdict watches (gRPC and JSON), and those ended because they fell behind.
- ``vantage_checks_reloads_total{result}``: ``applied``, ``unchanged``, ``failed``.
- ``vantage_requests_refused_total{endpoint,reason}``: calls, streams, messages and
  connections refused or held back, by where they came (``agent`` streams, the gRPC
  ``query`` service, the ``http`` port) and why (``REFUSALS``: ``unauthenticated``,
  ``permission_denied``, ``too_large``, ``malformed``, ``too_many_streams``, ``rate_limited``,
  ``throttled`` (an agent paced to its rate), ``too_many_connections``, ``timeout``).
- ``vantage_tokens_reloads_total{result}``: tokens file reloads: ``applied``,
  ``failed``.
- ``vantage_tls_reloads_total{result}``, ``vantage_tls_cert_expiry_timestamp_seconds``:
  the coordinator's own certificate (``tls:``): reloads (``applied``, ``failed``) and
  when the served one expires.
- ``vantage_build_info{version}``: always 1.

Plus the standard ``process_*`` and ``python_info`` collectors. Each ``CoordinatorMetrics``
owns its ``CollectorRegistry``, so several coordinators can live in one process (tests).

Cost: nothing here runs per result. Ingest calls ``results_ingested`` once per batch;
the engine keeps the measurements as it folds each result (a few float copies in compiled
code). Means, minima and every per-check series are computed at scrape time, on the event
loop, in one pass over the state, and written out as text directly (``StateExposition``).
Series per check: 6 + 1 (expiry, TLS only) + per region about 1 + 3 + 1 (while down) + up
to 5 phases + the failure classes seen.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from vantage.results import PHASES

from .engine import Measurements
from .fleet import AgentInfo
from .verdicts import RegionState, Verdict, VerdictState

# Counters per check would each get a ``*_created`` twin that nothing reads, doubling the
# series count at 10,000 checks. The switch is process-wide in prometheus_client.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream

# The text format, which every Prometheus reads (the state is written out directly, not
# through prometheus_client, which negotiates OpenMetrics only for its own families).
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DROP_REASONS = ("unassigned", "duplicate", "invalid")
RELOAD_RESULTS = ("applied", "unchanged", "failed")
# Where each refusal can happen: every pair is exposed from the start (0 until it does).
REFUSALS = {
    "agent": ("unauthenticated", "permission_denied", "too_large", "malformed", "throttled"),
    "query": (
        "unauthenticated", "permission_denied", "too_large", "malformed", "too_many_streams",
        "rate_limited",
    ),
    "http": (
        "unauthenticated", "permission_denied", "too_large", "too_many_streams", "rate_limited",
        "too_many_connections", "timeout",
    ),
}  # fmt: skip
# engine.tick() takes well under a millisecond with nothing due and tens of milliseconds
# when thousands of checks are re-evaluated at once (tests/bench/bench_ingest.py tick).
TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class CoordinatorMetrics:
    """The coordinator's metrics on its own registry; methods are the events it counts.

    ``verdicts``, ``measurements`` and ``agents`` are read at every scrape
    (``exposition``), on the event loop, so they need no locking. ``registry`` holds the
    rest (and takes other parts' metrics: the MQTT publisher's).
    """

    def __init__(
        self,
        *,
        version: str,
        verdicts: Callable[[], Iterable[Verdict]],
        agents: Callable[[], Iterable[AgentInfo]],
        measurements: Callable[[], Iterable[Measurements]] = lambda: (),
        per_agent: bool = False,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.state = StateExposition(verdicts, measurements, agents, per_agent)

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
        self._ingest_seconds = Counter(
            "vantage_results_ingest_seconds",
            "Event-loop time spent ingesting result batches (converting, folding into the "
            "verdict engine, recording transitions), in seconds.",
            registry=self.registry,
        )
        self._tick_seconds = Histogram(
            "vantage_engine_tick_duration_seconds",
            "Time of each periodic verdict engine tick (stale views, ends of second-opinion "
            "rounds), in seconds.",
            buckets=TICK_BUCKETS,
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
        self._refused = Counter(
            "vantage_requests_refused",
            "Calls, streams, messages and connections refused or held back, by endpoint "
            "(agent, query, http) and reason.",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        for endpoint, reasons in REFUSALS.items():
            for reason in reasons:
                self._refused.labels(endpoint, reason)
        self._token_reloads = Counter(
            "vantage_tokens_reloads",
            "Tokens file reloads, by result.",
            ["result"],
            registry=self.registry,
        )
        for result in ("applied", "failed"):
            self._token_reloads.labels(result)
        # Only with TLS (``tls_serving``): without it there is nothing to tell.
        self._tls_reloads: Counter | None = None
        self._tls_expiry: Gauge | None = None

    def exposition(self, names: Collection[str] | None = None) -> bytes:
        """What ``/metrics`` serves, in the text format (``EXPOSITION_TYPE``): the
        registry's metrics, then the state read from the engine and the fleet; with
        ``names`` (``/metrics?name[]=...``), only the families with those sample names."""
        registry = self.registry if names is None else self.registry.restricted_registry(names)
        return generate_latest(registry) + self.state.render(names).encode()

    def forget_check(self, check: str) -> None:
        """Drop a removed check's counters so removed checks do not accumulate series."""
        for state in VerdictState:
            with contextlib.suppress(KeyError):  # that state was never entered
                self._transitions.remove(check, state.value)

    def transition(self, check: str, state: VerdictState) -> None:
        self._transitions.labels(check, state.value).inc()

    def stream_opened(self) -> None:
        self._streams_open.inc()

    def stream_closed(self) -> None:
        self._streams_open.dec()

    def results_ingested(self, region: str, count: int, started: float) -> None:
        """A batch from an agent of ``region`` was ingested: ``count`` results went into
        the engine (the others were dropped); ``started`` is ``time.perf_counter()`` when
        its ingest began. One call per batch: a label lookup per result would cost more
        than the result."""
        if count:
            self._received.labels(region).inc(count)
        self._ingest_seconds.inc(time.perf_counter() - started)

    def engine_ticked(self, seconds: float) -> None:
        """One ``engine.tick()`` (with recording its transitions) took ``seconds``."""
        self._tick_seconds.observe(seconds)

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

    def refused(self, endpoint: str, reason: str) -> None:
        """A call, stream, message or connection at ``endpoint`` was refused (or, for
        ``throttled``, held back) for ``reason``; see ``REFUSALS``."""
        if reason not in REFUSALS.get(endpoint, ()):
            raise ValueError(f"unknown refusal {endpoint}/{reason}")
        self._refused.labels(endpoint, reason).inc()

    def tokens_reloaded(self, result: str) -> None:
        self._token_reloads.labels(result).inc()

    def tls_serving(self, not_after: float) -> None:
        """The TLS certificate served now expires at ``not_after``."""
        if self._tls_expiry is None:
            self._tls_expiry = Gauge(
                "vantage_tls_cert_expiry_timestamp_seconds",
                "When the certificate the coordinator serves expires (notAfter, Unix seconds).",
                registry=self.registry,
            )
            self._tls_reloads = Counter(
                "vantage_tls_reloads",
                "Reloads of the coordinator's TLS certificate files, by result.",
                ["result"],
                registry=self.registry,
            )
            for result in ("applied", "failed"):
                self._tls_reloads.labels(result)
        self._tls_expiry.set(not_after)

    def tls_reloaded(self, result: str) -> None:
        if self._tls_reloads is not None:
            self._tls_reloads.labels(result).inc()

    def checks_reloaded(self, result: str) -> None:
        if result not in RELOAD_RESULTS:
            raise ValueError(f"unknown reload result {result!r}")
        self._reloads.labels(result).inc()


def _family(name: str, kind: str, text: str) -> str:
    return f"# HELP {name} {text}\n# TYPE {name} {kind}\n"


def _value(label: str) -> str:
    """A label value as the text format quotes it. Names are validated where they come in
    (checks, agents, regions), so this is almost always the value itself."""
    if "\\" in label or '"' in label or "\n" in label:
        return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return label


_STATES = tuple(VerdictState)
_VERDICT_FAMILIES = frozenset(
    {
        "vantage_check_verdict",
        "vantage_check_region_up",
        "vantage_check_region_agents",
        "vantage_check_region_failure",
    }
)
_MEASUREMENT_FAMILIES = frozenset(
    {
        "vantage_check_phase_seconds",
        "vantage_check_failures_total",
        "vantage_check_cert_expiry_timestamp_seconds",
    }
)
_FLEET_FAMILIES = frozenset(
    {
        "vantage_agents_connected",
        "vantage_agents_disconnected",
        "vantage_agents_impaired",
        "vantage_agent_connected",
        "vantage_agent_impaired",
        "vantage_agent_last_seen_timestamp_seconds",
        "vantage_agent_results_received_total",
        *(
            f"vantage_agents_{name}_total"
            for name in ("results_dropped", "runs_skipped", "results_late")
        ),
        *(
            f"vantage_agent_{name}_total"
            for name in ("results_dropped", "runs_skipped", "results_late")
        ),
    }
)
# What agents report of themselves, and results that came too late for the live verdict:
# (field of AgentInfo, help text), summed per region and, with per_agent_metrics, per agent.
_AGENT_COUNTS = (
    ("results_dropped", "Results agents' spools dropped when full (oldest first), as reported"),
    ("runs_skipped", "Scheduled probe runs agents skipped when overloaded, as reported"),
    (
        "results_late",
        "Results that arrived older than their check's staleness window (replayed after an "
        "outage): in the failure counts, not the live verdict",
    ),
)
_HEADERS = {
    "verdict": _family(
        "vantage_check_verdict",
        "gauge",
        "Current verdict of each check: 1 for its state, 0 for the others.",
    ),
    "region_up": _family(
        "vantage_check_region_up",
        "gauge",
        "1 when the region sees the check up, 0 when down; absent when unknown.",
    ),
    "region_agents": _family(
        "vantage_check_region_agents",
        "gauge",
        "Agents of a region by their current view of the check (up, down, stale).",
    ),
    "region_failure": _family(
        "vantage_check_region_failure",
        "gauge",
        "1 with the dominant failure class among the region's agents that see the check "
        "down; absent when none does.",
    ),
    "phase": _family(
        "vantage_check_phase_seconds",
        "gauge",
        "Mean time of a probe phase over the region's counted agents whose latest result "
        "succeeded, in seconds.",
    ),
    "failures": _family(
        "vantage_check_failures_total",
        "counter",
        "Failed probe results, by check, the agent's region and the failure class.",
    ),
    "expiry": _family(
        "vantage_check_cert_expiry_timestamp_seconds",
        "gauge",
        "Earliest certificate expiry (notAfter) in the latest TLS sessions the counted "
        "agents reported on the check, Unix seconds.",
    ),
    "connected": _family(
        "vantage_agents_connected", "gauge", "Agents with a live stream, by region."
    ),
    "disconnected": _family(
        "vantage_agents_disconnected",
        "gauge",
        "Agents admitted since the coordinator started whose stream is gone, by region.",
    ),
    "impaired": _family(
        "vantage_agents_impaired",
        "gauge",
        "Connected agents the verdict engine judges impaired (failing most of their checks "
        "while peers see them work), by region.",
    ),
    **{
        f"agents_{name}": _family(f"vantage_agents_{name}_total", "counter", f"{text}, by region.")
        for name, text in _AGENT_COUNTS
    },
    **{
        f"agent_{name}": _family(
            f"vantage_agent_{name}_total", "counter", f"{text} (per_agent_metrics only)."
        )
        for name, text in _AGENT_COUNTS
    },
    "agent_connected": _family(
        "vantage_agent_connected",
        "gauge",
        "1 while the agent has a live stream (per_agent_metrics only).",
    ),
    "agent_impaired": _family(
        "vantage_agent_impaired",
        "gauge",
        "1 while the verdict engine judges the agent impaired (per_agent_metrics only).",
    ),
    "agent_seen": _family(
        "vantage_agent_last_seen_timestamp_seconds",
        "gauge",
        "When the agent last sent a message, Unix seconds (per_agent_metrics only).",
    ),
    "agent_results": _family(
        "vantage_agent_results_received_total",
        "counter",
        "Probe results of the agent ingested into the verdict engine (per_agent_metrics only).",
    ),
}


class StateExposition:
    """The series read from the engine and the fleet at each scrape, in the text format.

    Written out directly rather than through prometheus_client's metric families: those
    cost about 10 us a sample (sample objects, label name validation and escaping per
    line), several seconds of the event loop per scrape at 10,000 checks, where this
    costs well under a microsecond a line. Labels are in sorted order and values floats,
    as prometheus_client writes them.
    """

    def __init__(
        self,
        verdicts: Callable[[], Iterable[Verdict]],
        measurements: Callable[[], Iterable[Measurements]],
        agents: Callable[[], Iterable[AgentInfo]],
        per_agent: bool,
    ) -> None:
        self._verdicts = verdicts
        self._measurements = measurements
        self._agents = agents
        self._per_agent = per_agent

    def render(self, names: Collection[str] | None = None) -> str:
        """The families named in ``names`` (sample names, as in ``/metrics?name[]=...``),
        or all of them; only the parts of the state they need are read."""
        out: dict[str, list[str]] = {}
        for families, part in (
            (_VERDICT_FAMILIES, self._render_verdicts),
            (_MEASUREMENT_FAMILIES, self._render_measurements),
            (_FLEET_FAMILIES, self._render_fleet),
        ):
            if names is None or not families.isdisjoint(names):
                part(out)
        return "".join(
            line
            for family, lines in out.items()
            if names is None or family in names
            for line in lines
        )

    def _render_verdicts(self, out: dict[str, list[str]]) -> None:
        verdict = [_HEADERS["verdict"]]
        region_up = [_HEADERS["region_up"]]
        agents = [_HEADERS["region_agents"]]
        failure = [_HEADERS["region_failure"]]
        for current in self._verdicts():
            check = _value(current.check)
            for state in _STATES:
                one = "1.0" if state is current.state else "0.0"
                verdict.append(
                    f'vantage_check_verdict{{check="{check}",state="{state.value}"}} {one}\n'
                )
            for name, view in sorted(current.regions.items()):
                region = _value(name)
                where = f'check="{check}",region="{region}"'
                if view.state is not RegionState.UNKNOWN:
                    up = "1.0" if view.state is RegionState.UP else "0.0"
                    region_up.append(f"vantage_check_region_up{{{where}}} {up}\n")
                agents.append(f'vantage_check_region_agents{{{where},view="up"}} {view.up}.0\n')
                agents.append(f'vantage_check_region_agents{{{where},view="down"}} {view.down}.0\n')
                agents.append(
                    f'vantage_check_region_agents{{{where},view="stale"}} {view.stale}.0\n'
                )
                if view.failure is not None:
                    failure.append(
                        f'vantage_check_region_failure{{check="{check}",class="{view.failure.value}",'
                        f'region="{region}"}} 1.0\n'
                    )
        out["vantage_check_verdict"] = verdict
        out["vantage_check_region_up"] = region_up
        out["vantage_check_region_agents"] = agents
        out["vantage_check_region_failure"] = failure

    def _render_measurements(self, out: dict[str, list[str]]) -> None:
        phases = [_HEADERS["phase"]]
        failures = [_HEADERS["failures"]]
        expiry = [_HEADERS["expiry"]]
        for measured in self._measurements():
            check = _value(measured.check)
            for name, means in sorted(measured.phases.items()):
                region = _value(name)
                for phase, seconds in zip(PHASES, means, strict=True):
                    if seconds > 0:
                        phases.append(
                            f'vantage_check_phase_seconds{{check="{check}",phase="{phase}",'
                            f'region="{region}"}} {seconds!r}\n'
                        )
            for (name, failed), count in sorted(measured.failures.items()):
                failures.append(
                    f'vantage_check_failures_total{{check="{check}",class="{failed.value}",'
                    f'region="{_value(name)}"}} {count}.0\n'
                )
            if measured.cert_expiry > 0:
                expiry.append(
                    f'vantage_check_cert_expiry_timestamp_seconds{{check="{check}"}} '
                    f"{measured.cert_expiry!r}\n"
                )
        out["vantage_check_phase_seconds"] = phases
        out["vantage_check_failures_total"] = failures
        out["vantage_check_cert_expiry_timestamp_seconds"] = expiry

    def _render_fleet(self, out: dict[str, list[str]]) -> None:
        agents = list(self._agents())
        per_region: dict[str, list[int]] = {}  # region -> [connected, disconnected, impaired]
        for agent in agents:
            counts = per_region.setdefault(agent.region, [0, 0, 0])
            counts[0 if agent.connected else 1] += 1
            counts[2] += agent.connected and agent.impaired
        regions = sorted(per_region.items())
        for index, header in enumerate(("connected", "disconnected", "impaired")):
            lines = out[f"vantage_agents_{header}"] = [_HEADERS[header]]
            for region, counts in regions:
                lines.append(
                    f'vantage_agents_{header}{{region="{_value(region)}"}} {counts[index]}.0\n'
                )
        for name, _ in _AGENT_COUNTS:
            sums: dict[str, int] = {}
            for agent in agents:
                sums[agent.region] = sums.get(agent.region, 0) + getattr(agent, name)
            family = f"vantage_agents_{name}_total"
            out[family] = [_HEADERS[f"agents_{name}"]] + [
                f'{family}{{region="{_value(region)}"}} {count}.0\n'
                for region, count in sorted(sums.items())
            ]
        if not self._per_agent:
            return
        for name, _ in _AGENT_COUNTS:
            family = f"vantage_agent_{name}_total"
            out[family] = [_HEADERS[f"agent_{name}"]] + [
                f'{family}{{agent="{_value(agent.name)}",region="{_value(agent.region)}"}} '
                f"{getattr(agent, name)}.0\n"
                for agent in agents
            ]
        connected = [_HEADERS["agent_connected"]]
        impaired = [_HEADERS["agent_impaired"]]
        seen = [_HEADERS["agent_seen"]]
        results = [_HEADERS["agent_results"]]
        for agent in agents:
            who = f'agent="{_value(agent.name)}",region="{_value(agent.region)}"'
            connected.append(f"vantage_agent_connected{{{who}}} {float(agent.connected)!r}\n")
            bad = float(agent.connected and agent.impaired)
            impaired.append(f"vantage_agent_impaired{{{who}}} {bad!r}\n")
            seen.append(f"vantage_agent_last_seen_timestamp_seconds{{{who}}} {agent.last_seen!r}\n")
            results.append(
                f"vantage_agent_results_received_total{{{who}}} {agent.results_received}.0\n"
            )
        out["vantage_agent_connected"] = connected
        out["vantage_agent_impaired"] = impaired
        out["vantage_agent_last_seen_timestamp_seconds"] = seen
        out["vantage_agent_results_received_total"] = results
