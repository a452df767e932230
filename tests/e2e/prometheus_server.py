"""A real Prometheus server (the Debian package) for end-to-end tests: started on a
scrape configuration the test writes, asked through its own HTTP API."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from running_system import Proc, System, free_port, wait_until


def binary(name: str, package: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(f"{name} is missing: `make test` installs the Debian package {package}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass
class Prometheus:
    url: str
    proc: Proc

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        return [
            alert
            for alert in self.api("alerts")["alerts"]
            if alert["labels"]["alertname"] == name and alert["state"] == state
        ]

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active


@contextmanager
def prometheus(system: System, config: dict[str, Any]) -> Iterator[Prometheus]:
    """Prometheus on ``config`` (a prometheus.yml as a mapping), ready; its storage is
    removed afterwards, whatever the test did."""
    storage = Path(tempfile.mkdtemp(prefix="vantage-e2e-prometheus-"))
    try:
        port = free_port()
        (storage / "prometheus.yml").write_text(json.dumps(config))
        proc = system.spawn(
            "prometheus",
            binary("prometheus", "prometheus"),
            f"--config.file={storage / 'prometheus.yml'}",
            f"--storage.tsdb.path={storage / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        )
        server = Prometheus(f"http://127.0.0.1:{port}", proc)

        def ready() -> bool:
            if proc.popen.poll() is not None:
                pytest.fail(f"prometheus exited {proc.popen.returncode}: {proc.stderr()[-2000:]}")
            return answers(f"{server.url}/-/ready")

        wait_until(ready, 30, "Prometheus to be ready")
        yield server
        proc.stop()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
