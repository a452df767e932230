#!/usr/bin/env python3
"""What keeping transitions costs the ingest path: microseconds per transition.

Run with the project's interpreter::

    .venv/bin/python tests/bench/bench_store.py [--transitions 10000] [--regions 3]

Measures, on the event loop as the coordinator runs it, with verdicts carrying evidence
from ``--regions`` regions of two agents:

- ``TransitionStore.add`` alone (encode, insert) and the commit it schedules, in a file
  (WAL, synchronous=NORMAL) and in memory;
- a burst: ``--transitions`` transitions recorded in one event-loop iteration (every
  check flipping at once, arriving in one batch of results: one commit), and the same
  number in as many iterations (one commit each: the worst case);
- for scale, the whole of ``TransitionRecorder.record`` per transition (numbering, the
  store, the JSON log line to /dev/null, the counter, the feed).

Figures are CPU time (``time.process_time``). Asserts nothing; not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from coordinator.fleet import AgentInfo  # noqa: E402
from coordinator.metrics import CoordinatorMetrics  # noqa: E402
from coordinator.store import RecordedTransition, TransitionStore  # noqa: E402
from coordinator.transitions import (  # noqa: E402
    TransitionFeed,
    TransitionLog,
    TransitionRecorder,
)
from coordinator.verdicts import (  # noqa: E402
    RegionState,
    RegionView,
    Transition,
    Verdict,
    VerdictState,
)
from vantage import logs  # noqa: E402
from vantage.results import FailureClass  # noqa: E402


def transitions(count: int, regions: int) -> list[Transition]:
    now = time.time()
    names = [f"r{index}" for index in range(regions)]
    made = []
    for index in range(count):
        check = f"check-{index:05d}"
        verdict = Verdict(
            check=check,
            state=VerdictState.GLOBAL,
            since=now,
            regions={
                name: RegionView(
                    RegionState.DOWN,
                    down=2,
                    failure=FailureClass.CONNECT_TIMEOUT,
                    failing_agents=(f"{name}-1", f"{name}-2"),
                )
                for name in names
            },
            regions_down=tuple(names),
            failure=FailureClass.CONNECT_TIMEOUT,
            reason=f"down from {2 * regions}/{2 * regions} agents in {regions} regions",
        )
        made.append(Transition(check, VerdictState.UP, verdict, now))
    return made


async def one_iteration(store: TransitionStore, batch: list[Transition], first_id: int) -> float:
    """CPU seconds to add ``batch`` in one loop iteration plus the commit it schedules."""
    started = time.process_time()
    for offset, transition in enumerate(batch):
        store.add(RecordedTransition(first_id + offset, transition))
    store.flush()  # what the scheduled commit does (it then finds nothing to do)
    return time.process_time() - started


async def many_iterations(store: TransitionStore, batch: list[Transition], first_id: int) -> float:
    """CPU seconds to add ``batch`` one transition per loop iteration (a commit each),
    less what the same iterations cost without the store."""
    started = time.process_time()
    for offset, transition in enumerate(batch):
        store.add(RecordedTransition(first_id + offset, transition))
        await asyncio.sleep(0)
    spent = time.process_time() - started
    started = time.process_time()
    for _ in batch:
        await asyncio.sleep(0)
    return spent - (time.process_time() - started)


async def add_only(store: TransitionStore, batch: list[Transition], first_id: int) -> float:
    started = time.process_time()
    for offset, transition in enumerate(batch):
        store.add(RecordedTransition(first_id + offset, transition))
    spent = time.process_time() - started
    store.flush()
    return spent


async def recorder_cost(path: Path | None, batch: list[Transition]) -> float:
    no_agents: list[AgentInfo] = []
    metrics = CoordinatorMetrics(version="bench", verdicts=list, agents=lambda: no_agents)
    log = TransitionLog(TransitionStore.open(path))
    recorder = TransitionRecorder(log, TransitionFeed(metrics), metrics)
    started = time.process_time()
    for transition in batch:
        recorder.record([transition], agent="eu-1", region="eu")
        await asyncio.sleep(0)
    spent = time.process_time() - started
    started = time.process_time()
    for _ in batch:
        await asyncio.sleep(0)
    log.store.close()
    return spent - (time.process_time() - started)


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transitions", type=int, default=10_000)
    parser.add_argument("--regions", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="median of this many runs")
    args = parser.parse_args()
    count = args.transitions
    batch = transitions(count, args.regions)
    print(
        f"{count:,} transitions, evidence from {args.regions} regions; "
        f"median of {args.runs} runs, CPU time"
    )
    loop = asyncio.Runner()
    with loop, tempfile.TemporaryDirectory() as directory:
        for where in ("file", "memory"):
            figures: dict[str, list[float]] = {"add": [], "burst": [], "spread": []}
            size = 0
            for run in range(args.runs):
                path = Path(directory) / f"store-{run}.db" if where == "file" else None
                store = TransitionStore.open(path)
                figures["add"].append(loop.run(add_only(store, batch, 1)))
                figures["burst"].append(loop.run(one_iteration(store, batch, count + 1)))
                figures["spread"].append(loop.run(many_iterations(store, batch, 2 * count + 1)))
                store.close()
                if path is not None:
                    size = os.path.getsize(path)
            add, burst, spread = (median(figures[key]) for key in ("add", "burst", "spread"))
            print(f"{where}:")
            print(f"  add (encode + insert), no commit   {add / count * 1e6:7.1f} us/transition")
            print(
                f"  burst of {count:,} in one iteration  {burst * 1e3:7.1f} ms "
                f"({burst / count * 1e6:.1f} us/transition, one commit)"
            )
            print(
                f"  {count:,} in {count:,} iterations      {spread * 1e3:7.1f} ms "
                f"({spread / count * 1e6:.1f} us/transition, a commit each)"
            )
            if size:
                print(f"  file size: {size / 3 / count:.0f} B per transition")

        devnull = open(os.devnull, "w")  # noqa: SIM115 - for the whole run
        sys.stderr = devnull
        logs.configure("info", json=True)
        for where in ("file", "memory"):
            path = Path(directory) / "recorder.db" if where == "file" else None
            if path is not None and path.exists():
                path.unlink()
            spent = loop.run(recorder_cost(path, batch))
            print(
                f"TransitionRecorder.record, {where} store: {spent / count * 1e6:.1f} "
                "us/transition (numbering, store, log line, counter, feed; a commit each)"
            )


if __name__ == "__main__":
    main()
