"""The agent fleet: every agent the coordinator has admitted, connected or not.

An agent is known by its name. Its record is created when its first authenticated stream
says Hello and then kept (connected or not) for the life of the process, so ``vantage
agents`` still lists an agent that went away. At most one stream per name is live: a new
stream with the same name replaces the old one, which is told to end.

Sequence numbers are kept per agent *instance* (an agent's spool: its id and numbering
survive the agent's restarts): a reconnect resumes after the highest number already
handled. The records survive the coordinator's own restarts through the store
(``AgentLedger``; restored as disconnected).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from .registry import CheckChange

# An agent keeps its instance id while its spool lives; a new spool (or a memory-only
# agent's restart) gets a new one. The last few are enough to recognise replays, and the
# bound keeps a flapping agent from growing the map without end.
INSTANCES_KEPT = 8


class AgentLink(Protocol):
    """The coordinator's side of one live agent stream, as the fleet sees it."""

    def assign(self, change: CheckChange) -> None:
        """Send an incremental change of the agent's assignments (never blocks)."""

    def recheck(self, checks: Sequence[str]) -> None:
        """Ask the agent to probe these checks now, out of schedule (never blocks)."""

    def end(self, reason: str) -> None:
        """Ask the stream to end; ``reason`` is one line for the agent and the log."""


@dataclass(frozen=True, slots=True)
class AgentHello:
    """Who an agent says it is, validated by the servicer."""

    name: str
    region: str
    version: str = ""
    capabilities: tuple[str, ...] = ()
    instance_id: str = ""


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """A snapshot of one agent's record, for queries and metrics."""

    name: str
    region: str
    version: str
    capabilities: tuple[str, ...]
    instance_id: str
    connected: bool
    connected_since: float | None  # wall-clock seconds; None while disconnected
    last_seen: float  # wall-clock seconds of the last message from the agent
    results_received: int
    impaired: bool = False  # judged by the verdict engine (see AgentFleet.agents)
    # As the agent last reported them (AgentCounters), cumulative: results its spool
    # dropped when full, runs its scheduler skipped as overloaded.
    results_dropped: int = 0
    runs_skipped: int = 0
    # Results that arrived older than their check's staleness window (replayed from the
    # spool after an outage): in history and failure counts, not in the live verdict.
    results_late: int = 0


@dataclass(frozen=True, slots=True)
class AgentLedger:
    """What the coordinator keeps of an agent across its own restarts (the store's
    ``agents`` table): who it is, what it reported, and the highest sequence number
    handled per instance, so that a replay after a restart is still recognised."""

    hello: AgentHello
    last_seen: float
    results_received: int
    results_dropped: int
    runs_skipped: int
    results_late: int
    last_seq: tuple[tuple[str, int], ...]  # (instance id, seq), oldest instance first


@dataclass(slots=True)
class _AgentRecord:
    hello: AgentHello
    connected_since: float | None
    last_seen: float
    link: AgentLink | None
    results_received: int = 0
    results_dropped: int = 0
    runs_skipped: int = 0
    results_late: int = 0
    last_seq: OrderedDict[str, int] = field(default_factory=OrderedDict)


