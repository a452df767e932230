"""/metrics as Prometheus scrapes it: names, labels, values, and promtool's rules."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from live_coordinator import Running, start, write_config

from vantage import __version__
from vantage_proto.v1 import query_pb2


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


async def test_metrics_pass_promtool(running: Running) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (`make system-deps`)")
    agent = running.agent()
    await agent.handshake()
    await agent.send_results([agent.result("web"), agent.result("nope")])
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate((await running.metrics()).encode())
    assert process.returncode == 0, output.decode()
    assert output.decode().strip() == ""
    agent.close()


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
