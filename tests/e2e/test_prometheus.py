"""A real Prometheus server scrapes a real coordinator and evaluates the shipped alert
rules: when the target goes down for everyone, VantageCheckDownGlobally fires.

Real processes throughout: nginx serves the target, three `vantage agent` processes in
three regions probe it, `vantage coordinator` judges, and Prometheus (the Debian package)
scrapes the coordinator every second with deploy/prometheus/rules.yml loaded as shipped.
The test stops nginx and asks Prometheus' own HTTP API which alerts fire. The dashboard's
queries then run on the same Prometheus.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grafana_dashboard import dashboard, queries, substituted
from running_system import Coordinator, Proc, System, free_port, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
REGIONS = ("ap", "eu", "us")


def binary(name: str, package: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(f"{name} is missing: `make test` installs the Debian package {package}")


def start_nginx(system: System, port: int) -> Proc:
    """nginx in the foreground on 127.0.0.1:port, answering 200, everything in the test's
    directory."""
    directory = system.dir / "nginx"
    (directory / "temp").mkdir(parents=True)
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {directory}/temp/body;
  proxy_temp_path {directory}/temp/proxy;
  fastcgi_temp_path {directory}/temp/fastcgi;
  uwsgi_temp_path {directory}/temp/uwsgi;
  scgi_temp_path {directory}/temp/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "vantage e2e\\n"; }}
  }}
}}
"""
    )
    nginx = binary("nginx", "nginx")
    proc = system.spawn(
        "nginx", nginx, "-e", str(directory / "error.log"), "-p", str(directory), "-c", str(conf)
    )
    wait_until(lambda: _answers(f"http://127.0.0.1:{port}/"), 10, "nginx to answer")
    return proc


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def assert_promtool_clean(metrics: str) -> None:
    """promtool's linter has nothing to say about a real coordinator's exposition."""
    result = subprocess.run(
        [binary("promtool", "prometheus"), "check", "metrics"],
        input=metrics,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


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


@pytest.fixture(scope="module")
def stack(module_system: System) -> Iterator[tuple[Coordinator, Proc, Prometheus]]:
    """nginx, a coordinator with one check of it, agents in three regions, and a
    Prometheus scraping the coordinator. Prometheus' storage is removed afterwards, and
    every process stopped, whatever the tests did."""
    system = module_system
    target = free_port()
    nginx = start_nginx(system, target)
    config = system.write_config(
        "checks:\n"
        f"  - {{name: web, type: http, target: 'http://127.0.0.1:{target}/', "
        "interval: 1s, timeout: 500ms}\n"
    )
    coordinator = system.coordinator(config)
    for region in REGIONS:
        system.agent(coordinator, f"{region}-1", region)

    storage = Path(tempfile.mkdtemp(prefix="vantage-e2e-prometheus-"))
    try:
        port = free_port()
        # The test's own scrape config (short intervals); the rules file is the shipped one.
        (storage / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: vantage\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{coordinator.http_port}']}}]\n"
        )
        proc = system.spawn(
            "prometheus",
            binary("prometheus", "prometheus"),
            f"--config.file={storage / 'prometheus.yml'}",
            f"--storage.tsdb.path={storage / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        )
        prometheus = Prometheus(f"http://127.0.0.1:{port}", proc)

        def ready() -> bool:
            if proc.popen.poll() is not None:
                pytest.fail(f"prometheus exited {proc.popen.returncode}: {proc.stderr()[-2000:]}")
            return _answers(f"{prometheus.url}/-/ready")

        wait_until(ready, 30, "Prometheus to be ready")
        yield coordinator, nginx, prometheus
    finally:
        for process in reversed(system.procs):
            process.stop()
        shutil.rmtree(storage, ignore_errors=True)


def test_a_global_outage_fires_the_global_alert(
    stack: tuple[Coordinator, Proc, Prometheus],
) -> None:
    coordinator, nginx, prometheus = stack
    up = 'vantage_check_verdict{job="vantage",check="web",state="up"} == 1'
    wait_until(lambda: prometheus.query(up), 60, "Prometheus to see web up")
    groups = prometheus.api("rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert "VantageCheckDownGlobally" in loaded
    assert not prometheus.alerts("VantageCheckDownGlobally", "pending")
    assert not prometheus.alerts("VantageCheckDownGlobally")
    # Real probes: per-phase latency per region, from the agents' own measurements.
    connect = prometheus.query('vantage_check_phase_seconds{phase="connect"}')
    assert {s["metric"]["region"] for s in connect} == set(REGIONS)
    assert_promtool_clean(coordinator.metrics())

    nginx.stop()
    (alert,) = wait_until(
        lambda: prometheus.alerts("VantageCheckDownGlobally"),
        120,
        "VantageCheckDownGlobally to fire",
        every=1.0,
    )
    assert alert["labels"]["check"] == "web"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "web is down for everyone"
    assert (
        "from every region: ap (connect_refused), eu (connect_refused), us (connect_refused)."
        in alert["annotations"]["description"]
    )
    firing = prometheus.query('ALERTS{alertname="VantageCheckDownGlobally",alertstate="firing"}')
    assert [s["metric"]["check"] for s in firing] == ["web"]
    assert coordinator.status("web")["state"] == "global"
    # Down everywhere is not a regional outage.
    assert not prometheus.alerts("VantageCheckDownInRegion", "pending")
    metrics = coordinator.metrics()
    assert (
        'vantage_check_failures_total{check="web",class="connect_refused",region="eu"}' in metrics
    )
    assert_promtool_clean(metrics)


def test_the_dashboard_queries_run_on_prometheus(
    stack: tuple[Coordinator, Proc, Prometheus],
) -> None:
    """Every panel query of the Grafana dashboard, its variables set to this coordinator,
    is accepted by a real Prometheus; the verdict panel reads the coordinator's data."""
    coordinator, _, prometheus = stack
    wait_until(
        lambda: prometheus.query("vantage_results_received_total"), 60, "a scrape with results"
    )
    board = dashboard()
    instance = f"127.0.0.1:{coordinator.http_port}"
    answered = 0
    for _where, expr in queries(board):
        prometheus.query(substituted(expr, instance=instance))  # raises on an error status
        answered += 1
    assert answered > 20
    verdicts = next(p for p in board["panels"] if p["title"] == "Verdict per check")
    (web,) = prometheus.query(
        substituted(verdicts["targets"][0]["expr"], instance=instance, check="web")
    )
    assert web["metric"] == {"check": "web"}
