#!/usr/bin/env python3
"""Coordinator ingest cost: CPU microseconds per probe result, in-process and over gRPC.

Run with the project's interpreter::

    .venv/bin/python tests/bench/bench_ingest.py [inproc|tick|grpc|all] [options]

``inproc``
    The coordinator's real ingest path without the network: each ``AgentMessage`` is parsed
    from bytes, then handled exactly as ``AgentService._receive`` does (``CoordinatorState``:
    ``seen``, ``results`` -- ``result_from_pb``, ``engine.observe``, fleet and metrics
    counting, transition recording, the agent's ledger in the (in-memory) store -- and the
    serialised ack), with ``state.tick()`` once per simulated second. A fake clock
    advances at ``--rate`` results/s, so staleness windows pass as they would at that rate.
    Prints a per-stage breakdown.
``tick``
    ``engine.tick()`` alone with every check seen by every agent: the cost of a tick with
    nothing due, and of one where every check is due.
``grpc``
    A real ``vantage coordinator`` process (``coordinator.server`` under the CLI, uvloop)
    with ``--checks`` http checks, and ``--agents`` agent streams from this process sending
    pre-serialised batches as fast as acks allow (or at ``--grpc-rate``). The coordinator's
    CPU comes from ``/proc/PID/stat`` (all its threads, gRPC's included).

Figures are CPU time (``time.process_time`` or /proc), not wall time, so other work on
the machine skews them little. Asserts nothing; not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pickle
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import structlog  # noqa: E402

from coordinator.engine import VerdictEngine  # noqa: E402
from coordinator.fleet import AgentFleet, AgentHello  # noqa: E402
from coordinator.judgement import EngineSettings  # noqa: E402
from coordinator.metrics import CoordinatorMetrics  # noqa: E402
from coordinator.registry import CheckChange, CheckRegistry  # noqa: E402
from coordinator.state import CoordinatorState  # noqa: E402
from coordinator.store import TransitionStore  # noqa: E402
from coordinator.transitions import (  # noqa: E402
    TransitionFeed,
    TransitionLog,
    TransitionRecorder,
)
from vantage.checks import AnyCheck, parse_check  # noqa: E402
from vantage.results import (  # noqa: E402
    FailureClass,
    HttpDetails,
    Phases,
    ProbeOutcome,
    ProbeResult,
)
from vantage.wire import result_from_pb, result_to_pb  # noqa: E402
from vantage_proto.v1 import agent_pb2  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REGIONS = ("eu", "us", "ap", "sa")
INTERVAL = 10.0  # seconds, every check
TIMEOUT = 5.0
FAILURES = (
    (FailureClass.CONNECT_REFUSED, "connect 198.18.0.5:443: connection refused"),
    (FailureClass.HTTP_STATUS, "status 503 not in 200-299"),
    (FailureClass.TIMEOUT, "no response within 5s (processing)"),
)


# -- workload ------------------------------------------------------------------------------


def check_names(count: int) -> list[str]:
    return [f"web-{index:05d}" for index in range(count)]


def build_checks(count: int) -> list[AnyCheck]:
    return [
        parse_check(
            {
                "name": name,
                "type": "http",
                "target": f"http://svc-{index % 500}.example.net/health",
                "interval": INTERVAL,
                "timeout": TIMEOUT,
            }
        )
        for index, name in enumerate(check_names(count))
    ]


def make_result(rng: random.Random, check: str, seq: int, fail_rate: float) -> ProbeResult:
    """An http result shaped like the agent's: phases, details, a message when failed."""
    now = time.time()
    phases = Phases(
        resolve=rng.uniform(0.0001, 0.002),
        connect=rng.uniform(0.0002, 0.01),
        tls=0.0,
        processing=rng.uniform(0.001, 0.05),
        transfer=rng.uniform(0.00001, 0.001),
    )
    target = f"http://svc-{seq % 500}.example.net/health"
    if rng.random() < fail_rate:
        failure, message = rng.choice(FAILURES)
        outcome = ProbeOutcome(
            success=False,
            failure=failure,
            message=message,
            phases=phases,
            details=HttpDetails(status_code=503, http_version="1.1", final_url=target)
            if failure is FailureClass.HTTP_STATUS
            else None,
        )
    else:
        outcome = ProbeOutcome(
            success=True,
            phases=phases,
            details=HttpDetails(
                status_code=200,
                http_version="1.1",
                final_url=target,
                body_bytes=2,
                peer="198.18.0.5:80",
            ),
        )
    return ProbeResult(check, 1, seq, now, phases.total, outcome)


