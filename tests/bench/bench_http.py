#!/usr/bin/env python3
"""HTTP probe throughput: one Vantage agent against prometheus-blackbox-exporter.

Run with the project's interpreter (``make bench`` does)::

    .venv/bin/python tests/bench/bench_http.py [--seconds N] [--quick] [--ramp]

Everything runs on this machine, on loopback, started here and stopped here:

1. **nginx** on a free port answering ``return 200 "ok"`` (access log off). Its
   ``stub_status`` counters say how many connections and requests really reached it,
   which is how every figure below is cross-checked.
2. **blackbox_exporter** (the Debian package) with an ``http_2xx`` module, driven by
   ``wrk`` at several concurrencies against ``/probe?module=http_2xx&target=<nginx>``;
   its best rate is the reference. Each ``/probe`` is one probe on a fresh connection:
   checked here by nginx's ``accepts`` counter growing by one per probe.
3. **Vantage**: a real ``vantage coordinator`` with a generated checks file of many http
   checks against nginx and ONE ``vantage agent`` process, spooling to a temporary
   directory as in production (``--no-spool``: in memory only). After a warm-up, the rate is
   what the coordinator actually ingested (``vantage_results_received_total``) over the
   window; nginx's request counter says how many probes ran. CPU per process comes from
   ``/proc/PID/stat``.

``--ramp`` raises the demand step by step (by adding checks, which the coordinator
pushes to the agent) until the ingested rate stops following it: the ceiling.

The benchmark prints figures; it asserts nothing and exits 0 unless something failed to
start. Every child process is in its own process group and is killed on the way out,
including on Ctrl-C and on errors; temporary files are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
VANTAGE = str(BIN / "vantage")
TOKEN = "bench-token-0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BLACKBOX = shutil.which("prometheus-blackbox-exporter") or "/usr/bin/prometheus-blackbox-exporter"
WRK = shutil.which("wrk") or "/usr/bin/wrk"


# -- processes ---------------------------------------------------------------------------


class Children:
    """Child processes, each in its own session; all killed (group-wide) on close."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=kwargs.pop("stdout", out),
                stderr=out,
                start_new_session=True,
                **kwargs,
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        # Whatever the leader did, nothing of its group survives (nginx workers, ...).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"bench: timed out after {timeout:g}s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 60.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
        return text


# -- CPU accounting from /proc -------------------------------------------------------------


def process_ticks(pid: int) -> int:
    """utime + stime of a whole process (all threads), in clock ticks; 0 once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found.extend(int(child) for child in text)
    return found


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


class CpuMeter:
    """CPU used by named groups of processes between ``start`` and ``stop``, in cores."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self._groups = groups
        self._start: dict[str, dict[int, int]] = {}
        self._machine: tuple[int, int] = (0, 0)
        self._t0 = 0.0

    def _sample(self) -> dict[str, dict[int, int]]:
        return {name: {p: process_ticks(p) for p in pids()} for name, pids in self._groups.items()}

    def start(self) -> None:
        self._start = self._sample()
        self._machine = machine_ticks()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        busy, total = machine_ticks()
        elapsed = time.monotonic() - self._t0
        cores: dict[str, float] = {}
        for name, ticks in end.items():
            before = self._start.get(name, {})
            used = sum(t - before.get(pid, 0) for pid, t in ticks.items())
            cores[name] = used / CLOCK_TICKS / elapsed
        cpus = os.cpu_count() or 1
        machine = (busy - self._machine[0]) / max(1, total - self._machine[1]) * cpus
        # Whatever else ran meanwhile (this script, other users of a shared machine): a
        # large figure here means the run competed for the cores and its rates are low.
        cores["other"] = max(0.0, machine - sum(cores.values()))
        cores["machine"] = machine
        return cores


def format_cpu(cores: dict[str, float]) -> str:
    return ", ".join(f"{name} {value * 100:.0f}%" for name, value in cores.items())


