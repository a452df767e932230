"""The coordinator's store: every recorded verdict transition, kept for
``history_retention``, and what a restarted coordinator resumes from.

SQLite (stdlib ``sqlite3``) in ``store_file``, or in memory when no file is configured.
Tables (schema version ``_SCHEMA_VERSION``, migrated in place at start, ``_MIGRATIONS``;
a file from newer code is refused with one line rather than misread):

- ``transitions``: the history, one row per transition.
- ``verdicts``: each check's latest verdict (written with its transition, so it outlives
  the history's retention): the starting point a restart restores, flagged unconfirmed.
- ``agents``: the fleet it knew, with each agent's counters and the highest sequence
  number handled per agent instance (``AgentLedger``), saved before a batch is
  acknowledged, so a replayed batch is recognised after a restart and never counted twice.

Without a file the history, the transition ids and the restore point start afresh with
each coordinator life, and at most the newest ``MEMORY_ROWS`` transitions are kept
(about 440 bytes each, so 44 MB at most, whatever the retention). With a file they
survive a restart: ids go on from the highest ever recorded, even when retention has
pruned every row, so replicas and MQTT consumers can keep de-duplicating transitions by id.

Lifecycle::

    store = TransitionStore.open(path, retention=RETENTION)   # ConfigError: one line
    store.add(recorded)       # on the event loop; cheap enough for the ingest path
    store.save_agent(ledger)  # the same, once per batch an agent sends
    store.latest(), store.agents()   # what a restart restores (coordinator.state)
    await store.run()         # prunes, every PRUNE_EVERY at most, what retention drops
    store.close()             # commits and releases the file

Cost on the ingest path (``tests/bench/bench_store.py`` measures it): ``add`` inserts into
an open transaction and the commit runs once per event-loop iteration (``call_soon``), so
a burst of transitions -- every check flipping at once -- pays one commit, not one per
transition. That commit is scheduled before anything the same iteration wakes up (a
watcher's send, an MQTT publish), so an id is in the file before anyone outside hears of
it: a crashed process cannot make the next one hand out an id already published. The
journal is WAL with ``synchronous=NORMAL``: a power cut may lose the last commits.

Reads (history, the replay of a resumed watch) run on the event loop too, a page at a
time. The file is locked for the store's life (exclusive locking mode): a second
coordinator on the same file refuses to start rather than interleave ids.

A file that cannot be opened, is not a SQLite database, belongs to another program or
fails its integrity check is one ``ConfigError`` line at start. A write that fails later
(disk full) is logged, naming the first transition missing from the history, and ingest
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vantage.configfile import ConfigError
from vantage.logs import get_logger
from vantage.results import FailureClass

from .fleet import AgentHello, AgentLedger
from .verdicts import RegionState, RegionView, Transition, Verdict, VerdictState

log = get_logger("coordinator.store")

RETENTION = 30 * 86400.0  # history_retention's default
PRUNE_EVERY = 3600.0  # at most; a tenth of the retention when that is shorter
# In memory, at most this many transitions are kept (the oldest go first), checked this
# often: without a file nothing but the retention would bound the coordinator's memory.
MEMORY_ROWS = 100_000
MEMORY_PRUNE_EVERY = 60.0
PRUNE_CHUNK = 2000  # rows deleted per statement, so a large prune never holds the loop long
_APPLICATION_ID = 0x56544731  # "VTG1": tells our files from other SQLite databases
_SCHEMA_VERSION = 2
# What each schema version adds, applied in order to a file of an older version (and all
# of them to a new file), inside the transaction that sets the version.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE transitions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the transition id; AUTOINCREMENT
                                                   -- keeps the highest ever used
            check_name TEXT NOT NULL,
            at REAL NOT NULL,                      -- wall-clock seconds
            previous TEXT,                         -- null for a check's first verdict
            state TEXT NOT NULL,
            verdict TEXT NOT NULL  -- the evidence, a JSON array (see _encode)
        )""",
        "CREATE INDEX transitions_check_at ON transitions (check_name, at)",
        "CREATE INDEX transitions_at ON transitions (at)",
        f"PRAGMA application_id = {_APPLICATION_ID}",
    ),
    # Version 2: what a restarted coordinator resumes from. Each check's latest verdict
    # (a transition's, so it outlives the history's retention), and the agents it knew
    # with the highest sequence number handled per agent instance.
    2: (
        """CREATE TABLE verdicts (
            check_name TEXT PRIMARY KEY,
            transition_id INTEGER NOT NULL,
            at REAL NOT NULL,
            previous TEXT,
            state TEXT NOT NULL,
            verdict TEXT NOT NULL
        ) WITHOUT ROWID""",
        """INSERT INTO verdicts SELECT check_name, id, at, previous, state, verdict
            FROM transitions WHERE id IN (SELECT max(id) FROM transitions GROUP BY check_name)""",
        """CREATE TABLE agents (
            name TEXT PRIMARY KEY,
            region TEXT NOT NULL,
            version TEXT NOT NULL,
            capabilities TEXT NOT NULL,  -- JSON array
            instances TEXT NOT NULL,     -- JSON array of [instance id, last seq], oldest first
            last_seen REAL NOT NULL,
            results_received INTEGER NOT NULL,
            results_dropped INTEGER NOT NULL,
            runs_skipped INTEGER NOT NULL,
            results_late INTEGER NOT NULL
        ) WITHOUT ROWID""",
    ),
}
_COLUMNS = "id, check_name, at, previous, state, verdict"
_SIX = "?, ?, ?, ?, ?, ?"
_VERDICT_COLUMNS = "transition_id, check_name, at, previous, state, verdict"
_AGENT_COLUMNS = (
    "name, region, version, capabilities, instances, last_seen, results_received, "
    "results_dropped, runs_skipped, results_late"
)
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps makes one a call


