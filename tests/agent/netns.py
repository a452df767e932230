"""Run a piece of Python in a fresh network namespace, for what the host's network
cannot show: no route at all, or unprivileged ICMP allowed by ping_group_range.

The namespace has only a loopback interface (up) and its own sysctls, so nothing here
changes the host's settings. It needs unshare(1) and CAP_SYS_ADMIN (the test machine
runs the tests as root).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_in_netns(code: str, *, ping_group_range: str | None = None) -> Any:
    """Run ``code`` (which prints one JSON value as its last line) with ``sys.executable``
    in a new network namespace; returns the decoded value."""
    if shutil.which("unshare") is None:
        pytest.fail("these tests need unshare(1) (util-linux) to make a network namespace")
    setup = "ip link set lo up"
    if ping_group_range is not None:
        setup += f" && sysctl -q -w net.ipv4.ping_group_range='{ping_group_range}'"
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", f'{setup} && exec "$0" -c "$1"', sys.executable, code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            "running in a new network namespace failed (needs root or CAP_SYS_ADMIN): "
            f"{done.stderr.strip()}"
        )
    return json.loads(done.stdout.splitlines()[-1])
