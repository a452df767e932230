#!/usr/bin/env python3
"""The agent's result spool: the segment log (``agent.spool.Spool``) against a minimal
SQLite (WAL) prototype of the same job, measured the same way.

Run with the project's interpreter (``make bench-spool`` does)::

    .venv/bin/python tests/bench/bench_spool.py [--backlog 1000000] [--rate 10000]

Each candidate, in a temporary directory on the disk that holds ``--dir`` (default: the
system's temporary directory), with HTTP results as the agent makes them:

1. **connected**: ``--rate`` results a second, in batches of a fifth of that (the link's
   batch interval), each batch acknowledged one batch later, a flush every second (and a
   sync whenever the candidate's policy asks for one): CPU per result added and
   acknowledged, and the longest flush (it runs on the agent's event loop);
2. **backlog**: the coordinator gone, ``--backlog`` results, a flush every ``--rate``
   results: CPU per result, results a second one core can spool, the longest flush, bytes
   on disk per result;
3. **reopen** with the backlog spooled: time to open and read the first batch of 2,000;
4. **replay**: the whole backlog read back in batches of 2,000, each acknowledged, a flush
   every 100,000: results a second, and the bytes left on disk once all are acknowledged.

Both candidates write only results still unacknowledged at a flush, and sync as the spool
does (SQLite: synchronous=FULL, its commit syncs; the spool: when results stay
unacknowledged across a flush). Figures are CPU time (``time.process_time``, worker
threads included) and wall time; the bench prints them and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.buffer import ResultBuffer  # noqa: E402
from agent.spool import Spool  # noqa: E402
from vantage import logs  # noqa: E402
from vantage.results import HttpDetails, Phases, ProbeOutcome, ProbeResult  # noqa: E402
from vantage.wire import result_from_pb, result_to_pb  # noqa: E402
from vantage_proto.v1 import agent_pb2  # noqa: E402

BATCH = 2_000  # the link's batch_size


class Candidate(Protocol):
    def add(self, result: ProbeResult) -> bool: ...
    def take_unsent(self, limit: int) -> list[ProbeResult]: ...
    def ack(self, seq: int) -> int: ...
    def rewind(self) -> None: ...
    async def flush(self) -> None: ...
    def close(self) -> None: ...
    def disk_bytes(self) -> int: ...


class MemoryOnly:
    """``ResultBuffer``, the memory-only store: what the connected figures add to."""

    def __init__(self, directory: Path) -> None:
        self.buffer = ResultBuffer(1_000_000)
        self.add = self.buffer.add
        self.take_unsent = self.buffer.take_unsent
        self.ack = self.buffer.ack
        self.rewind = self.buffer.rewind

    async def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def disk_bytes(self) -> int:
        return 0


class SegmentLog:
    """``agent.spool.Spool``, flushed and synced as its ``run`` does."""

    def __init__(self, directory: Path) -> None:
        self.spool = Spool(directory, max_bytes=1 << 30)
        self.add = self.spool.add
        self.take_unsent = self.spool.take_unsent
        self.ack = self.spool.ack
        self.rewind = self.spool.rewind
        self.close = self.spool.close

    async def flush(self) -> None:
        if self.spool.flush():
            await self.spool.sync()

    def disk_bytes(self) -> int:
        return self.spool.disk_bytes


class SqliteSpool:
    """The prototype: one row per result in a WAL database, one transaction per flush
    (insert what is unacknowledged, delete what is), synchronous=FULL."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "spool.db"
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS result (seq INTEGER PRIMARY KEY, data BLOB)")
        row = self.db.execute("SELECT min(seq), max(seq) FROM result").fetchone()
        self.first = row[0] or 1
        self.next_seq = (row[1] or 0) + 1
        self.sent = self.first
        self.pending: list[ProbeResult] = []
        self.deleted = self.first - 1

    def add(self, result: ProbeResult) -> bool:
        self.next_seq = result.seq + 1
        self.pending.append(result)
        return True

    def take_unsent(self, limit: int) -> list[ProbeResult]:
        start = max(self.sent, self.first)
        cursor = self.db.execute(
            "SELECT data FROM result WHERE seq >= ? ORDER BY seq LIMIT ?", (start, limit)
        )
        batch = [result_from_pb(agent_pb2.ProbeResult.FromString(data)) for (data,) in cursor]
        rest = limit - len(batch)
        if rest > 0:
            skip = max(0, start + len(batch) - self.pending[0].seq) if self.pending else 0
            batch += self.pending[skip : skip + rest]
        if batch:
            self.sent = batch[-1].seq + 1
        return batch

    def ack(self, seq: int) -> int:
        forgotten = max(0, seq + 1 - self.first)
        self.first = max(self.first, seq + 1)
        return forgotten

    def rewind(self) -> None:
        self.sent = self.first

    async def flush(self) -> None:
        wanted = [
            (r.seq, result_to_pb(r).SerializeToString())
            for r in self.pending
            if r.seq >= self.first
        ]
        self.pending = []
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO result VALUES (?, ?)", wanted)
        if self.first - 1 > self.deleted:
            self.db.execute("DELETE FROM result WHERE seq < ?", (self.first,))
            self.deleted = self.first - 1
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def disk_bytes(self) -> int:
        suffixes = ("", "-wal", "-shm")
        return sum(
            os.path.getsize(f"{self.path}{s}")
            for s in suffixes
            if os.path.exists(f"{self.path}{s}")
        )


