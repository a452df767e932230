"""``make bench-scale``: one coordinator under the load ARCHITECTURE sizes it for.

A separate load-generator process (``bench_scale.py loadgen``) speaks the real agent
protocol over real gRPC streams as ``--agents`` agents (100) in ``--regions`` regions (5),
each assigned every one of ``--checks`` checks (10,000), at the check interval that makes
the offered load ``--rate`` results a second (100,000: a 10 s interval), against a real
coordinator process (``vantage coordinator``, with a store file, as in production).
While that load runs, this process measures:

- results/s ingested (``vantage_results_received_total`` over the window) against the
  rate offered and the rate the generator managed to send, and the backlog (sent and not
  acknowledged) at the end; the verdicts are current when every check reads ``up``;
- ``GetVerdict`` and ``ListVerdicts`` latency, p50 and p99, over gRPC and the JSON API;
- a ``/metrics`` scrape's time;
- the coordinator's RSS (current and peak) and CPU (cores, from /proc).

Each figure is printed beside its target (issue 16): a missed one says missed, and why
when it is known (for example the generator, on the same cores, could not offer the
load). The JSON (``--out``, default build/bench-scale.json) holds every figure.

The generator is one Python process: on a 2-core machine it and the coordinator share
the cores, so the offered rate it reaches is printed beside the target, never assumed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import Children, CpuMeter, wait_for  # noqa: E402

VANTAGE = str(Path(sys.executable).parent / "vantage")
TOKEN = "bench-scale-token-0123456789abcdef"
TICK = 0.1  # seconds between one agent's batches
# Issue 16's targets.
TARGET_RATE = 100_000
TARGET_GET_P99_MS = 5.0
TARGET_RSS_MIB = 1024


# -- the load generator (its own process) --------------------------------------------------


@dataclass
class GeneratorStats:
    agents: int = 0
    connected: int = 0
    sent: int = 0
    acked: int = 0
    seconds: float = 0.0
    errors: int = 0


async def _one_agent(
    channel: Any,
    name: str,
    region: str,
    checks: list[str],
    per_tick: int,
    stop_at: float,
    stats: GeneratorStats,
) -> None:
    from vantage_proto.v1 import agent_pb2, agent_pb2_grpc

    call = agent_pb2_grpc.AgentServiceStub(channel).Connect(
        metadata=[("authorization", f"Bearer {TOKEN}")]
    )
    hello = agent_pb2.Hello(
        name=name,
        region=region,
        version="bench",
        capabilities=["tcp"],
        instance_id=uuid.uuid4().hex,
    )
    await call.write(agent_pb2.AgentMessage(hello=hello))
    welcome = await call.read()
    assignments = await call.read()
    if welcome.WhichOneof("kind") != "welcome" or assignments.WhichOneof("kind") != "assignments":
        stats.errors += 1
        return
    stats.connected += 1
    acked = 0

    async def read() -> None:
        nonlocal acked
        while True:
            message = await call.read()
            if message is None or not hasattr(message, "WhichOneof"):
                return  # EOF
            if message.WhichOneof("kind") == "ack":
                stats.acked += message.ack.seq - acked
                acked = message.ack.seq

    reader = asyncio.create_task(read())
    loop = asyncio.get_running_loop()
    seq = 0
    index = random.randrange(len(checks))  # agents start at different checks
    next_at = loop.time() + random.uniform(0, TICK)
    try:
        while loop.time() < stop_at:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += TICK
            now_us = int(time.time() * 1e6)
            batch = agent_pb2.ResultBatch(sent_unix_us=now_us)
            add = batch.results.add
            for _ in range(per_tick):
                seq += 1
                add(
                    check=checks[index],
                    seq=seq,
                    started_unix_us=now_us - 900,
                    duration_us=800,
                    success=True,
                )
                index = (index + 1) % len(checks)
            await call.write(agent_pb2.AgentMessage(results=batch))
            stats.sent += per_tick
    finally:
        await asyncio.sleep(1.0)  # the last acks
        call.cancel()
        reader.cancel()


async def _generate(args: argparse.Namespace) -> GeneratorStats:
    import grpc

    checks = [f"c{n:05d}" for n in range(args.checks)]
    per_tick = max(1, round(args.rate / args.agents * TICK))
    stats = GeneratorStats(agents=args.agents)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    # A few connections, as that many agents on as many hosts would not share one.
    channels = [
        grpc.aio.insecure_channel(args.coordinator, options=[*options, ("grpc.channel_id", i)])
        for i in range(max(1, args.agents // 25))
    ]
    started = time.monotonic()
    stop_at = asyncio.get_running_loop().time() + args.seconds
    tasks = [
        _one_agent(
            channels[i % len(channels)],
            f"load-{i:03d}",
            f"r{i % args.regions}",
            checks,
            per_tick,
            stop_at,
            stats,
        )
        for i in range(args.agents)
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    stats.errors += sum(1 for r in results if isinstance(r, BaseException))
    stats.seconds = time.monotonic() - started
    for channel in channels:
        await channel.close()
    return stats


def loadgen_main(args: argparse.Namespace) -> int:
    stats = asyncio.run(_generate(args))
    Path(args.stats).write_text(json.dumps(asdict(stats)))
    return 0


# -- the coordinator under load --------------------------------------------------------------


def write_config(directory: Path, checks: int, interval: float) -> Path:
    lines = ["checks:"]
    lines += [
        f"  - {{name: c{n:05d}, type: tcp, target: '127.0.0.1:9', interval: {interval:g}s, "
        "timeout: 1s}"
        for n in range(checks)
    ]
    (directory / "checks.yaml").write_text("\n".join(lines) + "\n")
    (directory / "tokens.yaml").write_text(f"tokens:\n  - token: {TOKEN}\n")
    config = directory / "coordinator.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\n"
        "http_listen: 127.0.0.1:0\n"
        "checks_file: checks.yaml\n"
        "tokens_file: tokens.yaml\n"
        "store_file: vantage.db\n"
        "limits: {max_checks_per_agent: 1000000, max_message_bytes: 64MiB}\n"
    )
    return config


def listening(log: Path) -> dict[str, Any] | None:
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "coordinator listening":
            return dict(event)
    return None


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def timed(call: Callable[[], object], count: int, pause: float = 0.0) -> list[float]:
    """Milliseconds each of ``count`` calls took."""
    taken = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        taken.append((time.perf_counter() - started) * 1000)
        if pause:
            time.sleep(pause)
    return taken


def proc_status(pid: int, key: str) -> float:
    """A /proc/PID/status figure in MiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Row:
    figure: str
    value: str
    target: str = ""
    met: bool | None = None
    why: str = ""


