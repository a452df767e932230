"""Second opinions end to end: real coordinator, real agents, a real HTTP server.

The check runs every 20 s and the agents' schedules are spread over that interval. When
the server starts refusing, the first agent to notice makes the coordinator ask every
agent to look again at once: each sees the outage well within one interval of the first,
instead of at its own next slot.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from running_system import Proc, System, free_port, wait_until

pytestmark = pytest.mark.e2e

INTERVAL = 20.0
AGENTS = (("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap"))


def _results(agent: Proc, *, success: bool) -> list[dict[str, Any]]:
    return [
        e
        for e in agent.log_events()
        if e.get("event") == "probe result" and e.get("check") == "web" and e["success"] is success
    ]


def _rechecks(agent: Proc) -> list[dict[str, Any]]:
    return [e for e in agent.log_events() if e.get("event") == "recheck received"]


def test_every_agent_sees_an_outage_within_an_interval_of_the_first(system: System) -> None:
    port = free_port()
    server = system.http_server(port)
    config = system.write_config(
        "checks:\n"
        f"  - {{name: web, type: http, target: 'http://127.0.0.1:{port}/', "
        f"interval: {INTERVAL:g}s, timeout: 1s}}\n"
    )
    coordinator = system.coordinator(config)
    agents = [system.agent(coordinator, name, region) for name, region in AGENTS]

    def every_region_up() -> bool:
        regions = coordinator.status("web")["regions"]
        return len(regions) == 3 and all(view["state"] == "up" for view in regions.values())

    wait_until(every_region_up, 2 * INTERVAL, "every region to see web up")
    server.stop()
    wait_until(
        lambda: all(_results(agent, success=False) for agent in agents),
        2 * INTERVAL,
        "every agent to see web fail",
    )

    first_failures = [
        datetime.fromisoformat(_results(agent, success=False)[0]["timestamp"]) for agent in agents
    ]
    spread = (max(first_failures) - min(first_failures)).total_seconds()
    # Without rechecks each would wait for its own slot, anywhere in the interval.
    assert spread < INTERVAL / 4, first_failures
    for agent in agents:
        assert any(e["started"] == 1 for e in _rechecks(agent)), agent.args
    requested = [
        line for line in coordinator.metrics().splitlines() if line.startswith("vantage_rechecks")
    ]
    assert requested
    assert float(requested[0].rpartition(" ")[2]) >= 3
