"""The scheduler: runs every assigned check on its interval and queues the results.

Lifecycle: build a ``Scheduler`` around the outbox (the bounded queue the coordinator link
drains), ``apply`` assignments at any time, and run ``await scheduler.run()`` in the
agent's task group; cancelling it stops every check. Each check has one task in the
scheduler's own task group:

- The first run is jittered uniformly within one interval, so that a thousand checks
  assigned at once do not fire on the same tick; after that runs are fixed-rate, on a
  grid ``first + k * interval`` that does not drift with probe durations. A run that
  overruns its slot skips the slots it missed rather than piling up.
- A probe enforces its check's timeout itself; the scheduler adds a hard outer limit of
  timeout + grace as a safety net (reported as ``timeout``) and turns any exception from
  a probe into an ``internal`` result, logged with its traceback.
- Cost per run is what bounds an agent's probe rate, so the scheduler arms no timer of its
  own per run: the check loops wait on one shared ``_Timeline`` (a heap woken by a single
  timer), and the outer limit is enforced by a watchdog that looks at the probes in
  flight every ``LIMIT_CHECK_PERIOD`` (so a probe is cut off at most that much after
  timeout + grace).
- Admission control: at most ``max_in_flight`` probes run at once. A run due while that
  many are in flight is skipped (no result: the check simply was not probed) and counted
  (``skipped``), with a warning at most every ``SKIP_LOG_PERIOD``. Past the machine's
  capacity this keeps the probes that do run honest instead of letting every one of them
  time out in a saturated event loop.
- Results get the next sequence number of this scheduler (1, 2, 3, ...) when they enter
  the outbox, so the outbox, the link's buffer and the stream all carry them in sequence
  order: the coordinator's "everything at or below N" acknowledgements rely on that. When
  the outbox is full the result is dropped and counted (``dropped``); it takes no
  sequence number.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vantage.checks import AnyCheck
from vantage.durations import format_duration
from vantage.logs import get_logger
from vantage.results import FailureClass, ProbeOutcome, ProbeResult

from .probes import PROBES, ProbeFn

DEFAULT_GRACE = 1.0
DEFAULT_MAX_IN_FLIGHT = 2_000
SKIP_LOG_PERIOD = 10.0
# How often the watchdog looks for probes past their hard limit (timeout + grace).
LIMIT_CHECK_PERIOD = 0.1
# libuv's timers have millisecond resolution: a wake-up may come up to this early.
_TIMER_SLACK = 0.001


@dataclass(frozen=True, slots=True)
class Assignment:
    """A check to run, with the revision the coordinator gave it.

    Results carry ``revision`` so the coordinator can match them to the spec it sent;
    ``Assignment.of`` uses the check's own revision (for checks not from the wire).
    """

    check: AnyCheck
    revision: int

    @classmethod
    def of(cls, check: AnyCheck) -> Assignment:
        return cls(check, check.revision)

    @property
    def name(self) -> str:
        return self.check.name


class Scheduler:
    """Runs the current assignment set, one fixed-rate loop per check.

    ``apply`` may be called before or while ``run`` runs; loops start when both have
    happened. ``dropped`` counts results lost to a full outbox, ``skipped`` the runs not
    started because ``max_in_flight`` probes were running.
    """

    def __init__(
        self,
        outbox: asyncio.Queue[ProbeResult],
        *,
        agent: str,
        region: str,
        probes: Mapping[str, ProbeFn] = PROBES,
        grace: float = DEFAULT_GRACE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        rng: random.Random | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be positive, not {max_in_flight}")
        self._outbox = outbox
        self._probes = probes
        self._grace = grace
        self._max_in_flight = max_in_flight
        self._skipped = 0
        self._skipped_logged = 0
        self._skip_logged_at = -math.inf
        self._rng = rng or random.Random()
        self._log = get_logger("agent.scheduler").bind(agent=agent, region=region)
        self._assignments: dict[str, Assignment] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._next_seq = 1
        self._dropped = 0
        self._dropping = False
        self._timeline = _Timeline()
        # Check loops inside a probe, with the loop time of their hard limit; and those
        # the watchdog cancelled for overrunning it.
        self._running: dict[asyncio.Task[None], float] = {}
        self._cut_off: set[asyncio.Task[None]] = set()
        # Checked once: building a disabled debug line's fields costs per result.
        self._debug = self._log.is_enabled_for(logging.DEBUG)

    @property
    def dropped(self) -> int:
        """Results dropped because the outbox was full, since the scheduler was built."""
        return self._dropped

    @property
    def skipped(self) -> int:
        """Runs skipped because ``max_in_flight`` probes were running."""
        return self._skipped

    @property
    def assignments(self) -> Mapping[str, Assignment]:
        """The checks being run, by name."""
        return dict(self._assignments)

    def apply(self, full: bool, checks: Iterable[Assignment], removed: Iterable[str] = ()) -> None:
        """Change what runs.

        ``full``: ``checks`` is the whole set and anything else stops. Otherwise the
        checks are upserted and the ``removed`` names stop. An upsert with the revision
        already running changes nothing; a new revision restarts that check's loop (with
        a fresh jittered first run). A check whose type has no probe is logged and not
        run.
        """
        wanted: dict[str, Assignment] = {}
        for assignment in checks:
            wanted[assignment.name] = assignment
        stopping = set(removed)
        if full:
            stopping |= self._assignments.keys() - wanted.keys()
        for name in stopping - wanted.keys():
            self._stop(name)
        for name, assignment in wanted.items():
            current = self._assignments.get(name)
            if current is not None and current.revision == assignment.revision:
                continue
            self._stop(name)
            if assignment.check.type not in self._probes:
                self._log.warning(
                    "check skipped: no probe for its type",
                    check=name,
                    type=assignment.check.type,
                )
                continue
            self._assignments[name] = assignment
            self._start(assignment)

    async def run(self) -> None:
        """Run the assigned checks until cancelled; then every check loop is cancelled
        and awaited before this returns (by raising CancelledError)."""
        if self._group is not None:
            raise RuntimeError("the scheduler is already running")
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._timeline.run(), name="scheduler timeline")
                group.create_task(self._enforce_limits(), name="scheduler watchdog")
                self._group = group
                for assignment in self._assignments.values():
                    self._start(assignment)
                await asyncio.Event().wait()
        finally:
            self._group = None
            self._tasks.clear()
            self._running.clear()
            self._cut_off.clear()

    def _start(self, assignment: Assignment) -> None:
        if self._group is not None:
            self._tasks[assignment.name] = self._group.create_task(
                self._loop(assignment), name=f"check {assignment.name}"
            )

    def _stop(self, name: str) -> None:
        self._assignments.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()  # a cancelled child does not cancel the task group

    async def _loop(self, assignment: Assignment) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        interval = assignment.check.interval
        due = loop.time() + self._rng.uniform(0.0, interval)
        while True:
            await self._timeline.wait_until(due)
            await self._run_once(assignment, task, loop)
            due += interval
            late = loop.time() - due
            if late > 0:
                missed = math.ceil(late / interval)
                due += missed * interval
                if self._debug:
                    self._log.debug("run overran its slot", check=assignment.name, skipped=missed)

    async def _run_once(
        self, assignment: Assignment, task: asyncio.Task[None], loop: asyncio.AbstractEventLoop
    ) -> None:
        if len(self._running) >= self._max_in_flight:
            self._skip(assignment, loop)
            return
        check = assignment.check
        probe = self._probes[check.type]
        started_at = time.time()
        started = time.monotonic()
        self._running[task] = loop.time() + check.timeout + self._grace
        try:
            outcome = await probe(check)
        except asyncio.CancelledError:
            # Ours only if the watchdog cut the probe off and nobody else cancels the loop.
            if task not in self._cut_off or task.uncancel() > 0:
                raise
            outcome = self._overran(check)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and task in self._cut_off:
                outcome = self._overran(check)  # the probe turned our cancellation into this
            else:
                outcome = ProbeOutcome.failed(
                    FailureClass.INTERNAL, f"probe failed: {type(exc).__name__}: {exc}"
                )
                self._log.exception("probe raised", check=check.name)
        finally:
            del self._running[task]
            self._cut_off.discard(task)
        duration = time.monotonic() - started
        self._publish(assignment, started_at, duration, outcome)

    def _skip(self, assignment: Assignment, loop: asyncio.AbstractEventLoop) -> None:
        self._skipped += 1
        now = loop.time()
        if now - self._skip_logged_at >= SKIP_LOG_PERIOD:
            self._log.warning(
                "too many probes in flight: skipping runs",
                check=assignment.name,
                max_in_flight=self._max_in_flight,
                skipped=self._skipped - self._skipped_logged,
                skipped_total=self._skipped,
            )
            self._skip_logged_at = now
            self._skipped_logged = self._skipped

    def _overran(self, check: AnyCheck) -> ProbeOutcome:
        self._log.warning("probe overran its timeout", check=check.name)
        return ProbeOutcome.failed(
            FailureClass.TIMEOUT,
            f"probe did not finish within its timeout of {format_duration(check.timeout)}",
        )

    async def _enforce_limits(self) -> None:
        """Cancel every probe still running past its check's timeout + grace."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LIMIT_CHECK_PERIOD)
            now = loop.time()
            for task, limit in self._running.items():
                if limit <= now and task not in self._cut_off:
                    self._cut_off.add(task)
                    task.cancel()

    def _publish(
        self, assignment: Assignment, started_at: float, duration: float, outcome: ProbeOutcome
    ) -> None:
        result = ProbeResult(
            check=assignment.name,
            check_revision=assignment.revision,
            seq=self._next_seq,
            started_at=started_at,
            duration=duration,
            outcome=outcome,
        )
        try:
            self._outbox.put_nowait(result)
        except asyncio.QueueFull:
            self._dropped += 1
            if not self._dropping:
                self._dropping = True
                self._log.warning(
                    "outbox full: dropping results until the link catches up",
                    check=assignment.name,
                    dropped_total=self._dropped,
                )
            return
        self._next_seq += 1
        if self._dropping:
            self._dropping = False
            self._log.info("outbox has room again", dropped_total=self._dropped)
        if self._debug:
            self._log.debug(
                "probe result",
                check=assignment.name,
                seq=result.seq,
                success=outcome.success,
                failure=outcome.failure,
                duration=round(duration, 6),
                message=outcome.message,
            )


