"""The transition store: history and ids across restarts, retention, unusable files."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from live_coordinator import eventually, start, write_config

from coordinator.store import TransitionStore
from coordinator.transitions import TransitionLog
from coordinator.verdicts import RegionState, RegionView, Transition, Verdict, VerdictState
from vantage.configfile import ConfigError
from vantage.results import FailureClass
from vantage_proto.v1 import query_pb2

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _transition(check: str, state: VerdictState, at: float) -> Transition:
    verdict = Verdict(
        check=check,
        state=state,
        since=at,
        regions={
            "eu": RegionView(
                RegionState.DOWN,
                down=2,
                failure=FailureClass.CONNECT_TIMEOUT,
                failing_agents=("eu-1", "eu-2"),
            ),
            "us": RegionView(RegionState.UP, up=2),
        },
        regions_down=("eu",),
        failure=FailureClass.CONNECT_TIMEOUT,
        reason="down in eu",
    )
    return Transition(check, VerdictState.UP, verdict, at)


def test_transitions_come_back_as_recorded_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "vantage.db"
    log = TransitionLog(TransitionStore.open(path))
    now = time.time()
    recorded = [
        log.append(_transition("web", VerdictState.REGIONAL, now)),
        log.append(Transition("db", None, Verdict("db", VerdictState.UNKNOWN, now), now)),
    ]
    log.store.close()

    reopened = TransitionLog(TransitionStore.open(path))
    assert reopened.last_id == 2
    assert reopened.recent() == recorded
    assert reopened.append(_transition("web", VerdictState.UP, now)).id == 3
    reopened.store.close()


def test_ids_go_on_after_retention_pruned_everything(tmp_path: Path) -> None:
    path = tmp_path / "vantage.db"
    clock = Clock()
    log = TransitionLog(TransitionStore.open(path, clock=clock))
    for _ in range(3):
        log.append(_transition("web", VerdictState.GLOBAL, clock.now))
    log.store.close()

    clock.now += 31 * DAY
    store = TransitionStore.open(path, clock=clock)  # prunes at open
    assert store.oldest_id() is None
    assert TransitionLog(store).append(_transition("web", VerdictState.UP, clock.now)).id == 4
    store.close()


def test_retention_prunes_whole_id_prefixes() -> None:
    clock = Clock()
    store = TransitionStore.open(None, retention=DAY, clock=clock)
    log = TransitionLog(store)
    start = clock.now
    for hours in range(48):
        log.append(_transition("web", VerdictState.GLOBAL, start + hours * 3600))
    clock.now = start + 47 * 3600
    assert store.prune() == 23  # older than a day: hours 0..22
    assert store.oldest_id() == 24
    assert [r.id for r in store.after(0, upto=log.last_id, limit=100)] == list(range(24, 49))


def test_in_memory_only_the_newest_transitions_are_kept() -> None:
    clock = Clock()
    store = TransitionStore.open(None, clock=clock, memory_rows=10)
    log = TransitionLog(store)
    for _ in range(25):
        log.append(_transition("web", VerdictState.GLOBAL, clock.now))
    assert store.prune() == 15  # all within the retention, but 15 past the bound
    assert [r.id for r in store.after(0, upto=log.last_id, limit=100)] == list(range(16, 26))
    assert log.append(_transition("web", VerdictState.UP, clock.now)).id == 26


def test_a_store_file_is_bounded_by_the_retention_alone(tmp_path: Path) -> None:
    clock = Clock()
    store = TransitionStore.open(tmp_path / "vantage.db", clock=clock, memory_rows=10)
    log = TransitionLog(store)
    for _ in range(25):
        log.append(_transition("web", VerdictState.GLOBAL, clock.now))
    assert store.prune() == 0
    assert store.oldest_id() == 1
    store.close()


async def test_the_store_prunes_periodically_while_running() -> None:
    clock = Clock()
    store = TransitionStore.open(None, retention=1.0, clock=clock)
    TransitionLog(store).append(_transition("web", VerdictState.GLOBAL, clock.now))
    clock.now += 10
    pruner = asyncio.create_task(store.run())
    try:
        await eventually(lambda: store.oldest_id() is None, "the pruner to drop the transition")
    finally:
        pruner.cancel()
    store.close()


def test_history_is_the_newest_of_the_range_oldest_first() -> None:
    store = TransitionStore.open(None)
    log = TransitionLog(store)
    start = time.time()
    for minute in range(10):
        log.append(_transition("web", VerdictState.GLOBAL, start + 60 * minute))
        log.append(_transition("db", VerdictState.GLOBAL, start + 60 * minute))
    kept, truncated = store.history("web", since=start + 120, until=start + 420, limit=3)
    assert [r.transition.at - start for r in kept] == [300, 360, 420]
    assert [r.transition.check for r in kept] == ["web"] * 3
    assert truncated
    everything, truncated = store.history("web", since=None, until=None, limit=100)
    assert len(everything) == 10
    assert not truncated
    assert store.knows("db")
    assert not store.knows("nope")


def test_a_burst_in_one_loop_iteration_is_one_commit(tmp_path: Path) -> None:
    """What makes a burst cheap: rows wait in one transaction until the loop turns."""

    async def burst() -> bool:
        store = TransitionStore.open(tmp_path / "vantage.db")
        log = TransitionLog(store)
        for _ in range(100):
            log.append(_transition("web", VerdictState.GLOBAL, time.time()))
        pending = store._db.in_transaction
        await asyncio.sleep(0)
        assert not store._db.in_transaction
        store.close()
        return pending

    assert asyncio.run(burst())
    store = TransitionStore.open(tmp_path / "vantage.db")
    assert store.last_id == 100
    store.close()


def _garbage(directory: Path) -> Path:
    path = directory / "vantage.db"
    path.write_bytes(b"this is no database, " * 200)
    return path


def _a_directory(directory: Path) -> Path:
    path = directory / "vantage.db"
    path.mkdir()
    return path


def _in_a_missing_directory(directory: Path) -> Path:
    return directory / "missing" / "vantage.db"


def _another_programs(directory: Path) -> Path:
    path = directory / "notes.db"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE notes (text)")
    other.commit()
    other.close()
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_garbage, "cannot use it: file is not a database"),
        (_a_directory, "cannot open: unable to open database file"),
        (_in_a_missing_directory, "cannot open: unable to open database file"),
        (_another_programs, "a SQLite database of another program"),
    ],
    ids=["garbage", "directory", "missing-directory", "other-program"],
)
def test_an_unusable_file_is_one_line_naming_it(
    tmp_path: Path, make: Callable[[Path], Path], expected: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as caught:
        TransitionStore.open(path)
    message = str(caught.value)
    assert message.startswith(f"store_file {path}: {expected}")
    assert "\n" not in message


def test_a_damaged_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vantage.db"
    log = TransitionLog(TransitionStore.open(path))
    for _ in range(2000):  # enough rows for several pages
        log.append(_transition("web", VerdictState.GLOBAL, time.time()))
    log.store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 3 * page + 512] = b"\xff" * 512  # scribble over a b-tree page
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=rf"^store_file {path}: "):
        TransitionStore.open(path)


def test_a_store_in_use_by_another_coordinator_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vantage.db"
    first = TransitionStore.open(path)
    with pytest.raises(ConfigError, match="in use by another process"):
        TransitionStore.open(path)
    first.close()
    TransitionStore.open(path).close()


def test_the_coordinator_refuses_an_unusable_store_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "garbage.db").write_bytes(b"\x00not sqlite" * 300)
    config = write_config(tmp_path, extra="store_file: garbage.db\n")
    result = subprocess.run(
        [sys.executable, "-m", "vantage", "coordinator", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"store_file {tmp_path / 'garbage.db'}: cannot use it: file is not a database" in (
        result.stderr
    )


async def test_history_and_ids_survive_a_coordinator_restart(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        extra="engine: {min_agents: 1, min_regions: 1, fail_after: 1, recover_after: 1,"
        " adaptive_confirmation: false}\nstore_file: state/vantage.db\n",
    )
    (tmp_path / "state").mkdir()
    async with start(config) as running:
        agent = running.agent()
        await agent.handshake()
        await agent.send_results([agent.result("web"), agent.result("db", success=False)])
        agent.close()
        before = await running.queries.GetHistory(query_pb2.GetHistoryRequest(check="db"))
    assert [t.verdict.state for t in before.transitions] == [
        query_pb2.VERDICT_STATE_GLOBAL,
        query_pb2.VERDICT_STATE_UNKNOWN,  # the agent went away
    ]
    assert (tmp_path / "state" / "vantage.db").exists()

    async with start(config) as running:
        after = await running.queries.GetHistory(query_pb2.GetHistoryRequest(check="db"))
        assert list(after.transitions) == list(before.transitions)
        last = running.coordinator.transitions.last_id
        # Another instance (a new spool): its sequence starts again at 1. The first one's
        # numbers are remembered (a replay of them would be dropped as duplicates).
        agent = running.agent(instance_id="instance-b")
        await agent.handshake()
        await agent.send_results([agent.result("db", success=False)])
        newest = await running.queries.GetHistory(query_pb2.GetHistoryRequest(check="db"))
        assert newest.transitions[-1].id == last + 1
        assert newest.transitions[-1].verdict.state == query_pb2.VERDICT_STATE_GLOBAL
        agent.close()
