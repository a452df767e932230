"""deploy/cloud-init/agent.yaml: user data cloud-init accepts, which writes the token
root's alone and the shipped agent unit with only its coordinator, name and region
changed, and installs the wheel with a shell script that parses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
USER_DATA = ROOT / "deploy" / "cloud-init" / "agent.yaml"
UNIT = ROOT / "deploy" / "systemd" / "vantage-agent.service"
# What the user fills in, in the user data's copy of the unit.
PLACEHOLDERS = {
    "coordinator": "YOUR-COORDINATOR:7400",
    "name": "YOUR-AGENT-NAME",
    "region": "YOUR-REGION",
}
EXEC_START = re.compile(r"^ExecStart=(?:.*\\\n)*.*$", re.MULTILINE)


def user_data() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(USER_DATA.read_text())
    return loaded


def written(path: str) -> dict[str, Any]:
    files = [entry for entry in user_data()["write_files"] if entry["path"] == path]
    assert len(files) == 1, f"write_files has {len(files)} entries for {path}"
    return files[0]


def with_agent(unit: str, **values: str) -> str:
    """``unit`` with the values of its ExecStart's ``--coordinator``, ``--name`` and
    ``--region`` replaced."""
    exec_starts = EXEC_START.findall(unit)
    assert len(exec_starts) == 1, exec_starts
    command = exec_starts[0]
    for flag, value in values.items():
        command, replaced = re.subn(rf"--{flag} \S+", f"--{flag} {value}", command)
        assert replaced == 1, f"--{flag} in {command!r}"
    return unit.replace(exec_starts[0], command)


def test_cloud_init_accepts_the_user_data() -> None:
    tool = shutil.which("cloud-init")
    if tool is None:
        pytest.skip("cloud-init is not installed (`make system-deps`)")
    done = subprocess.run(
        [tool, "schema", "--config-file", str(USER_DATA)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"Valid cloud-config: {USER_DATA}"


def test_the_user_data_is_cloud_config_that_installs_python3_venv() -> None:
    assert USER_DATA.read_text().startswith("#cloud-config\n")
    assert "python3-venv" in user_data()["packages"]


def test_the_unit_is_the_shipped_one_apart_from_coordinator_name_and_region() -> None:
    unit = written("/etc/systemd/system/vantage-agent.service")
    assert unit["permissions"] == "0644"
    assert unit["content"] == with_agent(UNIT.read_text(), **PLACEHOLDERS)


def test_the_token_is_readable_by_root_alone() -> None:
    token = written("/etc/vantage/agent.token")
    assert (token["owner"], token["permissions"]) == ("root:root", "0600")
    unit = UNIT.read_text()
    assert "LoadCredential=agent.token:/etc/vantage/agent.token" in unit


def test_the_install_script_parses_and_starts_the_agent() -> None:
    script = "\n".join(user_data()["runcmd"])
    done = subprocess.run(
        ["sh", "-n"], input=script, capture_output=True, text=True, timeout=10, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "VANTAGE_WHEEL_URL=" in script
    assert "systemctl enable --now vantage-agent.service" in script
