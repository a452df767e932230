"""/metrics as Prometheus scrapes it: names, labels, values, and promtool's rules."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from live_coordinator import Running, eventually, start, write_config
from metrics_scenario import (
    CHECKS,
    DAY,
    EU1_WEB,
    EU2_WEB,
    US1_WEB,
    Reporter,
    exercise,
    exported_names,
    outcome,
    write_scenario_config,
)
from prometheus_client.parser import text_string_to_metric_families

from vantage import __version__
from vantage.results import PHASES, FailureClass
from vantage_proto.v1 import query_pb2

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def series(found: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of ``name``'s samples."""
    return [dict(labels) for sample, labels in found if sample == name]


async def test_fresh_coordinator_exposes_its_state(running: Running) -> None:
    text = await running.metrics()
    assert f'vantage_build_info{{version="{__version__}"}} 1.0' in text
    for reason in ("unassigned", "duplicate", "invalid"):
        assert f'vantage_results_dropped_total{{reason="{reason}"}} 0.0' in text
    assert 'vantage_check_verdict{check="web",state="unknown"} 1.0' in text
    assert 'vantage_check_verdict{check="web",state="up"} 0.0' in text
    assert "vantage_agent_auth_failures_total 0.0" in text
    assert "vantage_rechecks_requested_total 0.0" in text
    assert "process_cpu_seconds_total" in text
    assert "vantage_agent_connected{" not in text


async def test_verdicts_regions_and_agents_after_results(running: Running) -> None:
    agent = running.agent()
    await agent.handshake()
    await agent.send_results([agent.result("web"), agent.result("db", success=False)])
    values = {
        'vantage_check_verdict{check="web",state="up"}': 1,
        'vantage_check_verdict{check="web",state="unknown"}': 0,
        'vantage_check_verdict{check="db",state="global"}': 1,
        'vantage_check_region_up{check="web",region="eu"}': 1,
        'vantage_check_region_up{check="db",region="eu"}': 0,
        'vantage_check_region_agents{check="db",region="eu",view="down"}': 1,
        'vantage_check_region_agents{check="db",region="eu",view="up"}': 0,
        'vantage_verdict_transitions_total{check="web",state="up"}': 1,
        'vantage_agents_connected{region="eu"}': 1,
        "vantage_agent_streams_open": 1,
    }
    for sample, value in values.items():
        assert await running.metric(sample) == value, sample
    agent.close()


async def test_per_agent_series_only_when_asked(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra="per_agent_metrics: true\n")
    async with start(config, reload_on_sighup=False) as running:
        agent = running.agent()
        await agent.handshake()
        assert await running.metric('vantage_agent_connected{agent="eu-1",region="eu"}') == 1
        seen = await running.metric(
            'vantage_agent_last_seen_timestamp_seconds{agent="eu-1",region="eu"}'
        )
        assert seen is not None
        assert seen > 1e9
        agent.close()


@pytest.mark.parametrize("per_agent", [False, True], ids=["aggregates", "per-agent"])
async def test_metrics_pass_promtool(tmp_path: Path, per_agent: bool) -> None:
    """Agents in three regions, failures, TLS checks, drops, a disconnect, ticks: whatever
    the coordinator exposes, promtool's linter finds nothing to say."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (`make system-deps`)")
    config = write_scenario_config(tmp_path, per_agent=per_agent)
    async with start(config, reload_on_sighup=False) as running:
        agents = await exercise(running, time.time())
        text = await running.metrics()
        for reporter in agents.values():
            reporter.agent.close()
    found = samples(text)
    assert bool(series(found, "vantage_agent_connected")) is per_agent
    assert series(found, "vantage_check_phase_seconds")
    assert series(found, "vantage_check_cert_expiry_timestamp_seconds")
    assert series(found, "vantage_check_failures_total")
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate(text.encode())
    assert process.returncode == 0, output.decode()
    assert output.decode().strip() == ""


THREE_CHECKS = """\
checks:
  - {name: web, type: http, target: 'http://127.0.0.1:1/', interval: 2s, timeout: 1s}
  - {name: shop, type: http, target: 'http://127.0.0.1:2/', interval: 2s, timeout: 1s}
  - {name: db, type: tcp, target: '127.0.0.1:3', interval: 2s, timeout: 1s}
