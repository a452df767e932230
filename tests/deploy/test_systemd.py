"""deploy/systemd: the units as systemd reads them (``systemd-analyze verify``), how exposed
they leave the host (``systemd-analyze security``, below 3.0 for both), and an agent and a
coordinator at work under the units' memory and socket rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import unit_rules
from running_system import VANTAGE, System, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
NAMES = ("vantage-agent.service", "vantage-coordinator.service")
MAX_EXPOSURE = 3.0
EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+) (\w+)")


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (`make system-deps`)")
    return subprocess.run(
        [tool, "--no-pager", *args], capture_output=True, text=True, timeout=60, check=False
    )


def settings(name: str) -> dict[str, list[str]]:
    """The [Service] values of a unit by key (every line of a key that repeats)."""
    found: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().split("[Service]")[1].split("\n["):
        for entry in line.splitlines():
            key, sep, value = entry.partition("=")
            if sep and not entry.startswith("#"):
                found.setdefault(key, []).append(value)
    return found


@pytest.fixture(scope="module")
def host_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file system root for ``verify --root``: the units, the targets they order
    against, and a real ``/opt/vantage/bin/vantage`` (this venv's: verify checks that
    each command is an executable file) and ``/bin/kill`` (the coordinator's reload)."""
    root = tmp_path_factory.mktemp("root")
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir()
    (root / "bin").symlink_to("usr/bin")  # merged /usr, as on Debian 12
    kill = shutil.which("kill")
    assert kill is not None
    shutil.copy2(kill, root / "usr/bin/kill")
    (root / "opt/vantage/bin").mkdir(parents=True)
    shutil.copy2(VANTAGE, root / "opt/vantage/bin/vantage")
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in NAMES:
        shutil.copy2(UNITS / name, root / "etc/systemd/system" / name)
    return root


@pytest.mark.parametrize("name", NAMES)
def test_systemd_verifies_the_unit_without_a_warning(host_root: Path, name: str) -> None:
    done = systemd_analyze("verify", f"--root={host_root}", name)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Unknown keys and values systemd cannot parse are warnings, with exit status 0.
    assert [line for line in output.splitlines() if name in line] == []


@pytest.mark.parametrize("name", NAMES)
def test_the_unit_exposes_the_host_little(name: str) -> None:
    done = systemd_analyze("security", "--offline=true", str(UNITS / name))
    assert done.returncode == 0, done.stderr
    match = EXPOSURE.search(done.stdout)
    assert match is not None, done.stdout
    print(f"{name}: {match.group(0)}")
    assert match.group(1) == name
    assert float(match.group(2)) < MAX_EXPOSURE, done.stdout


def test_only_the_agent_holds_a_capability_and_it_is_cap_net_raw() -> None:
    agent = settings("vantage-agent.service")
    coordinator = settings("vantage-coordinator.service")
    assert agent["AmbientCapabilities"] == agent["CapabilityBoundingSet"] == ["CAP_NET_RAW"]
    assert coordinator["CapabilityBoundingSet"] == [""]
    assert "AmbientCapabilities" not in coordinator
    # A user namespace would leave CAP_NET_RAW without effect on the host's network.
    assert "PrivateUsers" not in agent
    assert coordinator["PrivateUsers"] == ["yes"]
    assert agent["StateDirectory"] == ["vantage-agent"]
    assert coordinator["StateDirectory"] == ["vantage"]
    # The agent finds its spool under $STATE_DIRECTORY by itself.
    assert "--spool-dir" not in agent["ExecStart"][0]


def rules_prefix(name: str) -> tuple[str, ...]:
    """The command prefix that runs a process under the unit's MemoryDenyWriteExecute=
    and RestrictAddressFamilies= (tests/deploy/unit_rules.py)."""
    unit = settings(name)
    prefix = [sys.executable, unit_rules.__file__]
    if unit.get("MemoryDenyWriteExecute") == ["yes"]:
        prefix.append("--memory-deny-write-execute")
    if "RestrictAddressFamilies" in unit:
        families = [f for value in unit["RestrictAddressFamilies"] for f in value.split()]
        prefix += ["--families", ",".join(families)]
    return (*prefix, "--")


@pytest.mark.e2e
@pytest.mark.skipif(not unit_rules.supported(), reason="seccomp filters for x86-64 and arm64")
def test_agent_and_coordinator_work_under_the_units_memory_and_socket_rules(
    system: System,
) -> None:
    """Python, grpcio, uvloop and the probes neither need writable executable memory
    nor sockets beyond IPv4, IPv6 and Unix: an agent probes by HTTP and ICMP (raw
    sockets, as the unit's CAP_NET_RAW allows) and delivers to a coordinator."""
    proof = subprocess.run(
        [
            *rules_prefix("vantage-agent.service"),
            sys.executable,
            "-c",
            "import mmap, socket\n"
            "try: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "except PermissionError: print('no wx')\n"
            "try: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n"
            "except OSError as e: print(e.strerror)\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert proof.stdout.splitlines() == ["no wx", "Address family not supported by protocol"]

    web_port = free_port()
    system.http_server(web_port)
    config = system.write_config(
        "checks:\n"
        f"  - {{name: web, type: http, target: 'http://127.0.0.1:{web_port}/', "
        "interval: 1s, timeout: 500ms}\n"
        "  - {name: loopback-ping, type: icmp, target: 127.0.0.1, interval: 1s, "
        "timeout: 800ms, count: 2}\n",
        engine="engine:\n  min_agents: 1\n  min_regions: 1\n",
    )
    coordinator = system.coordinator(config, prefix=rules_prefix("vantage-coordinator.service"))
    agent = system.agent(coordinator, "eu-1", "eu", prefix=rules_prefix("vantage-agent.service"))

    def verdicts() -> dict[str, str] | None:
        if agent.popen.poll() is not None:
            pytest.fail(f"the agent exited {agent.popen.returncode}: {agent.stderr()}")
        listed = json.loads(coordinator.cli("status", "--json").stdout)["verdicts"]
        states = {verdict["check"]: verdict["state"] for verdict in listed}
        return states if states == {"web": "up", "loopback-ping": "up"} else None

    wait_until(verdicts, 30, "both checks up from the agent under the unit's rules")
    assert coordinator.proc.popen.poll() is None, coordinator.proc.stderr()
