"""`vantage check` end to end: the real command against a real coordinator and real agent
processes, probing real HTTP servers -- up, down for everyone, just you (the command run
in a network namespace of its own that reaches the coordinator but not the target), the
on-demand guard (private and metadata targets, names, redirects, the allow-list) and the
rate limit."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from check_now import (
    VethCoordinator,
    client_namespace,
    one_error_line,
    run_check,
    start_agents,
    write_files,
)
from running_system import VANTAGE, Coordinator, System, free_port, wait_until

pytestmark = pytest.mark.e2e

ALLOWED = "127.0.0.2"  # the one loopback address the module's coordinator allows
# A coordinator on the namespace's link listens beyond loopback: these tests are about
# where a check runs, not about exposure, so it says so (tests/e2e/test_internet.py is).
ON_A_LINK = "tls: off\nquery_auth: none\n"
CONFIG = f"""\
listen: 127.0.0.1:0
http_listen: 127.0.0.1:0
tokens_file: tokens.yaml
heartbeat_interval: 1s
engine: {{min_agents: 2, min_regions: 2}}
on_demand: {{allow: [{ALLOWED}/32], rate: 600/min, burst: 100}}
"""
REDIRECTOR = """\
import http.server, sys
class Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", sys.argv[3])
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Redirect).serve_forever()
"""


@dataclass
class Fleet:
    """A coordinator with an agent in eu and one in us, and the system around them."""

    system: System
    coordinator: Coordinator

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_check(*args, "--coordinator", self.coordinator.address)


def port_on(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def serving(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def web_server(system: System, host: str) -> int:
    """A real HTTP server (Python's http.server) on ``host``; its port."""
    root = system.dir / "www"
    root.mkdir(exist_ok=True)
    port = port_on(host)
    args = ("--bind", host, "--directory", str(root), str(port))
    system.spawn(f"http-{host}-{port}", sys.executable, "-m", "http.server", *args)
    wait_until(lambda: serving(host, port), 10, f"the HTTP server on {host}:{port}")
    return port


def redirect_server(system: System, host: str, location: str) -> int:
    script = system.dir / "redirector.py"
    script.write_text(REDIRECTOR)
    port = port_on(host)
    system.spawn(f"redirect-{port}", sys.executable, str(script), host, str(port), location)
    wait_until(lambda: serving(host, port), 10, f"the redirecting server on {host}:{port}")
    return port


@pytest.fixture(scope="module")
def fleet(module_system: System) -> Fleet:
    coordinator = module_system.coordinator(write_files(module_system.dir, CONFIG))
    start_agents(module_system, coordinator)
    return Fleet(module_system, coordinator)


def test_up_from_everywhere(fleet: Fleet) -> None:
    port = web_server(fleet.system, ALLOWED)
    done = fleet.check(f"http://{ALLOWED}:{port}/")
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[0] == "up: from 2 agents in 2 regions and from here"
    table = [line.split() for line in lines[2:]]
    assert table[0] == ["REGION", "UP", "DOWN", "NO", "ANSWER", "FAILURE", "LATENCY"]
    assert [row[:5] for row in table[1:]] == [
        ["eu", "1", "0", "0", "-"],
        ["us", "1", "0", "0", "-"],
        ["(here)", "1", "0", "0", "-"],
    ]


def test_down_for_everyone(fleet: Fleet) -> None:
    port = port_on(ALLOWED)  # nothing listens there
    done = fleet.check(f"http://{ALLOWED}:{port}/")
    assert done.returncode == 1, done
    lines = done.stdout.splitlines()
    assert lines[0] == "down for everyone: connection refused from 2 agents in eu, us"
    assert [line.split()[:5] for line in lines[3:]] == [
        ["eu", "0", "1", "0", "connect_refused"],
        ["us", "0", "1", "0", "connect_refused"],
        ["(here)", "0", "1", "0", "connect_refused"],
    ]


def test_json_for_scripts(fleet: Fleet) -> None:
    port = web_server(fleet.system, ALLOWED)
    done = fleet.check(f"{ALLOWED}:{port}", "--json")  # HOST:PORT: a tcp check
    assert done.returncode == 0, done
    answer = json.loads(done.stdout)
    assert answer["answer"] == "up"
    assert answer["summary"] == "up: from 2 agents in 2 regions and from here"
    assert answer["target"] == f"{ALLOWED}:{port}"
    assert answer["check"]["name"].startswith("checknow-")
    assert answer["check"]["tcp"] is not None
    assert answer["verdict"]["state"] == "up"
    assert sorted(answer["verdict"]["regions"]) == ["eu", "us"]
    assert [(r["agent"], r["region"], r["result"]["success"]) for r in answer["results"]] == [
        ("eu-1", "eu", True),
        ("us-1", "us", True),
    ]
    assert answer["results"][0]["result"]["tcp"]["peer"] == f"{ALLOWED}:{port}"
    assert answer["missing"] == []
    assert answer["unable"] == []
    assert answer["here"]["probed"] is True
    assert answer["here"]["result"]["success"] is True


def test_a_progress_line_while_waiting_on_a_terminal(fleet: Fleet) -> None:
    port = web_server(fleet.system, ALLOWED)
    address = fleet.coordinator.address
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [VANTAGE, "check", f"http://{ALLOWED}:{port}/", "--coordinator", address],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=60,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        with contextlib.suppress(OSError):  # EIO once everything written has been read
            while chunk := os.read(controller, 4096):
                shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert done.returncode == 0
    assert b"checking http://127.0.0.2:" in shown
    assert b"from the coordinator's agents and from here" in shown
    assert shown.endswith(b"\r\x1b[K")  # the line is gone before the answer
    assert "checking" not in done.stdout


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("10.1.2.3", "10.1.2.3 (private) is not allowed for on-demand checks"),
        ("http://192.168.0.1/", "192.168.0.1 (private) is not allowed for on-demand checks"),
        ("169.254.169.254", "169.254.169.254 (cloud metadata) is not allowed for on-demand checks"),
        (
            "http://[fd00:ec2::254]/",
            "fd00:ec2::254 (cloud metadata) is not allowed for on-demand checks",
        ),
        ("127.0.0.3:80", "127.0.0.3 (loopback) is not allowed for on-demand checks"),
    ],
)
def test_the_guard_refuses_private_and_metadata_targets(
    fleet: Fleet, target: str, why: str
) -> None:
    line = one_error_line(fleet.check(target))
    assert line == f"vantage check: error: refused by the on-demand guard: {why}"