CANDIDATES: dict[str, Callable[[Path], Candidate]] = {
    "segment log": SegmentLog,
    "sqlite wal": SqliteSpool,
}


def make_result(seq: int) -> ProbeResult:
    """An HTTP result as the agent makes them (microsecond times, as the wire keeps)."""
    outcome = ProbeOutcome(
        True,
        phases=Phases(0.000112, 0.000231, 0.0, 0.000317, 0.000041),
        details=HttpDetails(200, "1.1", "http://127.0.0.1:8080/", 2, 0, "127.0.0.1:8080"),
    )
    return ProbeResult(
        f"web-{seq % 24_000:06d}", 3, seq, 1_790_000_000 + seq / 1e4, 0.000701, outcome
    )


async def connected(make: Callable[[Path], Candidate], base: Path, rate: int, seconds: int) -> str:
    directory = Path(tempfile.mkdtemp(dir=base))
    store = make(directory)
    per_batch = rate // 5
    results = [make_result(seq) for seq in range(1, rate * seconds + 1)]
    worst = 0.0
    started = time.process_time()
    for tick in range(seconds * 5):
        for result in results[tick * per_batch : (tick + 1) * per_batch]:
            store.add(result)
        sent = store.take_unsent(BATCH)
        if tick:
            store.ack(sent[0].seq - 1)  # the previous batch's acknowledgement
        if tick % 5 == 4:
            wall = time.perf_counter()
            await store.flush()
            worst = max(worst, time.perf_counter() - wall)
    cpu = time.process_time() - started
    on_disk = store.disk_bytes()
    store.close()
    shutil.rmtree(directory)
    per_result = cpu / len(results) * 1e6
    return (
        f"{per_result:.2f} us CPU/result, longest flush {worst * 1e3:.1f} ms, on disk {on_disk:,} B"
    )


async def backlog(
    make: Callable[[Path], Candidate], base: Path, rate: int, total: int
) -> list[str]:
    directory = Path(tempfile.mkdtemp(dir=base))
    store = make(directory)
    results = [make_result(seq) for seq in range(1, total + 1)]
    worst = 0.0
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, total, rate):
        for result in results[start : start + rate]:
            store.add(result)
        flushing = time.perf_counter()
        await store.flush()
        worst = max(worst, time.perf_counter() - flushing)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    on_disk = store.disk_bytes()
    store.close()
    del results
    lines = [
        f"backlog: {cpu / total * 1e6:.2f} us CPU/result, {total / wall:,.0f} results/s, "
        f"longest flush {worst * 1e3:.0f} ms, {on_disk / total:.1f} B/result on disk",
    ]

    opening = time.perf_counter()
    store = make(directory)
    store.rewind()
    first = store.take_unsent(BATCH)
    opened = time.perf_counter() - opening
    assert first[0].seq == 1, first[0].seq
    lines.append(f"reopen with {total:,} spooled: {opened * 1e3:.0f} ms to the first batch")

    cpu, wall, replayed = time.process_time(), time.perf_counter(), len(first)
    store.ack(first[-1].seq)
    while True:
        batch = store.take_unsent(BATCH)
        if not batch:
            break
        replayed += len(batch)
        store.ack(batch[-1].seq)
        if replayed % 100_000 < BATCH:
            await store.flush()
    await store.flush()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert replayed == total, replayed
    left = store.disk_bytes()
    store.close()
    shutil.rmtree(directory)
    lines.append(
        f"replay: {replayed / wall:,.0f} results/s ({cpu / replayed * 1e6:.2f} us CPU/result), "
        f"{left:,} B on disk once acknowledged"
    )
    return lines


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}, {os.cpu_count()} cores {model}, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}"
    )


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=10_000, help="results a second")
    parser.add_argument("--seconds", type=int, default=20, help="connected: seconds simulated")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="results spooled")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--only", choices=sorted(CANDIDATES), help="one candidate")
    args = parser.parse_args(argv)
    logs.configure("warning", json=False)
    print(f"Agent spool benchmark: {machine()}")
    base = Path(tempfile.mkdtemp(prefix="vantage-bench-spool-", dir=args.dir))
    try:
        figures = await connected(MemoryOnly, base, args.rate, args.seconds)
        print("\nfor comparison, memory only (ResultBuffer)")
        print(f"  connected at {args.rate:,}/s: {figures}")
        for name, make in CANDIDATES.items():
            if args.only and name != args.only:
                continue
            print(f"\n{name}")
            figures = await connected(make, base, args.rate, args.seconds)
            print(f"  connected at {args.rate:,}/s: {figures}")
            for line in await backlog(make, base, args.rate, args.backlog):
                print(f"  {line}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