class _Timeline:
    """Wakes any number of waiters at their due times with a single timer.

    ``wait_until(when)`` returns a future that ``run()`` resolves once the loop clock
    reaches ``when``, give or take a millisecond (libuv's timer resolution). A waiter
    cancelled meanwhile is skipped. Waiters are kept in one slot per millisecond and only
    the slots go through a heap, so at thousands of runs a second a wake-up costs one
    timer and a heap operation per millisecond, not per run.
    """

    def __init__(self) -> None:
        self._slots: dict[int, list[asyncio.Future[None]]] = {}
        self._keys: list[int] = []  # heap of the slots' milliseconds
        self._alarm: asyncio.Future[None] | None = None
        self._alarm_key: float = math.inf

    def wait_until(self, when: float) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        key = math.ceil(when * 1000)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = []
            heapq.heappush(self._keys, key)
            alarm = self._alarm
            if key < self._alarm_key and alarm is not None and not alarm.done():
                alarm.set_result(None)  # due before the armed timer: re-arm earlier
        slot.append(waiter)
        return waiter

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        keys, slots = self._keys, self._slots
        while True:
            now = (loop.time() + _TIMER_SLACK) * 1000
            while keys and keys[0] <= now:
                for waiter in slots.pop(heapq.heappop(keys)):
                    if not waiter.done():
                        waiter.set_result(None)
            alarm = self._alarm = loop.create_future()
            handle = None
            if keys:
                self._alarm_key = keys[0]
                handle = loop.call_at(keys[0] / 1000, _ring, alarm)
            try:
                await alarm
            finally:
                self._alarm = None
                self._alarm_key = math.inf
                if handle is not None:
                    handle.cancel()


def _ring(alarm: asyncio.Future[None]) -> None:
    if not alarm.done():
        alarm.set_result(None)
