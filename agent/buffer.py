"""The agent's one store of results on their way to the coordinator.

The scheduler adds every result here as it finishes (``add``, numbered by ``next_seq``);
the link reads them (``take_unsent``) and they stay until the coordinator acknowledges
them (``ResultAck`` or ``Welcome.last_seq``), so that results sent on a stream that then
broke are sent again, in order, on the next one. Connected or not, there is one bound and
one drop policy: when full, the oldest result is dropped and counted (``dropped``); new
results always get in, since they are what the live verdict needs.

``ResultStore`` is what the scheduler and the link rely on; ``ResultBuffer`` keeps it in
memory (a memory-only agent, ``vantage agent --no-spool``, and tests), ``agent.spool.Spool``
keeps the unacknowledged results on disk.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from vantage.results import ProbeResult


class ResultStore(Protocol):
    """Unacknowledged results in sequence order, between the scheduler (``add``) and the
    coordinator link (everything else). Single consumer."""

    @property
    def next_seq(self) -> int:
        """The number the next result added must carry."""

    @property
    def dropped(self) -> int:
        """Results dropped so far (the store was full), never delivered."""

    @property
    def in_flight(self) -> int:
        """Results sent on the current stream and not yet acknowledged."""

    @property
    def unsent(self) -> int:
        """Results waiting to be sent on the current stream."""

    def __len__(self) -> int: ...

    def add(self, result: ProbeResult) -> bool:
        """Append a result numbered ``next_seq``; False when the oldest result had to be
        dropped for it (a store that drops later, as the spool does when it writes,
        returns True and logs its drops itself)."""

    def take_unsent(self, limit: int) -> list[ProbeResult]:
        """Up to ``limit`` of the oldest unsent results, now counted as in flight."""

    def ack(self, seq: int) -> int:
        """Forget every result at or below ``seq``; returns how many were forgotten."""

    def rewind(self) -> None:
        """A new stream: everything unacknowledged is unsent again, oldest first."""

    async def wait_unsent(self, at_least: int, deadline: float) -> bool:
        """Wait until ``at_least`` results are unsent (True) or the loop clock reaches
        ``deadline`` (False)."""


class ResultBuffer:
    """Unacknowledged results in sequence order, split into in-flight (sent on the
    current stream) and unsent. ``next_seq`` is the number the next result must carry.

    Single consumer: one sender at a time may wait in ``wait_unsent``.
    """

    def __init__(self, capacity: int, next_seq: int = 1) -> None:
        if capacity < 1:
            raise ValueError("a result buffer holds at least one result")
        self._capacity = capacity
        self.next_seq = next_seq
        self._in_flight: deque[ProbeResult] = deque()
        self._unsent: deque[ProbeResult] = deque()
        self._grew = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._in_flight) + len(self._unsent)

    @property
    def in_flight(self) -> int:
        """Results sent on the current stream and not yet acknowledged."""
        return len(self._in_flight)

    @property
    def unsent(self) -> int:
        """Results waiting to be sent on the current stream."""
        return len(self._unsent)

    def add(self, result: ProbeResult) -> bool:
        """Append a result numbered ``next_seq``; False when the oldest result had to be
        dropped for it."""
        if result.seq != self.next_seq:
            raise ValueError(f"result numbered {result.seq}, expected {self.next_seq}")
        self.next_seq += 1
        kept_all = True
        if len(self) >= self._capacity:
            (self._in_flight or self._unsent).popleft()
            self.dropped += 1
            kept_all = False
        self._unsent.append(result)
        self._grew.set()
        return kept_all

    def take_unsent(self, limit: int) -> list[ProbeResult]:
        """Up to ``limit`` of the oldest unsent results, now counted as in flight."""
        batch = [self._unsent.popleft() for _ in range(min(limit, len(self._unsent)))]
        self._in_flight.extend(batch)
        return batch

    def ack(self, seq: int) -> int:
        """Forget every result at or below ``seq``; returns how many were forgotten."""
        forgotten = 0
        for queue in (self._in_flight, self._unsent):
            while queue and queue[0].seq <= seq:
                queue.popleft()
                forgotten += 1
        return forgotten

    def rewind(self) -> None:
        """A new stream: everything unacknowledged is unsent again, oldest first."""
        self._in_flight.extend(self._unsent)
        self._unsent = self._in_flight
        self._in_flight = deque()
        if self._unsent:
            self._grew.set()

    async def wait_unsent(self, at_least: int, deadline: float) -> bool:
        """Wait until ``at_least`` results are unsent (True) or the loop clock reaches
        ``deadline`` (False, unless they arrived just in time)."""
        return await wait_grown(self._grew, lambda: len(self._unsent), at_least, deadline)


async def wait_grown(
    grew: asyncio.Event, count: Callable[[], int], at_least: int, deadline: float
) -> bool:
    """Wait until ``count()`` reaches ``at_least`` (True), woken by ``grew``, or the loop
    clock reaches ``deadline`` (False, unless it got there just in time): the one wait
    both result stores give the link."""
    try:
        async with asyncio.timeout_at(deadline):
            while count() < at_least:
                grew.clear()
                await grew.wait()
    except TimeoutError:
        return count() >= at_least
    return True
