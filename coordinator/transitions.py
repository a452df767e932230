"""Recording verdict transitions: numbered, logged, counted and published to watchers.

Every ``Transition`` the engine returns goes through ``TransitionRecorder.record``:

1. ``TransitionLog`` gives it the next id (ids increase by one per recorded transition)
   and keeps it in its ``TransitionStore`` (``coordinator.store``): SQLite in
   ``store_file``, so the history and the ids survive a restart and ids keep increasing
   (replicas and MQTT consumers de-duplicate by id), or in memory without one.
2. One info log line names the check, the state, the previous state and the evidence.
3. ``vantage_verdict_transitions_total`` counts it.
4. ``TransitionFeed`` hands it to every watcher without blocking: each watcher has a
   bounded queue, and a watcher whose queue is full is cut off (it must re-list and watch
   again) rather than slowing down ingest or the other watchers.

Exceptions: ``WatcherOverflow`` (raised to a watcher that fell behind).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from vantage.logs import get_logger

from .metrics import CoordinatorMetrics
from .store import RecordedTransition, TransitionStore
from .verdicts import Transition

__all__ = [
    "RecordedTransition",
    "TransitionFeed",
    "TransitionLog",
    "TransitionRecorder",
    "Watcher",
    "WatcherOverflow",
]

log = get_logger("coordinator.transitions")

DEFAULT_WATCH_QUEUE = 1024
DEFAULT_RECENT = 1024


class TransitionLog:
    """Numbers transitions and keeps them in ``store`` (None: a new in-memory store).

    Ids go on from the highest the store has ever recorded. ``store`` is where the
    kept transitions are read back (history, the replay of a resumed watch).
    """

    def __init__(self, store: TransitionStore | None = None) -> None:
        self.store = store if store is not None else TransitionStore.open(None)
        self._last_id = self.store.last_id

    @property
    def last_id(self) -> int:
        """The id of the latest recorded transition (0: none ever)."""
        return self._last_id

    def append(self, transition: Transition) -> RecordedTransition:
        self._last_id += 1
        recorded = RecordedTransition(self._last_id, transition)
        self.store.add(recorded)
        return recorded

    def recent(self, limit: int = DEFAULT_RECENT) -> list[RecordedTransition]:
        """The newest ``limit`` kept transitions, oldest first."""
        return self.store.recent(limit)


class WatcherOverflow(Exception):
    """The watcher did not keep up: its queue filled and it was cut off."""


class Watcher:
    """One subscription to the feed: iterate it for transitions from subscription on
    (only those of ``checks``, when given).

    Iteration raises ``WatcherOverflow`` once the watcher has fallen ``capacity``
    transitions behind; it ends only once ``close``d (the coordinator is stopping). Use
    as a context manager so it is unsubscribed however the watching ends.
    """

    def __init__(
        self,
        feed: TransitionFeed,
        capacity: int,
        checks: frozenset[str] = frozenset(),
        *,
        counted: bool = True,
    ) -> None:
        self._feed = feed
        self.counted = counted
        self._queue: asyncio.Queue[RecordedTransition] = asyncio.Queue(maxsize=capacity)
        self._checks = checks
        self.overflowed = False
        self.closed = False
        self._woken = asyncio.Event()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._feed.unsubscribe(self)

    def close(self) -> None:
        """End the iteration cleanly once what is queued has been read (the coordinator
        is stopping)."""
        self.closed = True
        self._woken.set()

    def offer(self, recorded: RecordedTransition) -> bool:
        """Queue without blocking; False (and the watcher is cut off) when full."""
        if self.overflowed or self.closed:
            return False
        if self._checks and recorded.transition.check not in self._checks:
            return True
        try:
            self._queue.put_nowait(recorded)
        except asyncio.QueueFull:
            # No reader can be blocked on a full queue: the reader sees the flag when it
            # comes back for the next transition.
            self.overflowed = True
            return False
        self._woken.set()
        return True

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> RecordedTransition:
        if self.overflowed:
            raise WatcherOverflow(
                f"watcher fell {self._queue.maxsize} transitions behind and was cut off"
            )
        while self._queue.empty():
            if self.closed:
                raise StopAsyncIteration
            self._woken.clear()
            await self._woken.wait()
        return self._queue.get_nowait()


class TransitionFeed:
    """Fans recorded transitions out to watchers; publishing never blocks."""

    def __init__(self, metrics: CoordinatorMetrics, capacity: int = DEFAULT_WATCH_QUEUE) -> None:
        self._metrics = metrics
        self._capacity = capacity
        self._watchers: set[Watcher] = set()
        self._closed = False

    def subscribe(self, checks: frozenset[str] = frozenset(), *, counted: bool = True) -> Watcher:
        """A new watcher of every transition from now on (only ``checks``', when given).
        ``counted``: a client's watch, in ``vantage_watch_streams_*``; the coordinator's
        own watchers (the MQTT publisher) are not."""
        watcher = Watcher(self, self._capacity, checks, counted=counted)
        if self._closed and counted:
            watcher.close()
        self._watchers.add(watcher)
        if counted:
            self._metrics.watcher_opened()
        return watcher

    def close_watchers(self) -> int:
        """End every client's watch cleanly, now and from now on (the coordinator is
        stopping; the coordinator's own watchers go on); returns how many were open."""
        self._closed = True
        clients = [watcher for watcher in self._watchers if watcher.counted]
        for watcher in clients:
            watcher.close()
        return len(clients)

    def unsubscribe(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)
            if watcher.counted:
                self._metrics.watcher_closed()

    def publish(self, recorded: RecordedTransition) -> None:
        for watcher in list(self._watchers):
            if not watcher.offer(recorded):
                log.warning(
                    "verdict watcher cut off",
                    check=recorded.transition.check,
                    transition_id=recorded.id,
                    queue=self._capacity,
                )
                if watcher.counted:
                    self._metrics.watcher_overflowed()
                self.unsubscribe(watcher)


class TransitionRecorder:
    """The one way transitions leave the engine: numbered, logged, counted, published."""

    def __init__(
        self, log_: TransitionLog, feed: TransitionFeed, metrics: CoordinatorMetrics
    ) -> None:
        self.log = log_
        self.feed = feed
        self._metrics = metrics

    def record(self, transitions: Iterable[Transition], **cause: str) -> None:
        """Record each transition in order. ``cause`` (e.g. the ``agent`` and ``region``
        whose result or disconnect moved the verdict) is added to the log line."""
        for transition in transitions:
            recorded = self.log.append(transition)
            verdict = transition.verdict
            log.info(
                "verdict changed",
                check=transition.check,
                state=verdict.state.value,
                previous=None if transition.previous is None else transition.previous.value,
                regions_down=list(verdict.regions_down),
                failure=None if verdict.failure is None else verdict.failure.value,
                reason=verdict.reason,
                transition_id=recorded.id,
                **cause,
            )
            self._metrics.transition(transition.check, verdict.state)
            self.feed.publish(recorded)