@dataclass(frozen=True, slots=True)
class RecordedTransition:
    """A transition with the id the coordinator gave it."""

    id: int
    transition: Transition


class TransitionStore:
    """Recorded transitions in SQLite, newest ``retention`` seconds of them.

    Single-threaded: call from the event loop only (or with no loop running, as tests
    and the coordinator's constructor do; then every ``add`` commits at once).
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        where: str,
        *,
        retention: float,
        clock: Callable[[], float],
        max_rows: int | None = None,
    ) -> None:
        self._db = connection
        self.where = where  # the file, or ":memory:"
        self.retention = retention
        self.max_rows = max_rows  # None: only the retention bounds what is kept
        self._clock = clock
        self._commit_scheduled = False
        self._first_uncommitted: int | None = None
        self._failing = False
        self._closed = False
        self.last_id = _last_id(connection)

    @classmethod
    def open(
        cls,
        path: Path | None,
        *,
        retention: float = RETENTION,
        clock: Callable[[], float] = time.time,
        memory_rows: int = MEMORY_ROWS,
    ) -> TransitionStore:
        """Open (creating when absent) the store in ``path``; None: in memory, keeping
        at most ``memory_rows`` transitions.

        Prunes what the retention drops before returning. ``ConfigError`` (one line
        naming the file) when it cannot be used.
        """
        where = ":memory:" if path is None else str(path)
        try:
            # isolation_level=None: transactions are ours (BEGIN/COMMIT), not the module's.
            connection = sqlite3.connect(where, isolation_level=None, timeout=0.1)
        except sqlite3.Error as exc:
            raise ConfigError(f"store_file {where}: cannot open: {_why(exc)}") from None
        try:
            _prepare(connection, where)
            max_rows = memory_rows if path is None else None
            store = cls(connection, where, retention=retention, clock=clock, max_rows=max_rows)
            store.prune()
        except sqlite3.Error as exc:
            connection.close()
            raise ConfigError(f"store_file {where}: cannot use it: {_why(exc)}") from None
        except ConfigError:
            connection.close()
            raise
        return store

    # -- writing ----------------------------------------------------------------------------

    def add(self, recorded: RecordedTransition) -> None:
        """Keep ``recorded`` (and make it its check's latest verdict); committed at the
        end of this event-loop iteration."""
        transition = recorded.transition
        row = (
            recorded.id,
            transition.check,
            transition.at,
            None if transition.previous is None else transition.previous.value,
            transition.verdict.state.value,
            _encode(transition.verdict),
        )
        if self._write(
            (f"INSERT INTO transitions ({_COLUMNS}) VALUES ({_SIX})", row),
            (f"INSERT OR REPLACE INTO verdicts ({_VERDICT_COLUMNS}) VALUES ({_SIX})", row),
            first=recorded.id,
        ):
            self.last_id = max(self.last_id, recorded.id)

    def save_agent(self, ledger: AgentLedger) -> None:
        """Keep what is known of an agent, replacing what was; committed with the rest at
        the end of this event-loop iteration, so before the acknowledgement of the batch
        that moved its sequence number goes out."""
        hello = ledger.hello
        self._write(
            (
                f"INSERT OR REPLACE INTO agents ({_AGENT_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    hello.name,
                    hello.region,
                    hello.version,
                    _ENCODER.encode(hello.capabilities),
                    _ENCODER.encode(ledger.last_seq),
                    ledger.last_seen,
                    ledger.results_received,
                    ledger.results_dropped,
                    ledger.runs_skipped,
                    ledger.results_late,
                ),
            ),
        )

    def forget_verdicts(self, checks: Collection[str]) -> None:
        """Checks that left the check set: a later check of the same name starts afresh."""
        if checks:
            self._write(
                (
                    f"DELETE FROM verdicts WHERE check_name IN ({', '.join('?' * len(checks))})",
                    tuple(checks),
                )
            )

    def _write(self, *statements: tuple[str, tuple[Any, ...]], first: int | None = None) -> bool:
        """Run ``statements`` in the open transaction (begun if none is) and see that it
        commits at the end of this event-loop iteration; False when the write failed
        (logged). ``first``: the transition id the failure log names."""
        if self._closed:
            return False
        try:
            if not self._db.in_transaction:
                self._db.execute("BEGIN")
                self._first_uncommitted = first
            elif self._first_uncommitted is None:
                self._first_uncommitted = first
            for sql, parameters in statements:
                self._db.execute(sql, parameters)
        except sqlite3.Error as exc:
            self._failed(exc, first if first is not None else self._first_uncommitted)
            return False
        if not self._commit_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return True
            self._commit_scheduled = True
            loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Commit what ``add`` has written (it is called for you; this is for tests and
        shutdown)."""
        self._commit_scheduled = False
        if self._closed or not self._db.in_transaction:
            return
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc, self._first_uncommitted)
            return
        if self._failing:
            self._failing = False
            log.info("transition store writes work again", store=self.where)

    def _failed(self, exc: sqlite3.Error, first_missing: int | None) -> None:
        if self._db.in_transaction:
            # SQLite may have rolled back already; then there is nothing else to undo.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
        if not self._failing:
            self._failing = True
            log.error(
                "transition store write failed; the history misses transitions from here",
                store=self.where,
                error=_why(exc),
                first_missing_id=first_missing,
            )

    def prune(self) -> int:
        """Delete what is older than the retention, and in memory the oldest past
        ``max_rows``, by whole id prefixes (so what is kept is always every transition
        after some id). Returns how many rows went."""
        return sum(self._prune_steps())

    async def run(self) -> None:
        """Prune periodically until cancelled, yielding between chunks."""
        every = min(PRUNE_EVERY, max(1.0, self.retention / 10))
        if self.max_rows is not None:
            every = min(every, MEMORY_PRUNE_EVERY)
        while True:
            await asyncio.sleep(every)
            for _ in self._prune_steps():
                await asyncio.sleep(0)

    def _prune_steps(self) -> Iterable[int]:
        if self._closed:
            return
        cutoff = self._clock() - self.retention
        try:
            row = self._db.execute(
                "SELECT max(id) FROM transitions WHERE at < ?", (cutoff,)
            ).fetchone()
            below = row[0]
            if self.max_rows is not None and self.last_id - self.max_rows > (below or 0):
                below = self.last_id - self.max_rows  # ids are consecutive: keep the newest
            if below is None:
                return
            while True:
                deleted = self._db.execute(
                    "DELETE FROM transitions WHERE id IN "
                    "(SELECT id FROM transitions WHERE id <= ? ORDER BY id LIMIT ?)",
                    (below, PRUNE_CHUNK),
                ).rowcount
                yield deleted
                if deleted < PRUNE_CHUNK:
                    break
        except sqlite3.Error as exc:
            log.error("transition store prune failed", store=self.where, error=_why(exc))

    def close(self) -> None:
        """Commit and release the file; later ``add`` calls are ignored."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._db.close()

    # -- reading ----------------------------------------------------------------------------

    def oldest_id(self) -> int | None:
        """The id of the oldest kept transition; None when none is kept."""
        value = self._db.execute("SELECT min(id) FROM transitions").fetchone()[0]
        return None if value is None else int(value)

    def knows(self, check: str) -> bool:
        """Whether any kept transition is of ``check``."""
        row = self._db.execute(
            "SELECT 1 FROM transitions WHERE check_name = ? LIMIT 1", (check,)
        ).fetchone()
        return row is not None

    def after(
        self, after_id: int, *, upto: int, limit: int, checks: Collection[str] = ()
    ) -> list[RecordedTransition]:
        """Up to ``limit`` kept transitions with ``after_id < id <= upto``, oldest first;
        only those of ``checks`` when given."""
        query = f"SELECT {_COLUMNS} FROM transitions WHERE id > ? AND id <= ?"
        parameters: list[Any] = [after_id, upto]
        if checks:
            query += f" AND check_name IN ({', '.join('?' * len(checks))})"
            parameters.extend(checks)
        query += " ORDER BY id LIMIT ?"
        parameters.append(limit)
        return [_decode(row) for row in self._db.execute(query, parameters)]

    def history(
        self, check: str, *, since: float | None, until: float | None, limit: int
    ) -> tuple[list[RecordedTransition], bool]:
        """The newest ``limit`` kept transitions of ``check`` with ``since <= at <=
        until`` (None: unbounded), oldest first, and whether more were in the range."""
        query = f"SELECT {_COLUMNS} FROM transitions WHERE check_name = ?"
        parameters: list[Any] = [check]
        if since is not None:
            query += " AND at >= ?"
            parameters.append(since)
        if until is not None:
            query += " AND at <= ?"
            parameters.append(until)
        query += " ORDER BY id DESC LIMIT ?"
        parameters.append(limit + 1)
        rows = self._db.execute(query, parameters).fetchall()
        truncated = len(rows) > limit
        return [_decode(row) for row in reversed(rows[:limit])], truncated

    def latest(self) -> list[RecordedTransition]:
        """Each check's latest transition, whose verdict is the check's last known one
        (kept whatever the retention), in check-name order."""
        rows = self._db.execute(
            f"SELECT {_VERDICT_COLUMNS} FROM verdicts ORDER BY check_name"
        ).fetchall()
        return [_decode(row) for row in rows]

    def agents(self) -> list[AgentLedger]:
        """Every agent the store knows, by name."""
        ledgers: list[AgentLedger] = []
        for row in self._db.execute(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY name"):
            name, region, version, capabilities, instances, last_seen, *counts = row
            received, dropped, skipped, late = (int(count) for count in counts)
            ledgers.append(
                AgentLedger(
                    hello=AgentHello(
                        name=name,
                        region=region,
                        version=version,
                        capabilities=tuple(json.loads(capabilities)),
                        instance_id=(json.loads(instances) or [[""]])[-1][0],
                    ),
                    last_seen=float(last_seen),
                    results_received=received,
                    results_dropped=dropped,
                    runs_skipped=skipped,
                    results_late=late,
                    last_seq=tuple((str(i), int(seq)) for i, seq in json.loads(instances)),
                )
            )
        return ledgers

    def recent(self, limit: int) -> list[RecordedTransition]:
        """The newest ``limit`` kept transitions, oldest first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM transitions ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [_decode(row) for row in reversed(rows)]


