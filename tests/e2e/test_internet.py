"""A coordinator as it runs on the internet: TLS on both ports, a hashed token per agent
bound to its name and region, query tokens, limits. Real processes (`vantage
coordinator`, `vantage agent`, `vantage token`, the CLI, grpcurl, curl), real sockets and
real TLS with a CA the test makes (tests/pki.py).

Every refusal is checked three ways: the one line its caller reads, the counter that
moved (``vantage_requests_refused_total``), and that no agent, verdict or history entry
was created or changed by it.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from pki import Issued, TestCA
from prometheus_server import prometheus
from running_system import VANTAGE, Coordinator, Proc, System, free_port, grpcurl, wait_until

from vantage_proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

pytestmark = pytest.mark.e2e

SERVICE = "vantage.v1.QueryService"
REFUSED = "vantage_requests_refused_total"
PROMETHEUS_YML = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"


@dataclass
class Site:
    """A coordinator's directory: its CA, its certificate and its tokens file."""

    system: System
    ca: TestCA
    server: Issued

    @property
    def tokens_file(self) -> Path:
        return self.system.dir / "tokens.yaml"

    def token(self, name: str, scope: str = "agent", region: str | None = None) -> Path:
        """`vantage token create`; returns the file the new token was saved in."""
        args = ["--name", name, "--scope", scope, "--tokens-file", str(self.tokens_file)]
        done = run_vantage("token", "create", *args, *(["--region", region] if region else []))
        assert done.returncode == 0, done
        token = done.stdout.strip()
        assert token.startswith("vt1_")
        assert token not in self.tokens_file.read_text()  # only its hash is kept
        path = self.system.dir / f"{name}.token"
        path.write_text(token + "\n")
        return path

    def config(self, checks: str, extra: str = "", *, listen: str = "127.0.0.1") -> Path:
        (self.system.dir / "checks.yaml").write_text(checks)
        config = self.system.dir / "coordinator.yaml"
        config.write_text(
            f"listen: {listen}:0\n"
            f"http_listen: {listen}:0\n"
            "checks_file: checks.yaml\n"
            "tokens_file: tokens.yaml\n"
            "heartbeat_interval: 1s\n"
            "engine: {min_agents: 2, min_regions: 2}\n"
            f"tls: {{cert_file: {self.server.chain}, key_file: {self.server.key}"
            f"{extra}}}\n"
        )
        return config

    def start(self, config: Path, reader: Path) -> Coordinator:
        """The coordinator on ``config``, its clients trusting the CA and reading with
        the token in ``reader``."""
        started = self.system.coordinator(config)
        return replace(
            started,
            client_flags=("--ca-file", str(self.ca.cert_file), "--token-file", str(reader)),
            ca_file=self.ca.cert_file,
            token=reader.read_text().strip(),
        )

    def serving(self, reader: str, limits: str = "") -> tuple[Coordinator, dict[str, Proc]]:
        """A coordinator judging ``web_checks`` (with ``limits``, a config line), a token
        for ``reader`` (scope query), and agents eu-1 and us-1 connected with their own
        tokens, the verdicts settled."""
        port = free_port()
        self.system.http_server(port)
        config = self.config(web_checks(port))
        config.write_text(config.read_text() + limits)
        # Every token before the coordinator starts: one made later counts only once the
        # coordinator has noticed the file change, and an agent refused gives up.
        regions = {"eu-1": "eu", "us-1": "us"}
        tokens = {name: self.token(name, region=region) for name, region in regions.items()}
        coordinator = self.start(config, self.token(reader, "query"))
        started = {
            name: self.agent(coordinator, name, region, "--token-file", str(tokens[name]))
            for name, region in regions.items()
        }
        settled(coordinator, set(started))
        return coordinator, started

    def agent(self, coordinator: Coordinator, name: str, region: str, *flags: str) -> Proc:
        """`vantage agent` over TLS; ``flags`` say how it proves who it is."""
        return self.system.spawn(
            f"agent-{name}-{secrets.token_hex(2)}",
            VANTAGE,
            "agent",
            "--coordinator",
            coordinator.address,
            "--ca-file",
            str(self.ca.cert_file),
            "--name",
            name,
            "--region",
            region,
            "--log-level",
            "debug",
            *flags,
        )


@pytest.fixture
def site(system: System) -> Site:
    ca = TestCA(system.dir / "pki", "vantage e2e CA")
    server = ca.issue("coordinator", hosts=("127.0.0.1", "localhost"), stem="coordinator")
    return Site(system, ca, server)