"""


async def test_an_impaired_agent_is_listed_and_counted(tmp_path: Path) -> None:
    """eu-1 fails every check while eu-2, in its region, sees them all work."""
    engine = (
        "engine: {min_agents: 1, min_regions: 1, second_opinion: false,"
        " adaptive_confirmation: false}\n"
    )
    config = write_config(tmp_path, checks=THREE_CHECKS, extra=engine + "per_agent_metrics: true\n")
    async with start(config, reload_on_sighup=False) as running:
        broken, healthy = running.agent("eu-1"), running.agent("eu-2")
        await broken.handshake()
        await healthy.handshake()
        names = ("web", "shop", "db")
        for _ in range(2):
            await healthy.send_results([healthy.result(name) for name in names])
            await broken.send_results([broken.result(name, success=False) for name in names])

        response = await running.queries.ListAgents(query_pb2.ListAgentsRequest())
        assert {a.name: a.impaired for a in response.agents} == {"eu-1": True, "eu-2": False}
        assert await running.metric('vantage_agents_impaired{region="eu"}') == 1
        assert await running.metric('vantage_agent_impaired{agent="eu-1",region="eu"}') == 1
        assert await running.metric('vantage_agent_impaired{agent="eu-2",region="eu"}') == 0
        assert await running.metric('vantage_check_verdict{check="web",state="up"}') == 1
        broken.close()
        healthy.close()


@pytest.fixture
async def scenario(tmp_path: Path) -> AsyncIterator[tuple[Running, dict[str, Reporter], float]]:
    """A coordinator (per-agent series on) after ``metrics_scenario.exercise``."""
    now = time.time()
    async with start(
        write_scenario_config(tmp_path, per_agent=True), reload_on_sighup=False
    ) as running:
        agents = await exercise(running, now)
        try:
            yield running, agents, now
        finally:
            for reporter in agents.values():
                reporter.agent.close()


async def test_latency_per_phase_is_the_mean_over_the_regions_latest_successes(
    scenario: tuple[Running, dict[str, Reporter], float],
) -> None:
    running, agents, _ = scenario
    found = samples(await running.metrics())
    eu = {
        p: value(found, "vantage_check_phase_seconds", check="web", region="eu", phase=p)
        for p in PHASES
    }
    expected = {p: (getattr(EU1_WEB, p) + getattr(EU2_WEB, p)) / 2 for p in PHASES if p != "tls"}
    assert eu == {**{p: pytest.approx(v) for p, v in expected.items()}, "tls": None}
    assert value(
        found, "vantage_check_phase_seconds", check="web", region="us", phase="connect"
    ) == pytest.approx(US1_WEB.connect)
    # A region whose agents all fail has no latency; the https check has its tls phase.
    assert not [
        s
        for s in series(found, "vantage_check_phase_seconds")
        if s["check"] == "db" and s["region"] == "eu"
    ]
    assert value(
        found, "vantage_check_phase_seconds", check="secure", region="us", phase="tls"
    ) == pytest.approx(0.005)
    # ap-1 left: its results no longer count anywhere.
    assert not [s for s in series(found, "vantage_check_phase_seconds") if s["region"] == "ap"]

    # eu-2's web probe fails: eu's latency is eu-1's alone.
    await agents["eu-2"].send(web=outcome(failure=FailureClass.HTTP_STATUS))
    found = samples(await running.metrics())
    assert value(
        found, "vantage_check_phase_seconds", check="web", region="eu", phase="processing"
    ) == pytest.approx(EU1_WEB.processing)


async def test_failures_are_counted_by_check_region_and_class(
    scenario: tuple[Running, dict[str, Reporter], float],
) -> None:
    running, agents, _ = scenario
    found = samples(await running.metrics())
    failures = {
        (s["check"], s["region"], s["class"]): value(found, "vantage_check_failures_total", **s)
        for s in series(found, "vantage_check_failures_total")
    }
    assert failures == {("db", "eu", "connect_refused"): 2, ("smtp", "us", "timeout"): 1}
    # The why of eu's outage of db, for alerts.
    region_failures = sorted(
        (s["check"], s["region"], s["class"]) for s in series(found, "vantage_check_region_failure")
    )
    assert region_failures == [("db", "eu", "connect_refused"), ("smtp", "us", "timeout")]
    assert value(found, "vantage_check_region_up", check="db", region="eu") == 0
    assert value(found, "vantage_check_verdict", check="db", state="regional") == 1

    await agents["eu-1"].send(db=outcome(failure=FailureClass.CONNECT_TIMEOUT, tcp=True))
    found = samples(await running.metrics())
    assert (
        value(
            found,
            "vantage_check_failures_total",
            check="db",
            region="eu",
            **{"class": "connect_refused"},
        )
        == 2
    )
    assert (
        value(
            found,
            "vantage_check_failures_total",
            check="db",
            region="eu",
            **{"class": "connect_timeout"},
        )
        == 1
    )


async def test_certificate_expiry_is_the_earliest_the_connected_agents_see(
    scenario: tuple[Running, dict[str, Reporter], float],
) -> None:
    running, agents, now = scenario
    expiry = "vantage_check_cert_expiry_timestamp_seconds"
    found = samples(await running.metrics())
    assert {s["check"] for s in series(found, expiry)} == {"secure", "smtp"}  # TLS only
    assert value(found, expiry, check="secure") == round(now + 10 * DAY)
    assert value(found, expiry, check="smtp") == round(now + 30 * DAY)

    # A failing probe without a TLS session keeps the expiry known.
    await agents["eu-1"].send(secure=outcome(failure=FailureClass.CONNECT_REFUSED))
    assert await running.metric(f'{expiry}{{check="secure"}}') == round(now + 10 * DAY)
    # eu-1 leaves: the earliest among those still connected.
    agents["eu-1"].agent.close()

    async def eu1_gone() -> bool:
        return await running.metric('vantage_agent_connected{agent="eu-1",region="eu"}') == 0

    await eventually(eu1_gone, "eu-1 to disconnect")
    assert await running.metric(f'{expiry}{{check="secure"}}') == round(now + 20 * DAY)


async def test_fleet_per_region_and_per_agent(
    scenario: tuple[Running, dict[str, Reporter], float],
) -> None:
    running, _, _ = scenario
    found = samples(await running.metrics())
    for region, connected, gone in (("eu", 2, 0), ("us", 1, 0), ("ap", 0, 1)):
        assert value(found, "vantage_agents_connected", region=region) == connected
        assert value(found, "vantage_agents_disconnected", region=region) == gone
        assert value(found, "vantage_agents_impaired", region=region) == 0
    assert value(found, "vantage_agent_connected", agent="ap-1", region="ap") == 0
    received = {
        s["agent"]: value(found, "vantage_agent_results_received_total", **s)
        for s in series(found, "vantage_agent_results_received_total")
    }
    assert received == {"eu-1": 4, "eu-2": 4, "us-1": 4, "ap-1": 1}  # dropped ones not counted
    assert value(found, "vantage_results_received_total", region="eu") == 8
    assert value(found, "vantage_results_dropped_total", reason="duplicate") == 1
    assert value(found, "vantage_results_dropped_total", reason="unassigned") == 1


async def test_the_coordinators_own_work_is_timed(
    scenario: tuple[Running, dict[str, Reporter], float],
) -> None:
    running, _, _ = scenario
    found = samples(await running.metrics())
    ingest = value(found, "vantage_results_ingest_seconds_total")
    assert ingest is not None
    assert ingest > 0
    ticks = value(found, "vantage_engine_tick_duration_seconds_count")
    assert ticks is not None
    assert ticks >= 1
    assert value(found, "vantage_engine_tick_duration_seconds_bucket", le="+Inf") == ticks


async def test_a_removed_check_leaves_no_series(
    scenario: tuple[Running, dict[str, Reporter], float],
) -> None:
    running, _, _ = scenario
    without_db = "\n".join(line for line in CHECKS.splitlines() if "name: db" not in line)
    running.checks_file.write_text(without_db + "\n")
    assert running.coordinator.reload_checks()
    found = samples(await running.metrics())
    assert not [labels for _, labels in found if ("check", "db") in labels]
    assert [labels for _, labels in found if ("check", "web") in labels]


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_metrics() -> set[str]:
    """The names in README.md's metrics table, but MQTT's and TLS's (they exist only with
    a broker, with a certificate)."""
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `vantage_")]
    return {row.split("`")[1] for row in rows if "mqtt" not in row and "_tls_" not in row}


async def test_the_readme_lists_every_metric_by_its_exported_name(tmp_path: Path) -> None:
    """README.md's metrics table and /metrics agree, both ways."""
    histograms = {"vantage_engine_tick_duration_seconds"}
    exported = {
        next((h for h in histograms if name.startswith(f"{h}_")), name)
        for name in await exported_names(tmp_path)
        if name.startswith("vantage_")
    }
    assert readme_metrics() == exported


async def test_a_scrape_can_ask_for_some_families_only(running: Running) -> None:
    """``/metrics?name[]=...``, as prometheus_client serves it: what the benchmark polls
    without having every check's series written out each time."""
    query = "name[]=vantage_build_info&name[]=vantage_check_verdict"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{running.http_url}/metrics?{query}") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    assert {sample[0] for sample in samples(text)} == {
        "vantage_build_info",
        "vantage_check_verdict",
    }