# -- nginx ---------------------------------------------------------------------------------


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    workers: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def pids(self) -> list[int]:
        return [self.proc.pid, *children_of(self.proc.pid)]

    def status(self) -> tuple[int, int]:
        """(accepted connections, requests) so far, from stub_status; each call adds one
        connection and one request of its own, which ``delta`` subtracts."""
        text = http_get(f"http://127.0.0.1:{self.port}/nginx_status")
        accepts, _handled, requests = (int(v) for v in text.splitlines()[2].split())
        return accepts, requests

    @staticmethod
    def delta(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
        return after[0] - before[0] - 1, after[1] - before[1] - 1


def start_nginx(children: Children, workers: str) -> Nginx:
    root = children.dir / f"nginx-{workers}"
    root.mkdir()
    port = free_port()
    # As root, nginx would switch its workers to "nobody"; keep them as whoever runs this.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""\
            {user}
            worker_processes {workers};
            pid {root}/nginx.pid;
            error_log {root}/error.log warn;
            worker_rlimit_nofile 65536;
            events {{ worker_connections 16384; }}
            http {{
                access_log off;
                client_body_temp_path {root}/body;
                proxy_temp_path {root}/proxy;
                fastcgi_temp_path {root}/fastcgi;
                uwsgi_temp_path {root}/uwsgi;
                scgi_temp_path {root}/scgi;
                server {{
                    listen 127.0.0.1:{port} backlog=4096;
                    location = /nginx_status {{ stub_status; }}
                    location / {{ return 200 "ok"; }}
                }}
            }}
            """
        )
    )
    proc = children.spawn(
        f"nginx-{workers}", [NGINX, "-p", str(root), "-c", str(conf), "-g", "daemon off;"]
    )
    wait_for(lambda: port_open(port) or proc.poll() is not None, 10, "nginx")
    if proc.poll() is not None:
        log = (children.dir / f"nginx-{workers}.log").read_text()
        raise SystemExit(f"bench: nginx exited: {log}")
    return Nginx(proc, port, workers)


# -- blackbox_exporter + wrk ------------------------------------------------------------------


@dataclass
class WrkRun:
    concurrency: int
    rate: float
    requests: int
    errors: str
    nginx_accepts: int
    nginx_requests: int
    cpu: dict[str, float]


def blackbox_version() -> str:
    out = subprocess.run([BLACKBOX, "--version"], capture_output=True, text=True).stderr
    out = out or subprocess.run([BLACKBOX, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "?"


def run_blackbox(
    children: Children, nginx: Nginx, concurrencies: Sequence[int], seconds: float
) -> list[WrkRun]:
    port = free_port()
    config = children.dir / "blackbox.yml"
    config.write_text(
        textwrap.dedent(
            """\
            modules:
              http_2xx:
                prober: http
                timeout: 5s
                http:
                  preferred_ip_protocol: ip4
            """
        )
    )
    proc = children.spawn(
        "blackbox",
        [BLACKBOX, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"],
    )
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 15, "blackbox_exporter")
        if proc.poll() is not None:
            log = (children.dir / "blackbox.log").read_text()
            raise SystemExit(f"bench: blackbox exited: {log}")
        probe = f"http://127.0.0.1:{port}/probe?module=http_2xx&target={nginx.url}"
        sample = http_get(probe)
        if not re.search(r"^probe_success 1$", sample, re.M):
            raise SystemExit(f"bench: blackbox probe of nginx failed:\n{sample}")
        runs: list[WrkRun] = []
        meter = CpuMeter({"blackbox": lambda: [proc.pid], "nginx": nginx.pids})
        _wrk(children, probe, 8, 1.0)  # warm-up: Go's heap and pools, nginx's workers
        for concurrency in concurrencies:
            before = nginx.status()
            meter.start()
            output, wrk_cpu = _wrk(children, probe, concurrency, seconds)
            cpu = meter.stop()
            cpu["wrk"] = wrk_cpu
            accepts, requests = Nginx.delta(before, nginx.status())
            rate = float(_find(r"Requests/sec:\s+([\d.]+)", output))
            total = int(_find(r"(\d+) requests in", output))
            errors = "; ".join(
                line.strip()
                for line in output.splitlines()
                if "Socket errors" in line or "Non-2xx" in line
            )
            runs.append(WrkRun(concurrency, rate, total, errors, accepts, requests, cpu))
        return runs
    finally:
        children.stop(proc)


def _wrk(children: Children, url: str, concurrency: int, seconds: float) -> tuple[str, float]:
    """wrk's output and the CPU it used (cores, from the rusage of waited-for children)."""
    out = children.dir / "wrk.out"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with out.open("wb") as stdout:
        proc = children.spawn(
            "wrk",
            [WRK, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "10s", url],
            stdout=stdout,
        )
    proc.wait()
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children.procs.remove(proc)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out.read_text(), used / elapsed


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"bench: no {pattern!r} in wrk's output:\n{text}")
    return match.group(1)