def build_batches(
    names: list[str],
    *,
    agent_index: int,
    rounds: float,
    batch_size: int,
    fail_rate: float,
    seed: int = 1,
) -> list[bytes]:
    """Serialised ``AgentMessage``s of one agent going round its checks ``rounds`` times.

    Each agent starts at a different offset so that agents do not report a check at the
    same moment, as with jittered schedules.
    """
    rng = random.Random(seed * 1000 + agent_index)
    total = int(len(names) * rounds)
    offset = agent_index * len(names) // 7
    # A few distinct results per check are enough; re-use them with fresh seq numbers.
    batches: list[bytes] = []
    for start in range(0, total, batch_size):
        results = []
        for position in range(start, min(start + batch_size, total)):
            name = names[(position + offset) % len(names)]
            results.append(result_to_pb(make_result(rng, name, position + 1, fail_rate)))
        message = agent_pb2.AgentMessage(results=agent_pb2.ResultBatch(results=results))
        batches.append(message.SerializeToString())
    return batches


def cached_batches(args: argparse.Namespace, names: list[str], rounds: float) -> list[list[bytes]]:
    """Every agent's batches; kept in ``--cache`` (a directory) to compare code versions on
    the very same input without building it again."""
    key = f"{len(names)}-{args.agents}-{rounds:g}-{args.batch}-{args.fail_rate:g}.pickle"
    path = Path(args.cache) / key if args.cache else None
    if path is not None and path.exists():
        batches: list[list[bytes]] = pickle.loads(path.read_bytes())
        return batches
    batches = [
        build_batches(
            names, agent_index=index, rounds=rounds, batch_size=args.batch, fail_rate=args.fail_rate
        )
        for index in range(args.agents)
    ]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(batches))
    return batches


# -- in-process ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class NullLink:
    """An agent stream that sends nothing: the acks go nowhere."""

    def welcome(self, last_seq: int) -> None:
        pass

    def acknowledge(self, seq: int) -> None:
        self.acked = seq

    def assign(self, change: CheckChange) -> None:
        pass

    def recheck(self, checks: Sequence[str]) -> None:
        pass

    def end(self, reason: str) -> None:
        pass


def quiet_logs() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=open(os.devnull, "w")),  # noqa: SIM115
        cache_logger_on_first_use=True,
    )


@dataclass
class Coordinator:
    """The coordinator's ingest parts wired as ``coordinator.server`` wires them."""

    clock: FakeClock
    engine: VerdictEngine
    fleet: AgentFleet
    metrics: CoordinatorMetrics
    state: CoordinatorState
    hellos: list[AgentHello]
    links: list[NullLink]


def build_coordinator(checks: list[AnyCheck], agents: int) -> Coordinator:
    clock = FakeClock(1_700_000_000.0)
    fleet = AgentFleet(clock)
    engine = VerdictEngine(EngineSettings(), clock)
    metrics = CoordinatorMetrics(version="bench", verdicts=engine.verdicts, agents=fleet.agents)
    store = TransitionStore.open(None, clock=clock)
    recorder = TransitionRecorder(TransitionLog(store), TransitionFeed(metrics), metrics)
    state = CoordinatorState(
        engine=engine,
        fleet=fleet,
        checks=CheckRegistry(checks),
        recorder=recorder,
        store=store,
        metrics=metrics,
    )
    hellos, links = [], []
    for index in range(agents):
        hello = AgentHello(
            name=f"agent-{index}", region=REGIONS[index % len(REGIONS)], instance_id="i-1"
        )
        link = NullLink()
        state.agent_connected(hello, link)
        hellos.append(hello)
        links.append(link)
    return Coordinator(clock, engine, fleet, metrics, state, hellos, links)


def receive(c: Coordinator, agent: int, raw: bytes, stream_log: Any) -> bytes:
    """What ``AgentService._receive`` does with one message, minus the network."""
    hello = c.hellos[agent]
    message = agent_pb2.AgentMessage.FromString(raw)
    c.state.seen(hello.name)
    if message.WhichOneof("kind") == "results":
        seq = c.state.results(hello, c.links[agent], message.results, stream_log)
        ack = agent_pb2.CoordinatorMessage(ack=agent_pb2.ResultAck(seq=seq))
        return ack.SerializeToString()
    return b""


