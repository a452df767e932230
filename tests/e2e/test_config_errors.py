"""Bad input from outside gets one clear line naming the problem and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from running_system import VANTAGE, System

pytestmark = pytest.mark.e2e

GOOD = "{name: web, type: http, target: 'http://127.0.0.1:1/', interval: 2s, timeout: 1s}"


def _coordinator_error(system: System, checks: str) -> str:
    config = system.write_config(checks)
    result = subprocess.run(
        [VANTAGE, "coordinator", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        (
            "checks:\n  - {name: web, type: gopher, target: 'x:1'}\n",
            "checks.yaml:2: check 'web': unknown probe type 'gopher'",
        ),
        ("checks:\n  - {name: web, type: http}\n", "check 'web': missing required field 'target'"),
        (f"checks:\n  - {GOOD}\n  - {GOOD}\n", "checks.yaml:3: check 'web': duplicate check name"),
        (
            "checks:\n  - {name: web, type: tcp, target: 'a:1', interval: soon}\n",
            "check 'web': interval: 'soon' is not a duration",
        ),
        (
            "checks:\n  - {name: web, type: tcp, target: 'a:1', interval: 0s}\n",
            "check 'web': interval",
        ),
        (
            "checks:\n  - {name: web, type: tcp, target: 'a:1', interval: 2s, timeout: 2s}\n",
            "check 'web': timeout 2s must be below interval 2s",
        ),
    ],
    ids=[
        "unknown-type",
        "missing-field",
        "duplicate-name",
        "bad-interval",
        "zero-interval",
        "timeout",
    ],
)
def test_bad_checks_file_is_refused_in_one_line(system: System, checks: str, expected: str) -> None:
    assert expected in _coordinator_error(system, checks)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = subprocess.run(
        [VANTAGE, "coordinator", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--name", "bad name!"], "--name 'bad name!' is invalid"),
        (["--coordinator", "nowhere"], "--coordinator 'nowhere' is not HOST:PORT"),
        (["--token-file", "/nonexistent/token"], "cannot read token file /nonexistent/token"),
    ],
    ids=["name", "address", "token-file"],
)
def test_bad_agent_flags_are_refused_in_one_line(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    token = tmp_path / "token"
    token.write_text("some-token-0123456789\n")
    flags = {"--coordinator": "127.0.0.1:1", "--name": "eu-1", "--region": "eu"}
    flags["--token-file"] = str(token)
    flags.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = [item for pair in flags.items() for item in pair]
    result = subprocess.run([VANTAGE, "agent", *argv], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["coordinator", "agent", "status", "agents"])
def test_every_command_has_help(command: str) -> None:
    result = subprocess.run([VANTAGE, command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: vantage" in result.stdout


def test_an_address_in_use_is_named(system: System) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = system.write_config("checks: []\n")
        config.write_text(
            config.read_text().replace("http_listen: 127.0.0.1:0", f"http_listen: 127.0.0.1:{port}")
        )
        result = subprocess.run(
            [VANTAGE, "coordinator", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vantage coordinator: error: cannot listen on"), result.stderr
    assert f"127.0.0.1:{port}" in last
