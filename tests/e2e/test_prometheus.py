"""A real Prometheus server scrapes a real coordinator and evaluates the shipped alert
rules: when the target goes down for everyone, VantageCheckDownGlobally fires.

Real processes throughout: nginx serves the target, three `vantage agent` processes in
three regions probe it, `vantage coordinator` judges, and Prometheus (the Debian package)
scrapes the coordinator every second with deploy/prometheus/rules.yml loaded as shipped.
The test stops nginx and asks Prometheus' own HTTP API which alerts fire. The dashboard's
queries then run on the same Prometheus.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from grafana_dashboard import dashboard, queries, substituted
from prometheus_server import Prometheus, answers, binary, prometheus
from running_system import Coordinator, Proc, System, free_port, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
REGIONS = ("ap", "eu", "us")


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
    wait_until(lambda: answers(f"http://127.0.0.1:{port}/"), 10, "nginx to answer")
    return proc


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

    # The test's own scrape config (short intervals); the rules file is the shipped one.
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "vantage",
                "static_configs": [{"targets": [f"127.0.0.1:{coordinator.http_port}"]}],
            }
        ],
    }
    try:
        with prometheus(system, config) as server:
            yield coordinator, nginx, server
    finally:
        for process in reversed(system.procs):
            process.stop()


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