def interleave(per_agent: list[list[bytes]]) -> Iterator[tuple[int, bytes]]:
    for position in range(max(len(b) for b in per_agent)):
        for agent, batches in enumerate(per_agent):
            if position < len(batches):
                yield agent, batches[position]


def run_inproc(args: argparse.Namespace) -> None:
    quiet_logs()
    names = check_names(args.checks)
    checks = build_checks(args.checks)
    t0 = time.process_time()
    per_agent = cached_batches(args, names, args.rounds)
    built = time.process_time() - t0
    total = sum(len(agent_pb2.AgentMessage.FromString(b).results.results) for b in per_agent[0])
    print(
        f"in-process ingest: {args.checks} checks x {args.agents} agents, batches of "
        f"{args.batch}, {args.fail_rate:.0%} failures, simulated {args.rate:,} results/s "
        f"({total * args.agents:,} results, built in {built:.1f}s CPU)"
    )
    c = build_coordinator(checks, args.agents)
    logs = [structlog.get_logger(component="bench").bind(agent=h.name) for h in c.hellos]
    step = args.batch / args.rate
    next_tick = c.clock.now + 1.0
    warm = args.warm_rounds * args.checks * args.agents // args.batch  # batches
    spent = {"ingest": 0.0, "tick": 0.0}
    measured = 0
    chunks: list[float] = []  # us/result per 10 batches: the median shrugs off noise
    chunk_start = 0.0
    for index, (agent, raw) in enumerate(interleave(per_agent)):
        if index == warm:
            spent = {"ingest": 0.0, "tick": 0.0}
            measured = 0
        c.clock.now += step
        start = time.process_time()
        receive(c, agent, raw, logs[agent])
        middle = time.process_time()
        if c.clock.now >= next_tick:
            next_tick += 1.0
            c.state.tick()
        spent["ingest"] += middle - start
        spent["tick"] += time.process_time() - middle
        measured += args.batch
        if index >= warm and (index - warm) % 10 == 9:
            total = spent["ingest"] + spent["tick"]
            chunks.append((total - chunk_start) / (10 * args.batch) * 1e6)
            chunk_start = total
    cpu = spent["ingest"] + spent["tick"]
    per = cpu / measured * 1e6
    median = statistics.median(chunks)
    print(
        f"  steady state ({measured:,} results): ingest {spent['ingest'] / measured * 1e6:.2f}"
        f" + tick {spent['tick'] / measured * 1e6:.2f} = {per:.2f} us/result CPU (median of "
        f"{len(chunks)} chunks {median:.2f})  -> {1e6 / per:,.0f} results/s per core"
    )
    stages(args, c, per_agent)