def run(args: argparse.Namespace, children: Children) -> tuple[list[Row], dict[str, Any]]:
    import grpc

    from vantage_proto.v1 import query_pb2, query_pb2_grpc

    interval = args.agents * args.checks / args.rate
    config = write_config(children.dir, args.checks, interval)
    log = children.dir / "coordinator.log"
    coordinator = children.spawn(
        "coordinator", [VANTAGE, "coordinator", "--config", str(config), "--log-format", "json"]
    )
    event = wait_for(lambda: listening(log), 120, "the coordinator to listen")
    grpc_address = f"127.0.0.1:{event['grpc_port']}"
    http = f"http://127.0.0.1:{event['http_port']}"
    stats_file = children.dir / "loadgen.json"
    generator = children.spawn(
        "loadgen",
        [
            sys.executable,
            __file__,
            "loadgen",
            "--coordinator",
            grpc_address,
            *("--agents", str(args.agents), "--regions", str(args.regions)),
            *("--checks", str(args.checks), "--rate", str(args.rate)),
            # Past the window: the figures at its end are taken under load too.
            *("--seconds", str(args.warm + args.seconds + 20), "--stats", str(stats_file)),
        ],
    )
    print(
        f"load: {args.agents} agents in {args.regions} regions x {args.checks:,} checks every "
        f"{interval:g} s = {args.rate:,} results/s offered; warm-up {args.warm:g} s, "
        f"measured {args.seconds:g} s",
        flush=True,
    )
    time.sleep(args.warm)

    def scrape() -> str:
        with urllib.request.urlopen(f"{http}/metrics", timeout=60) as response:
            return str(response.read().decode())

    meter = CpuMeter({"coordinator": lambda: [coordinator.pid], "loadgen": lambda: [generator.pid]})
    received_0, at_0 = metric(scrape(), "vantage_results_received_total"), time.monotonic()
    meter.start()
    channel = grpc.insecure_channel(
        grpc_address, options=[("grpc.max_receive_message_length", 256 << 20)]
    )
    stub = query_pb2_grpc.QueryServiceStub(channel)
    names = [f"c{n:05d}" for n in range(args.checks)]
    deadline = time.monotonic() + args.seconds

    def get() -> object:
        return stub.GetVerdict(query_pb2.GetVerdictRequest(check=random.choice(names)), timeout=30)

    def get_json() -> object:
        url = f"{http}/api/v1/verdicts/{random.choice(names)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    def list_grpc() -> object:
        return stub.ListVerdicts(query_pb2.ListVerdictsRequest(), timeout=60)

    def list_json() -> object:
        with urllib.request.urlopen(f"{http}/api/v1/verdicts", timeout=60) as response:
            return response.read()

    # Spread over the window: queries a dashboard or alerting would make, not a flood.
    get_ms = timed(get, 300, pause=0.02)
    get_json_ms = timed(get_json, 150, pause=0.02)
    list_ms = timed(list_grpc, 3, pause=0.5)
    list_json_ms = timed(list_json, 3, pause=0.5)
    scrape_ms = timed(scrape, 3, pause=0.5)
    late = time.monotonic() - deadline
    if late > 0:
        print(f"bench: the queries ran {late:.1f} s past the window; --seconds longer", flush=True)
    time.sleep(max(0.0, deadline - time.monotonic()))
    final_scrape = scrape()
    received_1, at_1 = metric(final_scrape, "vantage_results_received_total"), time.monotonic()
    dropped = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in final_scrape.splitlines()
        if line.startswith("vantage_results_dropped_total{")
    }
    (children.dir / "metrics.txt").write_text(final_scrape)
    cores = meter.stop()
    rss, peak = proc_status(coordinator.pid, "VmRSS"), proc_status(coordinator.pid, "VmHWM")
    verdicts = list_grpc()
    states: dict[str, int] = {}
    for verdict in verdicts.verdicts:  # type: ignore[attr-defined]
        state = query_pb2.VerdictState.Name(verdict.state).removeprefix("VERDICT_STATE_").lower()
        states[state] = states.get(state, 0) + 1
    channel.close()
    generator.wait(timeout=120)
    stats = json.loads(stats_file.read_text())
    ingested = (received_1 - received_0) / (at_1 - at_0)
    sent_rate = stats["sent"] / max(1e-9, stats["seconds"])
    backlog = stats["sent"] - stats["acked"]

    rows: list[Row] = []
    why = ""
    if ingested < TARGET_RATE:
        if cores["coordinator"] >= 0.85:
            why = (
                f"the coordinator is CPU-bound: {cores['coordinator'] * 100:.0f}% of a core, "
                f"{cores['coordinator'] / max(ingested, 1) * 1e6:.0f} us per result over gRPC"
            )
        elif sent_rate < TARGET_RATE * 0.95:
            why = (
                f"the generator offered only {sent_rate:,.0f}/s "
                f"({cores['loadgen'] * 100:.0f}% of a core beside the coordinator's "
                f"{cores['coordinator'] * 100:.0f}% on {os.cpu_count()} cores)"
            )
        else:
            why = f"the coordinator used {cores['coordinator'] * 100:.0f}% of a core"
    rows.append(
        Row(
            "results/s ingested",
            f"{ingested:,.0f}",
            f">= {TARGET_RATE:,}",
            ingested >= TARGET_RATE,
            why,
        )
    )
    rows.append(Row("results/s sent by the generator", f"{sent_rate:,.0f}"))
    rows.append(Row("backlog at the end (sent, not acknowledged)", f"{backlog:,}"))
    rows.append(
        Row(
            "results dropped by the coordinator",
            ", ".join(f"{k} {v:,.0f}" for k, v in sorted(dropped.items())) or "none",
        )
    )
    current = states.get("up", 0) == args.checks
    rows.append(
        Row(
            "verdicts current (every check up)",
            ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
            f"up {args.checks:,}",
            current,
        )
    )
    p50, p99 = percentiles(get_ms)
    rows.append(
        Row(
            "GetVerdict over gRPC, p50 / p99",
            f"{p50:.2f} / {p99:.2f} ms",
            f"p99 < {TARGET_GET_P99_MS:g} ms",
            p99 < TARGET_GET_P99_MS,
        )
    )
    p50, p99 = percentiles(get_json_ms)
    rows.append(Row("GetVerdict over JSON, p50 / p99", f"{p50:.2f} / {p99:.2f} ms"))
    p50, p99 = percentiles(list_ms)
    rows.append(
        Row(f"ListVerdicts ({args.checks:,}) over gRPC, p50 / max", f"{p50:.0f} / {p99:.0f} ms")
    )
    p50, p99 = percentiles(list_json_ms)
    rows.append(
        Row(f"ListVerdicts ({args.checks:,}) over JSON, p50 / max", f"{p50:.0f} / {p99:.0f} ms")
    )
    rows.append(Row("/metrics scrape, median", f"{statistics.median(scrape_ms):.0f} ms"))
    rows.append(
        Row(
            "coordinator RSS now / peak",
            f"{rss:.0f} / {peak:.0f} MiB",
            f"< {TARGET_RSS_MIB} MiB",
            peak < TARGET_RSS_MIB,
        )
    )
    rows.append(
        Row(
            "CPU, cores",
            ", ".join(f"{k} {v:.2f}" for k, v in cores.items()),
        )
    )
    figures = {
        "ingested_per_s": ingested,
        "sent_per_s": sent_rate,
        "backlog": backlog,
        "dropped": dropped,
        "states": states,
        "get_ms": percentiles(get_ms),
        "get_json_ms": percentiles(get_json_ms),
        "list_ms": percentiles(list_ms),
        "list_json_ms": percentiles(list_json_ms),
        "scrape_ms": statistics.median(scrape_ms),
        "rss_mib": rss,
        "peak_rss_mib": peak,
        "cores": cores,
        "generator": stats,
    }
    return rows, figures


