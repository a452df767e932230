"""The scheduler: runs every assigned check on its interval and stores the results.

Lifecycle: build a ``Scheduler`` around the agent's result store (``agent.buffer``, which
the coordinator link reads), ``apply`` assignments at any time, and run
``await scheduler.run()`` in the agent's task group; cancelling it stops every check:

- The first run is jittered uniformly within one interval, so that a thousand checks
  assigned at once do not fire on the same tick; after that runs are fixed-rate, on a
  grid ``first + k * interval`` that does not drift with probe durations. A run that
  overruns its slot skips the slots it missed rather than piling up.
- A probe enforces its check's timeout itself; the scheduler adds a hard outer limit of
  timeout + grace as a safety net (reported as ``timeout``) and turns any exception from
  a probe into an ``internal`` result, logged with its traceback.
- Cost per run is what bounds an agent's probe rate, so a run costs no task and no timer
  of the scheduler's own: runs are started by callbacks of one shared ``Timeline`` (a
  heap woken by a single timer); a probe with a launcher (``agent.probes.launch``) runs
  on loop callbacks and only the others get a task per run; the outer limit is enforced
  by a watchdog that looks at the runs in flight every ``LIMIT_CHECK_PERIOD`` (so a
  probe is cut off at most that much after timeout + grace).
- Admission control: at most ``max_in_flight`` probes run at once. A run due while that
  many are in flight is skipped (no result: the check simply was not probed) and counted
  (``skipped``), with a warning at most every ``SKIP_LOG_PERIOD``. Past the machine's
  capacity this keeps the probes that do run honest instead of letting every one of them
  time out in a saturated event loop.
- Out of schedule: ``run_now`` (a second opinion the coordinator asked for) starts a run
  of each named check at once, beside its run in flight if there is one (a second opinion
  must not wait for a probe that is timing out), but never a third. The grid stays where
  it is, and the same admission control applies. So a quick answer can overtake a run
  that started earlier: results of one check are in the order they finished, not started.
- Results get the store's next sequence number (1, 2, 3, ..., continuing where the
  store left off) as they are stored, so the store and the stream carry them in sequence
  order: the coordinator's "everything at or below N" acknowledgements rely on that. A
  full store drops its oldest result and counts it (``ResultStore.dropped``), logged
  here once per spell.
"""

from __future__ import annotations

import asyncio
import functools
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

from .buffer import ResultStore
from .probes import LAUNCHERS, PROBES, ProbeFn
from .probes.launch import Abort, Launch, Prepare
from .probes.network import Timeline