def stages(args: argparse.Namespace, c: Coordinator, per_agent: list[list[bytes]]) -> None:
    """Each stage alone over the same messages (after the run, so the engine is warm)."""
    raws = per_agent[0][: max(1, 2_000 // args.batch)]
    messages = [agent_pb2.AgentMessage.FromString(raw) for raw in raws]
    results_pb = [r for m in messages for r in m.results.results]
    count = len(results_pb)

    def timed(fn: Any, repeat: int = 30) -> float:
        best = float("inf")
        for _ in range(repeat):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return best / count * 1e6

    parse = timed(lambda: [agent_pb2.AgentMessage.FromString(raw) for raw in raws])
    convert = timed(lambda: [result_from_pb(r) for r in results_pb])
    results = [result_from_pb(r) for r in results_pb]
    hello = c.hellos[0]

    def observe() -> None:
        engine = c.engine
        for result in results:
            c.clock.now += 1 / args.rate
            engine.observe(hello.name, result)

    engine = timed(observe)
    # What ingest asks of the metrics: one call per batch.
    metrics = timed(lambda: c.metrics.results_ingested(hello.region, count, time.perf_counter()))
    fleet = timed(lambda: [c.fleet.count_result(hello.name) for _ in results])
    print(
        f"  stages alone (best of 30), us/result: parse {parse:.2f}  result_from_pb {convert:.2f}  "
        f"engine.observe {engine:.2f}  metrics {metrics:.2f}  fleet {fleet:.2f}"
    )


def run_tick(args: argparse.Namespace) -> None:
    quiet_logs()
    names = check_names(args.checks)
    c = build_coordinator(build_checks(args.checks), args.agents)
    rng = random.Random(7)
    results = [make_result(rng, name, index + 1, 0.0) for index, name in enumerate(names)]
    for hello in c.hellos:
        for result in results:
            c.engine.observe(hello.name, result)
    c.engine.tick()
    start = time.process_time()
    for _ in range(20):
        c.clock.now += 0.001
        c.engine.tick()
    idle = (time.process_time() - start) / 20 * 1e3
    # Everything due: each check re-evaluated once (a view of each went stale).
    window = EngineSettings().stale_intervals * INTERVAL + TIMEOUT
    c.clock.now += window + 1
    start = time.process_time()
    c.engine.tick()
    due = (time.process_time() - start) * 1e3
    per_check = due / args.checks * 1e3
    print(
        f"engine.tick, {args.checks} checks x {args.agents} agents: nothing due "
        f"{idle:.2f} ms per tick; every check due {due:.1f} ms ({per_check:.1f} us per check)"
    )


# -- over gRPC -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


@contextlib.contextmanager
def coordinator_process(directory: Path, checks: int) -> Iterator[tuple[int, int, int]]:
    lines = ["checks:"]
    lines += [
        f"  - {{name: {name}, type: http, target: 'http://svc-{i % 500}.example.net/health', "
        f"interval: {INTERVAL:g}s, timeout: {TIMEOUT:g}s}}"
        for i, name in enumerate(check_names(checks))
    ]
    (directory / "checks.yaml").write_text("\n".join(lines) + "\n")
    (directory / "tokens.yaml").write_text(f"tokens:\n  - token: {TOKEN}\n")
    port, http_port = free_port(), free_port()
    (directory / "coordinator.yaml").write_text(
        f"listen: 127.0.0.1:{port}\nhttp_listen: 127.0.0.1:{http_port}\n"
        "checks_file: checks.yaml\ntokens_file: tokens.yaml\nheartbeat_interval: 10s\n"
    )
    log = open(directory / "coordinator.log", "wb")  # noqa: SIM115
    # This tree's code (PYTHONPATH), so that checkouts side by side can be compared.
    command = [sys.executable, "-m", "vantage", "coordinator"]
    command += ["--config", str(directory / "coordinator.yaml"), "--log-level", "warning"]
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"coordinator did not start:\n{(directory / 'coordinator.log').read_text()}"
                )
            time.sleep(0.1)
        yield process.pid, port, http_port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        process.wait(10)
        log.close()


class BenchAgent:
    """One agent stream sending pre-serialised batches, with a bounded window of unacked
    batches (the real agent pipelines its writes the same way)."""

    def __init__(self, channel: grpc.aio.Channel, index: int, window: int) -> None:
        connect = channel.stream_stream(
            "/vantage.v1.AgentService/Connect",
            request_serializer=None,  # bytes go out as they are
            response_deserializer=agent_pb2.CoordinatorMessage.FromString,
        )
        self.call: Any = connect(metadata=[("authorization", f"Bearer {TOKEN}")])
        self.name = f"bench-{index}"
        self.region = REGIONS[index % len(REGIONS)]
        self.window = window
        self.credit = asyncio.Semaphore(window)
        self.reader: asyncio.Task[None] | None = None
        self.acked = 0

    async def handshake(self) -> None:
        hello = agent_pb2.Hello(name=self.name, region=self.region, instance_id="bench")
        await self.call.write(agent_pb2.AgentMessage(hello=hello).SerializeToString())
        for _ in range(2):  # Welcome, full Assignments
            await self.call.read()
        self.reader = asyncio.create_task(self._read_acks())

    async def _read_acks(self) -> None:
        while (message := await self.call.read()) is not grpc.aio.EOF:
            if message.WhichOneof("kind") == "ack":
                self.acked += 1
                self.credit.release()

    async def send(self, batches: list[bytes], pace: Any) -> None:
        """Send every batch and return once each is acknowledged."""
        for raw in batches:
            await self.credit.acquire()
            await pace()
            await self.call.write(raw)
        for _ in range(self.window):
            await self.credit.acquire()
        for _ in range(self.window):
            self.credit.release()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        self.call.cancel()


def ingested(http_port: int) -> tuple[float, float]:
    """The coordinator's own count of results ingested and dropped (its /metrics)."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    received = dropped = 0.0
    for line in text.splitlines():
        if line.startswith("vantage_results_received_total"):
            received += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vantage_results_dropped_total"):
            dropped += float(line.rsplit(" ", 1)[1])
    return received, dropped


async def drive(args: argparse.Namespace, port: int, http_port: int, pid: int) -> None:
    names = check_names(args.checks)
    rounds = args.grpc_rounds
    per_agent = cached_batches(args, names, rounds)
    warm = int(len(per_agent[0]) * args.grpc_warm / rounds)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        agents = [BenchAgent(channel, i, args.window) for i in range(args.agents)]
        for agent in agents:
            await agent.handshake()

        async def flat_out() -> None:
            pass

        # Warm-up: the first round creates every view and every verdict transition.
        sends = zip(agents, [b[:warm] for b in per_agent], strict=True)
        await asyncio.gather(*(agent.send(batches, flat_out) for agent, batches in sends))
        # What the coordinator burns with the streams open and nothing arriving (the
        # ticker, the checks-file poll, gRPC's own machinery): a floor under every rate.
        idle0, idle_wall0 = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(args.idle)
        idle = (cpu_seconds(pid) - idle0) / (time.monotonic() - idle_wall0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        period = args.batch / args.grpc_rate * args.agents if args.grpc_rate else 0.0

        def pacer() -> Any:
            sent = 0

            async def pace() -> None:
                nonlocal sent
                sent += 1
                delay = started + sent * period - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)

            return pace if period else flat_out

        results = sum(len(b) - warm for b in per_agent) * args.batch
        samples: list[float] = []  # us/result over each half second: the median shrugs off noise

        async def sample() -> None:
            last = (cpu_seconds(pid), sum(a.acked for a in agents))
            while True:
                await asyncio.sleep(0.5)
                now = (cpu_seconds(pid), sum(a.acked for a in agents))
                if now[1] > last[1]:
                    samples.append((now[0] - last[0]) / ((now[1] - last[1]) * args.batch) * 1e6)
                last = now

        sampler = asyncio.create_task(sample())
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        sends = zip(agents, [b[warm:] for b in per_agent], strict=True)
        await asyncio.gather(*(agent.send(batches, pacer()) for agent, batches in sends))
        cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - wall0
        sampler.cancel()
        for agent in agents:
            agent.close()
    received, dropped = ingested(http_port)
    rate = results / wall
    target = f"paced at {args.grpc_rate:,}/s" if args.grpc_rate else "flat out"
    print(
        f"gRPC ingest ({target}, {args.agents} agent streams, {args.checks} checks, batches of "
        f"{args.batch}): {results:,} results in {wall:.1f}s = {rate:,.0f} results/s; "
        f"coordinator CPU {cpu:.2f}s = {cpu / results * 1e6:.1f} us/result (median of "
        f"{len(samples)} half-seconds {statistics.median(samples or [0.0]):.1f}) "
        f"({cpu / wall:.0%} of a core); ingested {received:,.0f} in all, dropped {dropped:,.0f}"
    )
    print(f"  idle with {args.agents} streams open: {idle:.1%} of a core")


def run_grpc(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="vantage-bench-ingest-") as tmp,
        coordinator_process(Path(tmp), args.checks) as (pid, port, http_port),
    ):
        asyncio.run(drive(args, port, http_port, pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="all", choices=("inproc", "tick", "grpc", "all"))
    parser.add_argument("--checks", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--fail-rate", type=float, default=0.02)
    parser.add_argument("--rate", type=int, default=10_000, help="simulated results/s (inproc)")
    parser.add_argument("--rounds", type=float, default=6.0, help="rounds of every check")
    parser.add_argument("--warm-rounds", type=float, default=2.0)
    parser.add_argument("--grpc-rounds", type=float, default=3.0)
    parser.add_argument("--grpc-warm", type=float, default=1.0)
    parser.add_argument("--grpc-rate", type=int, default=0, help="0: as fast as acks allow")
    parser.add_argument("--window", type=int, default=4, help="unacked batches per stream")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measured")
    parser.add_argument("--cache", help="directory keeping built batches between runs")
    args = parser.parse_args()
    if args.mode in ("inproc", "all"):
        run_inproc(args)
    if args.mode in ("tick", "all"):
        run_tick(args)
    if args.mode in ("grpc", "all"):
        run_grpc(args)


if __name__ == "__main__":
    main()