def _prepare(connection: sqlite3.Connection, where: str) -> None:
    """Check the file is ours and whole, create the schema in a new one, lock it."""
    # Exclusive: the first write below takes the lock and keeps it until close.
    connection.execute("PRAGMA locking_mode = EXCLUSIVE")
    application_id = connection.execute("PRAGMA application_id").fetchone()[0]
    tables = connection.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
    ).fetchone()[0]
    if application_id != _APPLICATION_ID and (application_id != 0 or tables):
        raise ConfigError(f"store_file {where}: a SQLite database of another program")
    version = 0
    if application_id == _APPLICATION_ID:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise ConfigError(
                f"store_file {where}: store version {version} is newer than this "
                f"coordinator's ({_SCHEMA_VERSION}): run the newer coordinator"
            )
        problems = [row[0] for row in connection.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"]:
            raise ConfigError(f"store_file {where}: damaged: {problems[0]}")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("BEGIN IMMEDIATE")  # fails here on a read-only or locked file
    try:
        for step in range(version + 1, _SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step]:
                connection.execute(statement)
        if version and version < _SCHEMA_VERSION:
            log.info("store migrated", store=where, version=_SCHEMA_VERSION, was=version)
        # A write even when nothing is new: proves the file writable and takes the lock.
        connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _last_id(connection: sqlite3.Connection) -> int:
    row = connection.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'transitions'"
    ).fetchone()
    highest = connection.execute("SELECT max(id) FROM transitions").fetchone()[0]
    return max(int(row[0]) if row else 0, int(highest or 0))