DEFAULT_GRACE = 1.0
DEFAULT_MAX_IN_FLIGHT = 2_000
SKIP_LOG_PERIOD = 10.0
# How often the watchdog looks for probes past their hard limit (timeout + grace).
LIMIT_CHECK_PERIOD = 0.1


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
    """Runs the current assignment set, each check on its own fixed-rate grid.

    ``apply`` may be called before or while ``run`` runs; checks start when both have
    happened. ``skipped`` counts the runs not started because ``max_in_flight`` probes
    were running.
    """

    def __init__(
        self,
        results: ResultStore,
        *,
        agent: str,
        region: str,
        probes: Mapping[str, ProbeFn] = PROBES,
        launchers: Mapping[ProbeFn, Prepare] = LAUNCHERS,
        grace: float = DEFAULT_GRACE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        rng: random.Random | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be positive, not {max_in_flight}")
        self._results = results
        self._probes = probes
        self._launchers = launchers
        self._grace = grace
        self._max_in_flight = max_in_flight
        self._skipped = 0
        self._skipped_logged = 0
        self._skip_logged_at = -math.inf
        self._rng = rng or random.Random()
        self._log = get_logger("agent.scheduler").bind(agent=agent, region=region)
        self._slots: dict[str, _Slot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._group: asyncio.TaskGroup | None = None
        self._timeline: Timeline[_Slot] | None = None
        self._running: dict[_Run, None] = {}  # runs in flight, in start order
        self._dropping = False
        # Checked once: building a disabled debug line's fields costs per result.
        self._debug = self._log.is_enabled_for(logging.DEBUG)

    @property
    def skipped(self) -> int:
        """Runs skipped because ``max_in_flight`` probes were running."""
        return self._skipped

    @property
    def assignments(self) -> Mapping[str, Assignment]:
        """The checks being run, by name."""
        return {name: slot.assignment for name, slot in self._slots.items()}

    def apply(self, full: bool, checks: Iterable[Assignment], removed: Iterable[str] = ()) -> None:
        """Change what runs.

        ``full``: ``checks`` is the whole set and anything else stops. Otherwise the
        checks are upserted and the ``removed`` names stop. An upsert with the revision
        already running changes nothing; a new revision restarts that check (with a
        fresh jittered first run; a run in flight of the old one ends without a
        result). A check whose type has no probe is logged and not run.
        """
        wanted: dict[str, Assignment] = {}
        for assignment in checks:
            wanted[assignment.name] = assignment
        stopping = set(removed)
        if full:
            stopping |= self._slots.keys() - wanted.keys()
        for name in stopping - wanted.keys():
            self._stop(name)
        for name, assignment in wanted.items():
            current = self._slots.get(name)
            if current is not None and current.assignment.revision == assignment.revision:
                continue
            self._stop(name)
            probe = self._probes.get(assignment.check.type)
            if probe is None:
                self._log.warning(
                    "check skipped: no probe for its type",
                    check=name,
                    type=assignment.check.type,
                )
                continue
            prepare = self._launchers.get(probe)
            launch = prepare(assignment.check) if prepare is not None else None
            slot = self._slots[name] = _Slot(assignment, probe, launch)
            self._start(slot)

    def run_now(self, names: Iterable[str]) -> int:
        """Start one run of each named check at once, out of schedule; returns how many
        runs started.

        A check with a run in flight gets one *extra* run beside it, which leaves the run
        in flight the check's own (a slot due meanwhile still skips as an overrun); a check
        with an extra run in flight too is left to them, so at most two runs of a check
        are ever in flight. A name not assigned is ignored, and so is a name given twice.
        The check's grid does not move: its next run stays due when it was. Runs beyond
        ``max_in_flight`` are skipped and counted like scheduled ones. Before ``run`` has
        started, nothing runs.
        """
        loop = self._loop
        if loop is None or self._timeline is None:
            return 0
        now = loop.time()
        started = 0
        for name in dict.fromkeys(names):
            slot = self._slots.get(name)
            if slot is None:
                continue
            if slot.run is None:
                launched = self._launch(slot, now)
            elif slot.extra is None or slot.extra.over:
                launched = self._launch_extra(slot, now)
            else:
                launched = False  # two runs in flight already
            if launched:
                started += 1
        return started

    def _launch_extra(self, slot: _Slot, now: float) -> bool:
        """Start a run of ``slot``'s check beside its own run in flight, as the slot's
        extra run; True when it started."""
        own = slot.run
        if not self._launch(slot, now):
            return False
        # _launch made the new run the slot's own (or None if it is over already).
        slot.extra, slot.run = slot.run, own
        return True

    async def run(self) -> None:
        """Run the assigned checks until cancelled; then every run in flight is stopped
        (and its task awaited) before this returns (by raising CancelledError)."""
        if self._loop is not None:
            raise RuntimeError("the scheduler is already running")
        loop = self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._timeline = Timeline(loop, self._fire, self._log)
                try:
                    for slot in self._slots.values():
                        self._start(slot)
                    await self._enforce_limits(loop)
                finally:
                    self._timeline.close()
                    self._timeline = None
                    for run in list(self._running):
                        self._release(run)  # tasks are the group's to cancel
        finally:
            self._loop = None
            self._group = None
            self._running.clear()
            for slot in self._slots.values():
                slot.run = None

    def _start(self, slot: _Slot) -> None:
        if self._loop is None or self._timeline is None:
            return  # run() starts it
        slot.due = self._loop.time() + self._rng.uniform(0.0, slot.assignment.check.interval)
        self._timeline.call_at(slot.due, slot)

    def _stop(self, name: str) -> None:
        slot = self._slots.pop(name, None)
        if slot is None:
            return
        slot.stopped = True  # its next firing does nothing
        if slot.run is not None:
            self._release(slot.run)
        if slot.extra is not None:
            self._release(slot.extra)

    def _fire(self, slot: _Slot) -> None:
        """A check's slot is due: schedule the next one and start a run."""
        if slot.stopped:
            return
        loop, timeline = self._loop, self._timeline
        assert loop is not None
        assert timeline is not None
        check = slot.assignment.check
        interval = check.interval
        now = loop.time()
        due = slot.due + interval
        if due <= now:  # the loop was too busy to fire slots on time: skip them
            missed = math.ceil((now - due) / interval)
            due += missed * interval
            if self._debug:
                self._log.debug("slots missed", check=check.name, skipped=missed)
        slot.due = due
        timeline.call_at(due, slot)
        if slot.run is not None:
            if self._debug:
                self._log.debug("run overran its slot", check=check.name)
            return
        self._launch(slot, now)

    def _launch(self, slot: _Slot, now: float) -> bool:
        """Start a run of ``slot``'s check as its own run, if admission control lets it
        (otherwise it is skipped and counted); True when it started."""
        if len(self._running) >= self._max_in_flight:
            self._skip(slot, now)
            return False
        loop = self._loop
        assert loop is not None
        check = slot.assignment.check
        run = slot.run = _Run(slot, now + check.timeout + self._grace)
        self._running[run] = None
        if slot.launch is not None:
            try:
                run.abort = slot.launch(loop, functools.partial(self._ended, run))
            except Exception as exc:
                self._log.exception("probe raised", check=check.name)
                self._finished(run, _internal(exc))
        else:
            assert self._group is not None
            run.task = self._group.create_task(self._run_probe(run), name=f"check {check.name}")
        return True

    async def _run_probe(self, run: _Run) -> None:
        """A run of a probe without a launcher, in its own task."""
        check = run.slot.assignment.check
        task = run.task
        try:
            outcome = await run.slot.probe(check)
        except asyncio.CancelledError:
            # Ours only if the watchdog cut the probe off and nobody else cancels the run.
            if not run.cut_off or (task is not None and task.uncancel() > 0):
                raise
            outcome = self._overran(check)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and run.cut_off:
                outcome = self._overran(check)  # the probe turned our cancellation into this
            else:
                outcome = _internal(exc)
                self._log.exception("probe raised", check=check.name)
        self._finished(run, outcome)

    def _ended(self, run: _Run, outcome: ProbeOutcome) -> None:
        """A launched probe's outcome: it has released what it held, nothing to abort."""
        run.abort = None
        self._finished(run, outcome)

    def _finished(self, run: _Run, outcome: ProbeOutcome) -> None:
        """A run's outcome: publish it unless the run was stopped meanwhile."""
        if run.over:
            return
        duration = time.monotonic() - run.started
        self._release(run)
        self._publish(run.slot.assignment, run.started_at, duration, outcome)

    def _release(self, run: _Run) -> None:
        """Take ``run`` out of flight; a run not over yet is stopped without a result."""
        if not run.over:
            run.over = True
            if run.abort is not None:
                run.abort()
            elif run.task is not None and not run.cut_off:
                run.task.cancel()
        self._running.pop(run, None)
        if run.slot.run is run:
            run.slot.run = None

    def _skip(self, slot: _Slot, now: float) -> None:
        self._skipped += 1
        if now - self._skip_logged_at >= SKIP_LOG_PERIOD:
            self._log.warning(
                "too many probes in flight: skipping runs",
                check=slot.assignment.name,
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

    async def _enforce_limits(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cut off every run still going past its check's timeout + grace: a task is
        cancelled (and reports the overrun itself), a launched run is aborted."""
        while True:
            await asyncio.sleep(LIMIT_CHECK_PERIOD)
            now = loop.time()
            late = [run for run in self._running if run.limit <= now and not run.cut_off]
            for run in late:
                run.cut_off = True
                if run.task is not None:
                    run.task.cancel()
                else:
                    self._finished(run, self._overran(run.slot.assignment.check))

    def _publish(
        self, assignment: Assignment, started_at: float, duration: float, outcome: ProbeOutcome
    ) -> None:
        # Positional: keywords cost more, and this runs for every result.
        results = self._results
        result = ProbeResult(
            assignment.name, assignment.revision, results.next_seq, started_at, duration, outcome
        )
        if not results.add(result):
            if not self._dropping:
                self._dropping = True
                self._log.warning(
                    "too many unacknowledged results: dropping the oldest",
                    check=assignment.name,
                    dropped_total=results.dropped,
                )
        elif self._dropping:
            self._dropping = False
            self._log.info("result store has room again", dropped_total=results.dropped)
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


def _internal(exc: Exception) -> ProbeOutcome:
    return ProbeOutcome.failed(FailureClass.INTERNAL, f"probe failed: {type(exc).__name__}: {exc}")


class _Slot:
    """One assigned check: what runs it, its next due time and its runs in flight (its
    own and an extra one, asked for by ``run_now``)."""

    __slots__ = ("assignment", "due", "extra", "launch", "probe", "run", "stopped")

    def __init__(self, assignment: Assignment, probe: ProbeFn, launch: Launch | None) -> None:
        self.assignment = assignment
        self.probe = probe
        self.launch = launch
        self.due = 0.0
        self.run: _Run | None = None
        self.extra: _Run | None = None  # over once its outcome is in: look at .over
        self.stopped = False


class _Run:
    """One run in flight: when it started, its hard limit and how to stop it."""

    __slots__ = ("abort", "cut_off", "limit", "over", "slot", "started", "started_at", "task")

    def __init__(self, slot: _Slot, limit: float) -> None:
        self.slot = slot
        self.limit = limit
        self.started_at = time.time()
        self.started = time.monotonic()
        self.abort: Abort | None = None
        self.task: asyncio.Task[None] | None = None
        self.cut_off = False  # the watchdog stopped it
        self.over = False  # its outcome is in, or it was stopped