# -- Vantage coordinator + agent ---------------------------------------------------------------


@dataclass
class VantageRun:
    demand: float
    checks: int
    ingested: float
    probes: float  # nginx requests per second: probes that reached the target
    dropped_at_coordinator: int
    agent_drops: int
    cpu: dict[str, float]

    @property
    def achieved(self) -> float:
        """Probes that completed an HTTP exchange with nginx and were ingested: a probe
        that failed before reaching nginx (overload: connect timeouts) is not counted."""
        return min(self.ingested, self.probes)


class Vantage:
    """A coordinator and one agent probing nginx; ``set_demand`` rewrites the checks."""

    def __init__(
        self, children: Children, nginx: Nginx, interval: float, timeout: float, spool: bool
    ) -> None:
        self.children = children
        self.spool = spool
        self.nginx = nginx
        self.interval = interval
        self.timeout = timeout
        self.dir = children.dir / "vantage"
        self.dir.mkdir()
        self.checks = 0
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.http_port = 0
        self.grpc_port = 0

    def write_checks(self, count: int) -> None:
        lines = ["checks:"]
        for index in range(count):
            lines.append(
                f"  - {{name: web-{index:06d}, type: http, target: '{self.nginx.url}', "
                f"interval: {self.interval:g}s, timeout: {self.timeout:g}s}}"
            )
        staged = self.dir / "checks.yaml.new"
        staged.write_text("\n".join(lines) + "\n")
        os.replace(staged, self.dir / "checks.yaml")  # the coordinator never reads half
        self.checks = count

    def start(self, checks: int) -> None:
        self.write_checks(checks)
        (self.dir / "tokens.yaml").write_text(f"tokens:\n  - token: {TOKEN}\n")
        (self.dir / "agent.token").write_text(TOKEN + "\n")
        config = self.dir / "coordinator.yaml"
        # One agent in one region: let it decide verdicts, so `up` shows probes succeed.
        config.write_text(
            "listen: 127.0.0.1:0\n"
            "http_listen: 127.0.0.1:0\n"
            "checks_file: checks.yaml\n"
            "tokens_file: tokens.yaml\n"
            "engine: {min_agents: 1, min_regions: 1}\n"
            # The bench's demand is past the per-agent default (20,000 checks) by design.
            "limits: {max_checks_per_agent: 1000000}\n"
        )
        log = self.children.dir / "coordinator.log"
        self.coordinator = self.children.spawn(
            "coordinator", [VANTAGE, "coordinator", "--config", str(config), "--log-format", "json"]
        )
        event = wait_for(lambda: self._listening(log), 120, "the coordinator to listen")
        self.grpc_port, self.http_port = event["grpc_port"], event["http_port"]
        self.agent = self.children.spawn(
            "agent",
            [
                VANTAGE,
                "agent",
                "--coordinator",
                f"127.0.0.1:{self.grpc_port}",
                "--name",
                "bench-1",
                "--region",
                "bench",
                "--token-file",
                str(self.dir / "agent.token"),
                *(("--spool-dir", str(self.dir / "spool")) if self.spool else ("--no-spool",)),
                "--log-format",
                "json",
            ],
        )
        wait_for(lambda: self.received() > 0, 120, "the first results at the coordinator")

    def _listening(self, log: Path) -> dict[str, Any] | None:
        assert self.coordinator is not None
        if self.coordinator.poll() is not None:
            raise SystemExit(f"bench: coordinator exited: {log.read_text()[-2000:]}")
        for event in _events(log):
            if event.get("event") == "coordinator listening":
                return event
        return None

    def metrics(self, *names: str) -> dict[str, float]:
        query = "&".join(f"name[]={name}" for name in names)
        text = http_get(f"http://127.0.0.1:{self.http_port}/metrics?{query}")
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
        return values

    def received(self) -> float:
        values = self.metrics("vantage_results_received_total")
        return sum(v for k, v in values.items() if k.startswith("vantage_results_received_total"))

    def dropped(self) -> float:
        values = self.metrics("vantage_results_dropped_total")
        return sum(v for k, v in values.items() if k.startswith("vantage_results_dropped_total"))

    def agent_drops(self) -> int:
        """The agent's own drop count, as its last drop-related log line says."""
        totals = (event.get("dropped_total") for event in _events(self.children.dir / "agent.log"))
        return max((int(total) for total in totals if total is not None), default=0)

    def verdicts(self) -> dict[str, int]:
        """Verdict states, and failure classes of the non-up ones, as ``vantage status``
        tells them (one agent decides: min_agents 1)."""
        out = subprocess.run(
            [
                VANTAGE,
                "status",
                "--json",
                "--coordinator",
                f"127.0.0.1:{self.grpc_port}",
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        counts: dict[str, int] = {}
        for verdict in json.loads(out.stdout)["verdicts"]:
            key = verdict["state"]
            if verdict.get("failure"):
                key = f"{key} ({verdict['failure']})"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def measure(self, seconds: float) -> VantageRun:
        assert self.agent is not None
        assert self.coordinator is not None
        agent, coordinator = self.agent, self.coordinator
        meter = CpuMeter(
            {
                "agent": lambda: [agent.pid],
                "coordinator": lambda: [coordinator.pid],
                "nginx": self.nginx.pids,
            }
        )
        drops_before = self.agent_drops()
        received, dropped, nginx_before = self.received(), self.dropped(), self.nginx.status()
        meter.start()
        started = time.monotonic()
        time.sleep(seconds)
        received_after, dropped_after = self.received(), self.dropped()
        nginx_after = self.nginx.status()
        elapsed = time.monotonic() - started
        cpu = meter.stop()
        _accepts, requests = Nginx.delta(nginx_before, nginx_after)
        drops_after = self.agent_drops()
        return VantageRun(
            demand=self.checks / self.interval,
            checks=self.checks,
            ingested=(received_after - received) / elapsed,
            probes=requests / elapsed,
            dropped_at_coordinator=int(dropped_after - dropped),
            agent_drops=drops_after - drops_before,
            cpu=cpu,
        )

    def alive(self) -> None:
        for name, proc in (("coordinator", self.coordinator), ("agent", self.agent)):
            if proc is not None and proc.poll() is not None:
                log = (self.children.dir / f"{name}.log").read_text()[-3000:]
                raise SystemExit(f"bench: {name} exited {proc.returncode}:\n{log}")


def _events(log: Path) -> Iterator[dict[str, Any]]:
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event


# -- report ---------------------------------------------------------------------------------


def machine_facts() -> list[tuple[str, str]]:
    import grpc
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    import vantage

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    wrk = subprocess.run([WRK, "--version"], capture_output=True, text=True).stdout
    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    return [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cpu", f"{os.cpu_count()} cores, {model}"),
        ("memory", f"{int(mem) // 1024} MiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("os", platform.freedesktop_os_release().get("PRETTY_NAME", "?")),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("vantage", vantage.__version__),
        ("uvloop", importlib.metadata.version("uvloop")),
        ("grpcio", grpc.__version__),
        ("protobuf", f"{protobuf_version} ({api_implementation.Type()})"),
        ("nginx", nginx.removeprefix("nginx version: ")),
        ("blackbox_exporter", blackbox_version()),
        ("wrk", wrk.split(" [")[0].removeprefix("wrk ") if wrk else "?"),
    ]


def vantage_line(run: VantageRun) -> str:
    drops = run.agent_drops + run.dropped_at_coordinator
    per_probe = run.cpu["agent"] / max(1.0, run.probes) * 1e6
    per_result = run.cpu["coordinator"] / max(1.0, run.ingested) * 1e6
    return (
        f"  demand {run.demand:8,.0f}/s ({run.checks:,} checks)  ingested {run.ingested:8,.0f}/s"
        f"  probes at nginx {run.probes:8,.0f}/s  dropped {drops:,}\n"
        f"      cpu: {format_cpu(run.cpu)}\n"
        f"      cpu time: agent {per_probe:.0f} us per probe, "
        f"coordinator {per_result:.0f} us per result"
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement window")
    parser.add_argument("--quick", action="store_true", help="short windows, fewer steps")
    parser.add_argument("--ramp", action="store_true", help="raise demand to find the ceiling")
    parser.add_argument("--checks", type=int, default=24_000, help="http checks (default 24000)")
    parser.add_argument("--interval", type=float, default=2.0, help="check interval, seconds")
    parser.add_argument(
        "--nginx-workers", default="auto", help="nginx worker_processes: auto (default) or N"
    )
    parser.add_argument(
        "--concurrency", default="8,32,128", help="wrk connections to blackbox, comma-separated"
    )
    parser.add_argument("--no-blackbox", action="store_true", help="measure the agent only")
    parser.add_argument(
        "--no-spool", action="store_true", help="the agent keeps results in memory only"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    seconds = min(args.seconds, 5.0) if args.quick else args.seconds
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        concurrencies = concurrencies[-2:]

    for tool in (NGINX, WRK, BLACKBOX):
        if not Path(tool).exists() and not args.no_blackbox:
            raise SystemExit(f"bench: {tool} is missing; `make bench-deps` installs it")

    # SIGTERM unwinds like Ctrl-C, so the finally below always stops every child.
    signal.signal(signal.SIGTERM, _interrupt)
    directory = Path(tempfile.mkdtemp(prefix="vantage-bench-"))
    children = Children(directory)
    try:
        print("Vantage HTTP probe benchmark")
        for key, value in machine_facts():
            print(f"  {key:18} {value}")
        nginx = start_nginx(children, args.nginx_workers)
        print(
            f"  target             nginx on 127.0.0.1:{nginx.port}, worker_processes "
            f'{args.nginx_workers}, `return 200 "ok"`, access_log off; fresh connection per probe'
        )

        best: WrkRun | None = None
        if not args.no_blackbox:
            print(f"\nblackbox_exporter http_2xx via wrk -t1, {seconds:g}s per concurrency")
            for wrk_run in run_blackbox(children, nginx, concurrencies, seconds):
                fresh = wrk_run.nginx_accepts / max(1, wrk_run.nginx_requests)
                print(
                    f"  c={wrk_run.concurrency:<4} {wrk_run.rate:8,.0f} probes/s"
                    f"  (nginx: {wrk_run.nginx_requests:,} requests on {wrk_run.nginx_accepts:,} "
                    f"connections = {fresh:.2f} per request; wrk {wrk_run.requests:,})"
                    f"{'  ' + wrk_run.errors if wrk_run.errors else ''}\n"
                    f"      cpu: {format_cpu(wrk_run.cpu)}"
                )
                if best is None or wrk_run.rate > best.rate:
                    best = wrk_run
            assert best is not None
            print(f"  best: {best.rate:,.0f} probes/s at c={best.concurrency}")

        timeout = min(1.0, args.interval / 2)
        vantage_ = Vantage(children, nginx, args.interval, timeout, spool=not args.no_spool)
        warmup = max(5.0, 2 * args.interval + 2)
        demands = [args.checks]
        if args.ramp:
            step = max(2_000, args.checks // 6)
            start = max(step, args.checks // 2)
            limit = 3 if args.quick else 12
            demands = [start + i * step for i in range(limit)]
        print(
            f"\nvantage: 1 coordinator + 1 agent (uvloop, "
            f"{'results in memory' if args.no_spool else 'spool in a temporary directory'}), "
            f"http checks every {args.interval:g}s "
            f"(timeout {timeout:g}s), warm-up {warmup:g}s, window {seconds:g}s"
        )
        vantage_.start(demands[0])
        time.sleep(warmup)
        results: list[VantageRun] = []
        for index, checks in enumerate(demands):
            if index:
                vantage_.write_checks(checks)
                # The coordinator polls its checks file every 2 s; then one interval of
                # jittered first runs, and the steady state.
                time.sleep(2.5 + warmup)
            vantage_.alive()
            run = vantage_.measure(seconds)
            results.append(run)
            print(vantage_line(run))
            if args.ramp and run.achieved < 0.95 * run.demand:
                break
        vantage_.alive()
        verdicts = vantage_.verdicts()
        states = ", ".join(f"{state} {count:,}" for state, count in sorted(verdicts.items()))
        print(f"  verdicts after the run: {states}")

        top = max(results, key=lambda r: r.achieved)
        print("\nsummary")
        if args.ramp:
            following = [r for r in results if r.achieved >= 0.95 * r.demand]
            ceiling = max((r.achieved for r in following), default=0.0)
            print(f"  ceiling (achieved within 5% of demand): {ceiling:,.0f} probes/s")
            print(
                f"  highest achieved rate: {top.achieved:,.0f} probes/s "
                f"at demand {top.demand:,.0f}/s"
            )
        else:
            print(
                f"  vantage agent: {top.achieved:,.0f} probes/s done and ingested "
                f"(demand {top.demand:,.0f}/s)"
            )
        if best is not None:
            print(f"  blackbox_exporter best: {best.rate:,.0f} probes/s (c={best.concurrency})")
            print(f"  ratio vantage / blackbox: {top.achieved / best.rate:.2f}x")
        if args.keep:
            print(f"\nlogs kept in {directory}")
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        children.close()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