def test_the_guard_refuses_a_name_that_resolves_to_a_refused_address(fleet: Fleet) -> None:
    port = web_server(fleet.system, ALLOWED)
    line = one_error_line(fleet.check(f"http://localhost:{port}/"))
    assert line.startswith("vantage check: error: refused by the on-demand guard: localhost ")
    assert line.endswith("(loopback), which is not allowed for on-demand checks")


def test_the_agents_refuse_a_redirect_to_a_refused_address(fleet: Fleet) -> None:
    # The allow-list opens exactly the first hop; the coordinator lets it through and the
    # agents refuse the hop it redirects to, before connecting.
    inner = web_server(fleet.system, "127.0.0.1")
    outer = redirect_server(fleet.system, ALLOWED, f"http://127.0.0.1:{inner}/")
    line = one_error_line(fleet.check(f"http://{ALLOWED}:{outer}/"))
    assert line.startswith("vantage check: error: refused by the on-demand guard: agent ")
    assert line.endswith("refused: 127.0.0.1 (loopback) is not allowed for on-demand checks")


def test_a_local_probe_that_cannot_run_is_not_a_failure(fleet: Fleet) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1) (util-linux) to run the command without CAP_NET_RAW")
    low, high = Path("/proc/sys/net/ipv4/ping_group_range").read_text().split()
    if int(low) <= os.getegid() <= int(high):
        pytest.skip("unprivileged ICMP is allowed for this group: the local ping would run")
    # The agents ping as root; the command, without CAP_NET_RAW, cannot ping at all.
    no_raw = ("setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw")
    done = run_check(ALLOWED, "--coordinator", fleet.coordinator.address, prefix=no_raw)
    if "Operation not permitted" in done.stderr and done.returncode == 2:
        pytest.skip(f"setpriv cannot drop CAP_NET_RAW here: {done.stderr.strip()}")
    assert done.returncode == 0, done
    line = done.stdout.splitlines()[0]
    assert line.startswith("up: from 2 agents in 2 regions (not probed here: icmp: no raw socket")
    assert done.stdout.splitlines()[-1].split()[:5] == ["(here)", "-", "-", "-", "not"]