def run_vantage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VANTAGE, *args], capture_output=True, text=True, timeout=60, env=env)


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused `vantage` command printed (exit 2, nothing on stdout)."""
    assert done.returncode == 2, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30
    )


def web_checks(port: int) -> str:
    return (
        "checks:\n"
        f"  - {{name: web, type: http, target: 'http://127.0.0.1:{port}/', "
        "interval: 1s, timeout: 500ms}\n"
        f"  - {{name: closed-port, type: tcp, target: '127.0.0.1:{free_port()}', "
        "interval: 1s, timeout: 500ms}\n"
    )


def states(coordinator: Coordinator) -> dict[str, str]:
    verdicts = json.loads(coordinator.cli("status", "--json").stdout)["verdicts"]
    return {verdict["check"]: verdict["state"] for verdict in verdicts}


def agents(coordinator: Coordinator) -> dict[str, dict[str, Any]]:
    listed = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
    return {agent["name"]: agent for agent in listed}


def settled(coordinator: Coordinator, names: set[str]) -> None:
    """Wait for ``names`` to be connected and both checks to have their verdicts."""

    seen: dict[str, Any] = {}

    def done() -> bool:
        seen["connected"] = {
            name for name, agent in agents(coordinator).items() if agent["connected"]
        }
        seen["states"] = states(coordinator)
        return seen == {"connected": names, "states": {"web": "up", "closed-port": "global"}}

    try:
        wait_until(done, 30, f"{sorted(names)} to connect and the verdicts to settle")
    except pytest.fail.Exception:
        pytest.fail(f"{sorted(names)} did not connect and settle within 30s; last seen: {seen}")


def history(coordinator: Coordinator) -> dict[str, Any]:
    """Every check's kept transitions, through the JSON API."""
    assert coordinator.ca_file is not None
    kept = {}
    for check in ("web", "closed-port"):
        fetched = curl(
            "--cacert",
            str(coordinator.ca_file),
            "-H",
            f"Authorization: Bearer {coordinator.token}",
            f"{coordinator.http_url}/api/v1/verdicts/{check}/history",
        )
        assert fetched.returncode == 0, fetched
        kept[check] = json.loads(fetched.stdout)
    return kept


def exited(proc: Proc, within: float = 20) -> str:
    """Wait for ``proc`` to exit 1; its last stderr line."""
    wait_until(lambda: proc.popen.poll() is not None, within, f"{proc.args[0]} to exit")
    assert proc.popen.returncode == 1, proc.stderr()
    return proc.stderr().strip().splitlines()[-1]


# -- TLS and mTLS ---------------------------------------------------------------------------


