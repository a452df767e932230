"""A live coordinator driven through everything its ``/metrics`` reports.

``exercise`` sends scripted agents' results (phase timings, TLS certificates, failures of
several classes, a duplicate, an unassigned check) and a disconnect to a coordinator
started with ``write_scenario_config``, so that every series the coordinator exports has
samples: the metrics tests check their values and run ``promtool check metrics`` on it,
the Grafana dashboard test takes the set of exported names from it.

Not named ``conftest`` (see live_coordinator.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
from live_coordinator import FakeAgent, Running, eventually, start, write_config
from prometheus_client.parser import text_string_to_metric_families

from vantage.results import (
    FailureClass,
    HttpDetails,
    Phases,
    ProbeOutcome,
    ProbeResult,
    TcpDetails,
    TlsDetails,
)
from vantage.wire import result_to_pb
from vantage_proto.v1 import agent_pb2

DAY = 86400.0

CHECKS = """\
checks:
  - {name: web, type: http, target: 'http://127.0.0.1:1/', interval: 60s, timeout: 10s}
  - {name: secure, type: http, target: 'https://127.0.0.1:2/', interval: 60s, timeout: 10s}
  - {name: db, type: tcp, target: '127.0.0.1:3', interval: 60s, timeout: 10s}
  - {name: smtp, type: tcp, target: '127.0.0.1:4', tls: true, interval: 60s, timeout: 10s}
"""
# One agent is enough for a verdict; no second opinions, so an agent's stream carries
# nothing but the acks its batches wait for.
ENGINE = (
    "engine: {min_agents: 1, min_regions: 1, fail_after: 1, recover_after: 1,"
    " adaptive_confirmation: false, second_opinion: false}\n"
)

# Phase timings (seconds) of the scripted web results: no TLS on plain HTTP.
EU1_WEB = Phases(resolve=0.001, connect=0.002, processing=0.010, transfer=0.001)
EU2_WEB = Phases(resolve=0.003, connect=0.004, processing=0.030, transfer=0.001)
US1_WEB = Phases(resolve=0.002, connect=0.080, processing=0.050, transfer=0.002)
SECURE = Phases(resolve=0.001, connect=0.002, tls=0.005, processing=0.010, transfer=0.001)
DB = Phases(resolve=0.0, connect=0.001)


def write_scenario_config(directory: Path, *, per_agent: bool) -> Path:
    extra = ENGINE + f"per_agent_metrics: {'true' if per_agent else 'false'}\n"
    return write_config(directory, checks=CHECKS, extra=extra)


def outcome(
    *,
    failure: FailureClass | None = None,
    phases: Phases | None = None,
    expiry: float | None = None,
    tcp: bool = False,
) -> ProbeOutcome:
    """What a probe found; ``expiry`` adds a TLS session with that earliest notAfter."""
    tls = TlsDetails("TLSv1.3", "TLS_AES_128_GCM_SHA256", expiry) if expiry else None
    details: HttpDetails | TcpDetails = (
        TcpDetails(peer="127.0.0.1:4", tls=tls)
        if tcp
        else HttpDetails(status_code=200 if failure is None else 0, http_version="1.1", tls=tls)
    )
    phases = phases or Phases()
    if failure is None:
        return ProbeOutcome(True, None, "", phases, details)
    return ProbeOutcome.failed(failure, f"scripted {failure.value}", phases, details)


@dataclass
class Reporter:
    """A scripted agent on the real stream, sending full results (phases, details)."""

    agent: FakeAgent
    seq: int = 0
    sent: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.agent.name

    def result(self, check: str, found: ProbeOutcome) -> agent_pb2.ProbeResult:
        self.seq += 1
        started = time.time()
        return result_to_pb(ProbeResult(check, 0, self.seq, started, 0.02, found))

    async def send(self, **results: ProbeOutcome) -> None:
        """One batch: one result per check named."""
        await self.agent.send_results(self.result(check, found) for check, found in results.items())
        for check in results:
            self.sent[check] = self.sent.get(check, 0) + 1


async def connect(running: Running, name: str, region: str) -> Reporter:
    reporter = Reporter(running.agent(name, region))
    await reporter.agent.handshake()
    return reporter


async def exercise(running: Running, now: float) -> dict[str, Reporter]:
    """Drive ``running`` (a ``write_scenario_config`` coordinator) into a state where every
    series has samples. Agents eu-1, eu-2 (eu) and us-1 (us) stay connected (the caller
    closes them); ap-1 (ap) has reported once and left.

    - web: up everywhere, phases EU1_WEB, EU2_WEB, US1_WEB.
    - secure (https): up everywhere; certificates expire in 10 (eu-1), 20 (eu-2) and 40
      (us-1) days from ``now``.
    - db (tcp): connect_refused from eu-1 and eu-2 (down in eu), up from us-1.
    - smtp (tcp with TLS): up everywhere, certificate 30 days, except us-1 timing out.
    - one duplicate result and one for a check that does not exist (both dropped).
    """
    eu1 = await connect(running, "eu-1", "eu")
    eu2 = await connect(running, "eu-2", "eu")
    us1 = await connect(running, "us-1", "us")
    ap1 = await connect(running, "ap-1", "ap")
    refused = outcome(failure=FailureClass.CONNECT_REFUSED, phases=DB, tcp=True)
    smtp = outcome(phases=SECURE, expiry=now + 30 * DAY, tcp=True)
    await eu1.send(
        web=outcome(phases=EU1_WEB),
        secure=outcome(phases=SECURE, expiry=now + 10 * DAY),
        db=refused,
        smtp=smtp,
    )
    await eu2.send(
        web=outcome(phases=EU2_WEB),
        secure=outcome(phases=SECURE, expiry=now + 20 * DAY),
        db=refused,
        smtp=smtp,
    )
    await us1.send(
        web=outcome(phases=US1_WEB),
        secure=outcome(phases=SECURE, expiry=now + 40 * DAY),
        db=outcome(phases=DB, tcp=True),
        smtp=outcome(failure=FailureClass.TIMEOUT, phases=DB, tcp=True),
    )
    await ap1.send(web=outcome(phases=US1_WEB))

    # A replay of eu-1's first result, and a result for a check nobody assigned.
    duplicate = result_to_pb(ProbeResult("web", 0, 1, time.time(), 0.01, outcome()))
    await eu1.agent.send_results([duplicate])
    await eu1.send(nope=outcome())

    ap1.agent.close()
    await eventually(
        lambda: running.metric('vantage_agents_disconnected{region="ap"}'),
        "ap-1 to be counted as disconnected",
    )
    # The ticker runs once a second: wait for one, so the tick histogram has a sample.
    await eventually(
        lambda: running.metric("vantage_engine_tick_duration_seconds_count"),
        "an engine tick",
    )
    return {"eu-1": eu1, "eu-2": eu2, "us-1": us1}


async def exported_names(directory: Path) -> set[str]:
    """The name of every sample a coordinator exposes once ``exercise`` has run, per-agent
    series on: histogram and counter suffixes (``_bucket``, ``_total``...) included."""
    async with start(
        write_scenario_config(directory, per_agent=True), reload_on_sighup=False
    ) as running:
        agents = await exercise(running, time.time())
        text = await running.metrics()
        for reporter in agents.values():
            reporter.agent.close()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def selected_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (promql-parser's AST; raises
    ValueError on a syntax error)."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names