def test_an_unreachable_coordinator_is_one_line() -> None:
    address = f"127.0.0.1:{free_port()}"
    line = one_error_line(run_check("http://example.org/", "--coordinator", address))
    assert line == (
        f"vantage check: error: cannot reach the coordinator at {address}: connection refused"
    )


def test_a_bad_target_is_a_usage_error() -> None:
    line = one_error_line(run_check("ftp://example.org/"))
    assert (
        line
        == "vantage check: error: target 'ftp://example.org/' is not an http:// or https:// URL"
    )


def test_the_rate_limit(system: System) -> None:
    config = CONFIG.replace("rate: 600/min, burst: 100", "rate: 2/min, burst: 2")
    coordinator = system.coordinator(write_files(system.dir, config))
    target = f"http://{ALLOWED}:{port_on(ALLOWED)}/"
    for _ in range(2):
        done = run_check(target, *coordinator.connect)
        assert done.returncode == 1, done  # no agent: not known to be up
        assert done.stdout.splitlines()[0] == (
            "unknown: no agent is connected; failing here (connect_refused)"
        )
    line = one_error_line(run_check(target, *coordinator.connect))
    assert re.fullmatch(
        r"vantage check: error: rate limit reached: 2/min on-demand checks per caller "
        r"\(burst 2\); retry in (\d+)s",
        line,
    ), line


# -- it's just you --------------------------------------------------------------------------


def test_its_just_you(system: System) -> None:
    with client_namespace() as namespace:
        config = (
            CONFIG.replace("127.0.0.1:0", f"{namespace.host}:0", 1).replace(
                f"allow: [{ALLOWED}/32]", "allow: [198.18.0.0/15]"
            )
            + ON_A_LINK
        )
        started = system.coordinator(write_files(system.dir, config))
        coordinator = VethCoordinator.at(started, namespace.host)
        start_agents(system, coordinator)
        port = web_server(system, namespace.unreachable)
        target = f"http://{namespace.unreachable}:{port}/"

        done = namespace.run(target, *coordinator.connect)
        assert done.returncode == 1, done
        lines = done.stdout.splitlines()
        assert lines[0] == (
            "it's just you: up from 2 agents in 2 regions, failing here (network_unreachable)"
        )
        assert lines[-1].split()[:5] == ["(here)", "0", "1", "0", "network_unreachable"]

        # The same command on the host, which reaches the target: up.
        done = run_check(target, *coordinator.connect, "--json")
        assert done.returncode == 0, done
        assert json.loads(done.stdout)["answer"] == "up"


def test_down_in_one_region_only(system: System) -> None:
    # eu-1 runs in the namespace, which does not reach the target; us-1 and the command
    # run on the host, which does.
    with client_namespace("down-in-one-region") as namespace:
        config = (
            CONFIG.replace("127.0.0.1:0", f"{namespace.host}:0", 1).replace(
                f"allow: [{ALLOWED}/32]", "allow: [198.18.0.0/15]"
            )
            + ON_A_LINK
        )
        started = system.coordinator(write_files(system.dir, config))
        coordinator = VethCoordinator.at(started, namespace.host)
        start_agents(system, coordinator, eu_prefix=namespace.prefix)
        port = web_server(system, namespace.unreachable)

        done = run_check(f"http://{namespace.unreachable}:{port}/", *coordinator.connect)
        assert done.returncode == 1, done
        lines = done.stdout.splitlines()
        assert lines[0] == "down in eu only (network_unreachable); up from here"
        assert [line.split()[:5] for line in lines[3:]] == [
            ["eu", "0", "1", "0", "network_unreachable"],
            ["us", "1", "0", "0", "-"],
            ["(here)", "1", "0", "0", "-"],
        ]