def test_agents_and_every_client_over_tls_with_the_test_ca(site: Site) -> None:
    coordinator, _ = site.serving("grafana")
    bearer = f"Bearer {coordinator.token}"

    # grpcurl, verifying the server against the test CA, with the query token.
    tls = ("-cacert", str(site.ca.cert_file))
    called = grpcurl(
        "-H",
        f"authorization: {bearer}",
        "-d",
        '{"check": "web"}',
        coordinator.address,
        f"{SERVICE}/GetVerdict",
        tls=tls,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["state"] == "VERDICT_STATE_UP"
    called = grpcurl("-d", "{}", coordinator.address, f"{SERVICE}/ListVerdicts", tls=tls)
    assert called.returncode != 0
    assert "Code: Unauthenticated" in called.stderr
    assert "missing bearer token (authorization: Bearer TOKEN)" in called.stderr

    # curl over HTTPS: the JSON API and /metrics with the token, 401 without.
    url = coordinator.http_url
    fetched = curl(
        "--cacert",
        str(site.ca.cert_file),
        "-H",
        f"Authorization: {bearer}",
        f"{url}/api/v1/verdicts/web",
    )
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["state"] == "up"
    fetched = curl("--cacert", str(site.ca.cert_file), "-i", f"{url}/api/v1/verdicts")
    assert fetched.stdout.startswith("HTTP/1.1 401"), fetched.stdout
    assert 'WWW-Authenticate: Bearer realm="vantage"' in fetched.stdout
    assert coordinator.metric("vantage_agent_streams_open") == 2

    # Plaintext to the TLS ports: refused, clearly for our own client, and no crash.
    plain = run_vantage("status", "--coordinator", coordinator.address, "--plaintext")
    assert error_line(plain) == (
        f"vantage status: error: cannot reach the coordinator at {coordinator.address}: the "
        "coordinator closed the connection: it may serve TLS only (--tls, --ca-file)"
    )
    unverified = run_vantage("status", "--coordinator", coordinator.address, "--tls")
    assert "certificate" in error_line(unverified)
    assert curl(f"http://127.0.0.1:{coordinator.http_port}/healthz").returncode != 0
    assert coordinator.proc.popen.poll() is None
    assert states(coordinator) == {"web": "up", "closed-port": "global"}


def shipped_scrape_job(target: str, ca_file: Path, token_file: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml's vantage job with its commented internet block
    (https, the CA, the token file) switched on, as the README tells operators to."""
    lines = PROMETHEUS_YML.read_text().splitlines()
    start = lines.index("    # scheme: https")
    switched = [line.replace("    # ", "    ", 1) for line in lines[start:]]
    config = yaml.safe_load("\n".join(lines[:start] + switched))
    (job,) = config["scrape_configs"]
    assert job["scheme"] == "https"
    job["static_configs"] = [{"targets": [target]}]
    job["tls_config"]["ca_file"] = str(ca_file)
    job["authorization"]["credentials_file"] = str(token_file)
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    return job


def test_prometheus_scrapes_over_tls_with_a_query_token(site: Site) -> None:
    coordinator, _ = site.serving("prometheus")
    scraper = site.system.dir / "prometheus.token"

    target = f"127.0.0.1:{coordinator.http_port}"
    job = shipped_scrape_job(target, site.ca.cert_file, scraper)
    tokenless = {**job, "job_name": "tokenless"}
    del tokenless["authorization"]
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [job, tokenless]}
    with prometheus(site.system, config) as server:

        def scraped() -> bool:
            return {t["labels"]["job"]: t["health"] for t in server.targets()} == {
                "vantage": "up",
                "tokenless": "down",
            } and bool(server.query('vantage_check_verdict{job="vantage",check="web"}'))

        wait_until(scraped, 30, "Prometheus to scrape the coordinator over TLS")
        (web,) = server.query('vantage_check_verdict{job="vantage",check="web",state="up"}')
        assert web["value"][1] == "1"
        (refused,) = [t for t in server.targets() if t["labels"]["job"] == "tokenless"]
        assert "401" in refused["lastError"], refused
    assert coordinator.metric(REFUSED, endpoint="http", reason="unauthenticated") > 0


def test_agents_over_mutual_tls_their_certificates_standing_for_tokens(site: Site) -> None:
    port = free_port()
    site.system.http_server(port)
    for name, region in (("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap")):
        site.token(name, region=region)  # the entries the certificates stand for
    reader = site.token("ops", "query")
    client_ca = f", client_ca_file: {site.ca.cert_file}"
    coordinator = site.start(site.config(web_checks(port), client_ca), reader)
    ops = site.ca.issue("ops", client=True)
    coordinator = replace(
        coordinator,
        client_flags=(
            "--ca-file",
            str(site.ca.cert_file),
            "--cert-file",
            str(ops.chain),
            "--key-file",
            str(ops.key),
        ),
    )
    for name, region in (("eu-1", "eu"), ("us-1", "us")):
        issued = site.ca.issue(name, client=True)
        site.agent(
            coordinator,
            name,
            region,
            "--cert-file",
            str(issued.chain),
            "--key-file",
            str(issued.key),
        )
    settled(coordinator, {"eu-1", "us-1"})
    before = history(coordinator)

    # ap-1's certificate, claiming region eu: refused before any state, on both sides.
    ap = site.ca.issue("ap-1", client=True)
    impostor = site.agent(
        coordinator, "ap-1", "eu", "--cert-file", str(ap.chain), "--key-file", str(ap.key)
    )
    assert exited(impostor) == (
        "vantage agent: error: coordinator refused this agent (PERMISSION_DENIED): token 'ap-1' is "
        "bound to region ap, not eu"
    )
    assert coordinator.metric(REFUSED, endpoint="agent", reason="permission_denied") == 1
    refusals = [e for e in coordinator.proc.log_events() if e.get("event") == "agent refused"]
    assert [(e["token"], e["agent"], e["region"]) for e in refusals] == [("ap-1", "ap-1", "eu")]
    assert set(agents(coordinator)) == {"eu-1", "us-1"}
    assert history(coordinator) == before

    # A client without a certificate does not get past the handshake.
    anonymous = run_vantage(
        "status",
        "--coordinator",
        coordinator.address,
        "--ca-file",
        str(site.ca.cert_file),
        "--token-file",
        str(reader),
    )
    assert error_line(anonymous).endswith(
        "the coordinator closed the connection during the TLS handshake: it may require a "
        "client certificate (--cert-file, --key-file)"
    )


# -- tokens -------------------------------------------------------------------------------


def test_refused_tokens_are_one_line_counted_and_change_nothing(site: Site) -> None:
    coordinator, _ = site.serving("grafana")
    fleet, before = agents(coordinator), history(coordinator)
    eu = site.system.dir / "eu-1.token"

    wrong = site.system.dir / "wrong.token"
    wrong.write_text("vt1_" + secrets.token_urlsafe(24) + "\n")
    elsewhere = site.system.dir / "impostor-spool"
    refused = {
        "wrong token": site.agent(coordinator, "eu-2", "eu", "--token-file", str(wrong)),
        "another name": site.agent(coordinator, "eu-9", "eu", "--token-file", str(eu)),
        # An impostor elsewhere: its own machine, so its own spool.
        "another region": site.agent(
            coordinator, "eu-1", "us", "--token-file", str(eu), "--spool-dir", str(elsewhere)
        ),
    }
    lines = {why: exited(proc) for why, proc in refused.items()}
    denied = "vantage agent: error: coordinator refused this agent (PERMISSION_DENIED):"
    assert lines == {
        "wrong token": "vantage agent: error: coordinator refused the token (UNAUTHENTICATED): "
        "unknown or revoked token",
        "another name": f"{denied} token 'eu-1' is bound to agent eu-1, not eu-9",
        "another region": f"{denied} token 'eu-1' is bound to region eu, not us",
    }
    assert coordinator.metric(REFUSED, endpoint="agent", reason="unauthenticated") == 1
    assert coordinator.metric(REFUSED, endpoint="agent", reason="permission_denied") == 2

    # Queries: a malformed token, an agent's token, a query token asking for CheckNow.
    target = "http://127.0.0.1/"  # refused before anything is probed
    env = {"VANTAGE_TOKEN": "not a token \x7f"}
    malformed = run_vantage(
        "status", "--coordinator", coordinator.address, "--ca-file", str(site.ca.cert_file), env=env
    )
    assert error_line(malformed) == (
        "vantage status: error: $VANTAGE_TOKEN: not a token (a token is printable ASCII "
        "without spaces, at most 512 characters)"
    )
    basic = grpcurl(
        "-H", "authorization: Basic Z3JhZmFuYTpzZWNyZXQ=", "-d", "{}", coordinator.address,
        f"{SERVICE}/ListVerdicts", tls=("-cacert", str(site.ca.cert_file)),
    )  # fmt: skip
    assert "Message: malformed authorization: expected 'Bearer TOKEN'" in basic.stderr, basic
    oversize = curl(
        "--cacert", str(site.ca.cert_file), "-H", f"Authorization: Bearer {'x' * 600}",
        f"{coordinator.http_url}/api/v1/verdicts",
    )  # fmt: skip
    assert json.loads(oversize.stdout)["error"] == {
        "code": "unauthenticated",
        "message": "malformed authorization: expected 'Bearer TOKEN'",
    }
    assert coordinator.metric(REFUSED, endpoint="http", reason="unauthenticated") == 1
    with_agent_token = run_vantage(
        "status",
        "--coordinator",
        coordinator.address,
        "--ca-file",
        str(site.ca.cert_file),
        "--token-file",
        str(eu),
    )
    assert error_line(with_agent_token) == (
        "vantage status: error: refused by the coordinator (permission denied): token "
        "'eu-1' is an agent token: it cannot call ListVerdicts"
    )
    check_now = run_vantage("check", target, *coordinator.connect)
    assert error_line(check_now) == (
        "vantage check: error: refused by the coordinator (permission denied): token "
        "'grafana' has scope query; CheckNow needs checknow"
    )
    assert coordinator.metric(REFUSED, endpoint="query", reason="unauthenticated") == 1
    assert coordinator.metric(REFUSED, endpoint="query", reason="permission_denied") == 2

    # Revoked (another query token stays): the next call is refused as an unknown token.
    reader_2 = site.token("grafana-2", "query")
    revoked = run_vantage("token", "revoke", "grafana", "--tokens-file", str(site.tokens_file))
    assert revoked.returncode == 0, revoked
    wait_until(
        lambda: run_vantage("status", *coordinator.connect).returncode == 2,
        10,
        "the revoked token to be refused",
    )
    assert error_line(run_vantage("status", *coordinator.connect)) == (
        "vantage status: error: refused by the coordinator (unauthenticated): unknown or "
        "revoked token"
    )

    # Nothing any of them did shows: the same agents, the same history.
    coordinator = replace(
        coordinator,
        client_flags=("--ca-file", str(site.ca.cert_file), "--token-file", str(reader_2)),
        token=reader_2.read_text().strip(),
    )
    assert set(agents(coordinator)) == set(fleet) == {"eu-1", "us-1"}
    assert all(
        agent["region"] == fleet[name]["region"] for name, agent in agents(coordinator).items()
    )
    assert history(coordinator) == before


def test_revoking_an_agents_token_ends_its_live_stream(site: Site) -> None:
    coordinator, started = site.serving("grafana")
    eu_agent = started["eu-1"]

    revoked = run_vantage("token", "revoke", "eu-1", "--tokens-file", str(site.tokens_file))
    assert revoked.returncode == 0, revoked
    assert exited(eu_agent) == (
        "vantage agent: error: coordinator refused the token (UNAUTHENTICATED): token 'eu-1' was "
        "revoked or changed"
    )
    wait_until(lambda: not agents(coordinator)["eu-1"]["connected"], 10, "eu-1 to be gone")
    assert agents(coordinator)["us-1"]["connected"]


def test_beyond_loopback_it_starts_only_safe_or_when_told(site: Site) -> None:
    checks = "checks: []\n"
    site.token("eu-1", region="eu")

    def start(config: Path) -> subprocess.CompletedProcess[str]:
        return run_vantage("coordinator", "--config", str(config))

    # TLS, but no query token: nobody could read it safely; refused before listening.
    refused = start(site.config(checks, listen="0.0.0.0"))
    assert refused.returncode == 2, refused
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "is beyond loopback and the tokens file has no query token: create one (vantage "
            "token create --name NAME --scope query), or set `query_auth: none` to let anyone "
            "who reaches the port query"
        )
    ), refused.stderr
    # No TLS beyond loopback: refused unless `tls: off`.
    config = site.system.dir / "plain.yaml"
    config.write_text(
        "listen: 0.0.0.0:0\nhttp_listen: 0.0.0.0:0\ntokens_file: tokens.yaml\nquery_auth: none\n"
    )
    refused = start(config)
    assert refused.returncode == 2, refused
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "is beyond loopback without TLS: set tls.cert_file and tls.key_file (or `tls: off` "
            "to serve plaintext there on purpose)"
        )
    ), refused.stderr

    # With a query token it starts, and a call without any token is refused.
    reader = site.token("grafana", "query")
    coordinator = site.start(site.config(checks, listen="0.0.0.0"), reader)
    bare = run_vantage(
        "status", "--coordinator", coordinator.address, "--ca-file", str(site.ca.cert_file)
    )
    assert error_line(bare) == (
        "vantage status: error: refused by the coordinator (unauthenticated): missing bearer "
        "token (authorization: Bearer TOKEN)"
    )
    assert coordinator.metric(REFUSED, endpoint="query", reason="unauthenticated") == 1


# -- hostile clients ----------------------------------------------------------------------


def _closed_by_server(sock: socket.socket | ssl.SSLSocket, within: float = 30) -> bool:
    """Read until the server closes the connection (True) or ``within`` passes."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


def test_garbage_half_open_handshakes_oversize_and_slow_loris_on_both_ports(site: Site) -> None:
    runner = site.token("runner", "checknow").read_text().strip()
    limits = (
        "limits: {handshake_timeout: 2s, http_idle_timeout: 2s, max_body_bytes: 4KiB, "
        "max_message_bytes: 64KiB}\n"
    )
    coordinator, _ = site.serving("grafana", limits)
    ports = {"grpc": coordinator.grpc_port, "http": coordinator.http_port}
    context = ssl.create_default_context(cafile=site.ca.cert_file)

    for kind, number in ports.items():
        # Garbage where a TLS handshake should be: the connection is closed.
        with socket.create_connection(("127.0.0.1", number)) as raw:
            raw.sendall(secrets.token_bytes(4096))
            assert _closed_by_server(raw), f"{kind}: garbage kept the connection open"
        # Half a ClientHello, then nothing: closed at the handshake deadline.
        with socket.create_connection(("127.0.0.1", number)) as raw:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            assert _closed_by_server(raw), f"{kind}: a half-open handshake was kept"
        # Meanwhile the port serves everyone else.
        assert states(coordinator) == {"web": "up", "closed-port": "global"}

    # Slow loris on HTTPS: a request head that never ends gets 408 and is closed.
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", ports["http"])), server_hostname="127.0.0.1"
    ) as slow:
        slow.sendall(b"GET /api/v1/verdicts HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(30)
        answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
    assert coordinator.metric(REFUSED, endpoint="http", reason="timeout") >= 1

    # Oversize: an HTTP body over max_body_bytes, a gRPC message over max_message_bytes.
    body = site.system.dir / "big.json"
    body.write_text(json.dumps({"target": "x" * 8192}))
    posted = curl(
        "--cacert", str(site.ca.cert_file), "-H", f"Authorization: Bearer {runner}",
        "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
        "-o", "/dev/null", "-w", "%{http_code}", f"{coordinator.http_url}/api/v1/checknow",
    )  # fmt: skip
    assert posted.stdout == "413", posted
    # Over ours, it is refused unparsed and counted; far over, gRPC itself refuses it.
    credentials = grpc.ssl_channel_credentials(site.ca.cert_file.read_bytes())
    bearer = [("authorization", f"Bearer {coordinator.token}")]
    with grpc.secure_channel(coordinator.address, credentials) as channel:
        get = channel.unary_unary(f"/{SERVICE}/GetVerdict")
        for size in (256 << 10, 4 << 20):
            with pytest.raises(grpc.RpcError) as caught:
                get(b"\x0a" + b"x" * size, timeout=20, metadata=bearer)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert coordinator.metric(REFUSED, endpoint="query", reason="too_large") == 1
    assert coordinator.metric(REFUSED, endpoint="http", reason="too_large") == 1

    # Nobody else noticed.
    assert coordinator.proc.popen.poll() is None
    assert {name for name, a in agents(coordinator).items() if a["connected"]} == {"eu-1", "us-1"}
    assert states(coordinator) == {"web": "up", "closed-port": "global"}


def _flood(address: str, ca: Path, token: str, stop: threading.Event, sent: list[int]) -> None:
    """An agent (ap-1) that sends result batches as fast as its link lets it."""

    def messages() -> Iterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(
                name="ap-1",
                region="ap",
                version="flood",
                capabilities=["http", "tcp"],
                instance_id="flood",
            )
        )
        seq = 0
        while not stop.is_set():
            batch = []
            for _ in range(100):
                seq += 1
                batch.append(
                    agent_pb2.ProbeResult(
                        check="web",
                        seq=seq,
                        started_unix_us=int(time.time() * 1e6),
                        duration_us=1000,
                        success=True,
                        failure=common_pb2.FAILURE_CLASS_UNSPECIFIED,
                    )
                )
            sent[0] = seq
            yield agent_pb2.AgentMessage(results=agent_pb2.ResultBatch(results=batch))

    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        stream = agent_pb2_grpc.AgentServiceStub(channel).Connect(
            messages(), metadata=[("authorization", f"Bearer {token}")]
        )
        try:
            for _ in stream:
                if stop.is_set():
                    stream.cancel()
        except grpc.RpcError:
            pass


def test_a_flooding_agent_is_paced_while_two_others_stay_correct(site: Site) -> None:
    ap = site.token("ap-1", region="ap")
    limits = "limits: {agent_result_rate: 50/s, agent_result_burst: 100}\n"
    coordinator, _ = site.serving("grafana", limits)

    stop, sent = threading.Event(), [0]
    flood = threading.Thread(
        target=_flood,
        args=(coordinator.address, site.ca.cert_file, ap.read_text().strip(), stop, sent),
    )
    flood.start()
    try:
        wait_until(
            lambda: coordinator.metric(REFUSED, endpoint="agent", reason="throttled") > 0,
            20,
            "the flood to be paced",
        )
        # While it floods, the honest agents' results keep arriving and the verdicts hold.
        seen = {name: agents(coordinator)[name]["results_received"] for name in ("eu-1", "us-1")}
        wait_until(
            lambda: all(
                agents(coordinator)[name]["results_received"] >= seen[name] + 4 for name in seen
            ),
            20,
            "eu-1 and us-1 to go on being heard",
        )
        assert states(coordinator) == {"web": "up", "closed-port": "global"}
    finally:
        stop.set()
        flood.join(30)
    # Paced, not cut off: what it sent is taken in at its rate.
    assert 0 < agents(coordinator)["ap-1"]["results_received"] <= sent[0]