def print_rows(rows: Sequence[Row]) -> None:
    width = max(len(row.figure) for row in rows)
    value_width = max(len(row.value) for row in rows)
    for row in rows:
        status = "" if row.met is None else ("met" if row.met else "MISSED")
        line = f"  {row.figure:<{width}}  {row.value:<{value_width}}  {row.target:<14} {status}"
        if row.why:
            line += f": {row.why}"
        print(line.rstrip())


def facts() -> dict[str, str]:
    import grpc

    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} cores, {model}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "grpcio": grpc.__version__,
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["bench", "loadgen"], default="bench")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--regions", type=int, default=5)
    parser.add_argument("--checks", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=TARGET_RATE, help="results/s offered")
    parser.add_argument("--warm", type=float, default=30.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--coordinator", help="loadgen: the coordinator's gRPC address")
    parser.add_argument("--stats", help="loadgen: where to write its figures")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench-scale.json")
    args = parser.parse_args(argv)
    if args.mode == "loadgen":
        return loadgen_main(args)
    about = facts()
    print("  ".join(f"{k}: {v}" for k, v in about.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vantage-bench-scale-"))
    children = Children(tmp)
    try:
        rows, figures = run(args, children)
    finally:
        children.close()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_rows(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"facts": about, "rows": [asdict(r) for r in rows], **figures}, indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