def _why(exc: sqlite3.Error) -> str:
    text = str(exc)
    if text == "unable to open database file":
        text += " (does its directory exist, and is it a file?)"
    if text == "database is locked":
        text = "in use by another process (database is locked)"
    return text


def _encode(verdict: Verdict) -> str:
    """The evidence as a JSON array, ``[since, regions_down, failure, reason, regions]``
    with each region ``[name, state, up, down, stale, failure, failing_agents]`` and a
    failure null when none: positional, as that costs half the time of an object on the
    ingest path. (Enum values are str and encode as such.)"""
    regions = [
        [name, view.state, view.up, view.down, view.stale, view.failure, view.failing_agents]
        for name, view in verdict.regions.items()
    ]
    return _ENCODER.encode(
        [verdict.since, verdict.regions_down, verdict.failure, verdict.reason, regions]
    )


def _decode(row: tuple[Any, ...]) -> RecordedTransition:
    id_, check, at, previous, state, encoded = row
    since, regions_down, failure, reason, regions = json.loads(encoded)
    verdict = Verdict(
        check=check,
        state=VerdictState(state),
        since=float(since),
        regions={
            name: RegionView(
                state=RegionState(region_state),
                up=up,
                down=down,
                stale=stale,
                failure=_failure(region_failure),
                failing_agents=tuple(failing_agents),
            )
            for name, region_state, up, down, stale, region_failure, failing_agents in regions
        },
        regions_down=tuple(regions_down),
        failure=_failure(failure),
        reason=reason,
    )
    previous_state = None if previous is None else VerdictState(previous)
    return RecordedTransition(int(id_), Transition(check, previous_state, verdict, float(at)))


def _failure(value: str | None) -> FailureClass | None:
    return None if value is None else FailureClass(value)
