"""The foundation's promise end to end: real coordinator, real agents, real HTTP server.

The server answers: every region sees it, the verdict is `up`. The server stops: every
region sees `connect_refused`, the verdict is `global`. It comes back: `up` again.
"""

from __future__ import annotations

import pytest
from running_system import System, free_port, wait_until

pytestmark = pytest.mark.e2e


def test_verdict_follows_the_server_down_and_up(system: System) -> None:
    port = free_port()
    server = system.http_server(port)
    config = system.write_config(
        "checks:\n"
        f"  - {{name: web, type: http, target: 'http://127.0.0.1:{port}/', "
        "interval: 1s, timeout: 500ms}\n"
    )
    coordinator = system.coordinator(config)
    for name, region in (("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap")):
        system.agent(coordinator, name, region)

    verdict = wait_until(
        lambda: (v := coordinator.status("web"))["state"] == "up" and v, 30, "web to be up"
    )
    assert sorted(verdict["regions"]) == ["ap", "eu", "us"]
    assert all(view["state"] == "up" for view in verdict["regions"].values())

    server.stop()
    verdict = wait_until(
        lambda: (v := coordinator.status("web"))["state"] == "global" and v,
        30,
        "web to be down for everyone",
    )
    assert verdict["failure"] == "connect_refused"
    assert verdict["regions_down"] == ["ap", "eu", "us"]
    for view in verdict["regions"].values():
        assert view["failure"] == "connect_refused"
        assert len(view["failing_agents"]) == 1

    system.http_server(port)
    wait_until(lambda: coordinator.status("web")["state"] == "up", 30, "web to be up again")

    # Every transition was logged naming the check: up, then (through whatever the
    # agents saw on the way) global, then up again.
    states = [
        e["state"]
        for e in coordinator.proc.log_events()
        if e.get("event") == "verdict changed" and e.get("check") == "web"
    ]
    assert states[-1] == "up"
    first_up = states.index("up")
    assert "global" in states[first_up:]
    assert states.index("global", first_up) < len(states) - 1