class AgentFleet:
    """Agent records by name. Single-threaded: call from the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._agents: dict[str, _AgentRecord] = {}

    def connect(self, hello: AgentHello, link: AgentLink) -> AgentLink | None:
        """Make ``link`` the agent's live stream; returns the stream it replaced, if any.

        The replaced stream is told to end here; its own disconnect later is a no-op.
        """
        now = self._clock()
        record = self._agents.get(hello.name)
        if record is None:
            self._agents[hello.name] = _AgentRecord(hello, now, now, link)
            return None
        replaced = record.link
        record.hello = hello
        record.link = link
        record.connected_since = now
        record.last_seen = now
        if replaced is not None:
            replaced.end(f"replaced by a newer stream of agent {hello.name!r}")
        return replaced

    def disconnect(self, name: str, link: AgentLink) -> bool:
        """Mark the agent disconnected if ``link`` is still its live stream.

        False when the stream had been replaced (the agent stays connected on the new one).
        """
        record = self._agents.get(name)
        if record is None or record.link is not link:
            return False
        record.link = None
        record.connected_since = None
        return True

    def seen(self, name: str) -> None:
        record = self._agents.get(name)
        if record is not None:
            record.last_seen = self._clock()

    def last_seq(self, name: str, instance_id: str) -> int:
        """Highest sequence number handled for this agent instance (0: none yet)."""
        record = self._agents.get(name)
        return 0 if record is None else record.last_seq.get(instance_id, 0)

    def advance_seq(self, name: str, instance_id: str, seq: int) -> None:
        """Record that everything up to ``seq`` of this instance has been handled."""
        record = self._agents[name]
        seqs = record.last_seq
        seqs[instance_id] = max(seq, seqs.get(instance_id, 0))
        seqs.move_to_end(instance_id)
        while len(seqs) > INSTANCES_KEPT:
            seqs.popitem(last=False)

    def count_result(self, name: str, count: int = 1, late: int = 0) -> None:
        """``count`` results of the agent ingested, ``late`` of them too old for the live
        verdict."""
        record = self._agents[name]
        record.results_received += count
        record.results_late += late

    def report(self, name: str, results_dropped: int, runs_skipped: int) -> None:
        """The agent's own counters, as its latest batch or heartbeat carried them."""
        record = self._agents.get(name)
        if record is not None:
            record.results_dropped = results_dropped
            record.runs_skipped = runs_skipped

    def ledger(self, name: str) -> AgentLedger:
        record = self._agents[name]
        return AgentLedger(
            hello=record.hello,
            last_seen=record.last_seen,
            results_received=record.results_received,
            results_dropped=record.results_dropped,
            runs_skipped=record.runs_skipped,
            results_late=record.results_late,
            last_seq=tuple(record.last_seq.items()),
        )

    def restore(self, ledgers: Iterable[AgentLedger]) -> None:
        """Know these agents again, as disconnected (a restarted coordinator's fleet):
        listed by ``vantage agents``, their replays recognised when they reconnect.
        Agents already known are left as they are."""
        for ledger in ledgers:
            if ledger.hello.name in self._agents:
                continue
            self._agents[ledger.hello.name] = _AgentRecord(
                ledger.hello,
                connected_since=None,
                last_seen=ledger.last_seen,
                link=None,
                results_received=ledger.results_received,
                results_dropped=ledger.results_dropped,
                runs_skipped=ledger.runs_skipped,
                results_late=ledger.results_late,
                last_seq=OrderedDict(ledger.last_seq[-INSTANCES_KEPT:]),
            )

    def get(self, name: str) -> AgentInfo | None:
        record = self._agents.get(name)
        return None if record is None else _info(record)

    def agents(self, impaired: Collection[str] = ()) -> list[AgentInfo]:
        """Every known agent, sorted by name; those named in ``impaired`` (the engine's
        judgement, which the fleet does not make) marked so."""
        infos = [_info(self._agents[name]) for name in sorted(self._agents)]
        if impaired:
            infos = [replace(info, impaired=info.name in impaired) for info in infos]
        return infos

    def link(self, name: str) -> AgentLink | None:
        """The agent's live stream; None when it is not connected (or unknown)."""
        record = self._agents.get(name)
        return None if record is None else record.link

    def links(self) -> Iterator[AgentLink]:
        """The live stream of every connected agent."""
        return iter([record.link for record in self._agents.values() if record.link is not None])

    def connected_count(self) -> int:
        return sum(record.link is not None for record in self._agents.values())

    def connected_by_region(self) -> dict[str, int]:
        """Connected agents per region, with 0 for regions whose agents all left."""
        counts: dict[str, int] = {}
        for record in self._agents.values():
            region = record.hello.region
            counts[region] = counts.get(region, 0) + (record.link is not None)
        return counts


def _info(record: _AgentRecord) -> AgentInfo:
    hello = record.hello
    return AgentInfo(
        name=hello.name,
        region=hello.region,
        version=hello.version,
        capabilities=hello.capabilities,
        instance_id=hello.instance_id,
        connected=record.link is not None,
        connected_since=record.connected_since,
        last_seen=record.last_seen,
        results_received=record.results_received,
        results_dropped=record.results_dropped,
        runs_skipped=record.runs_skipped,
        results_late=record.results_late,
    )
