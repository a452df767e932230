"""A deterministic scenario simulator for the verdict engine.

The simulator drives ``coordinator.engine.VerdictEngine`` through its public API only, on
a simulated clock: a fleet of agents in regions probes a set of checks on their
schedules, faults make probes fail during time windows, and every result is folded in as
the coordinator would fold it. The same checks, fleet, faults and seed give the same
results in the same order, hence the same transitions, every run. No real time, no
threads, no asyncio: one ``random.Random`` and one event queue (``heapq``).

Model
-----

- Time is seconds since the simulation's start (``Simulator.now``); the engine's clock
  reads ``epoch + now``, so its timestamps look like wall-clock time.
- Every agent connects at 0 and probes every check once per interval, at a phase drawn at
  random in [0, interval) per (agent, check): the agents' jitter.
- A probe's outcome is decided when it starts: the first fault (in the order given) that
  fails a probe starting at that moment names the failure class. Its result arrives after
  the probe's duration: 2-40 ms for a success, 0.5-5 ms for a refused connection, the
  check's timeout for a timeout.
- A result arriving while its agent is disconnected is dropped and counted (the simulated
  agents do not spool); the engine only ever sees results from connected agents.
- ``tick()`` runs once per simulated second.
- After every engine call the simulator takes the engine's out-of-schedule probe requests
  (``take_requests()``): each named agent that is connected probes the check once more,
  0.05-0.2 s later (the trip to the agent), and its result is folded like any other. A
  request for a probe that is already pending is coalesced; one naming an unknown check or
  agent, or a disconnected agent, is ignored.
- Like the agent's scheduler (``agent/scheduler.py``), an agent runs at most two probes of
  a check at a time: the check's own run and one extra. A scheduled run starts as the
  check's own run; one that comes due while the own run is in flight (an earlier
  scheduled or requested one) is skipped (``overran``); the schedule itself never moves.
  A requested probe starts as the own run when there is none, else as the extra run
  beside it (``concurrent``: a second opinion does not wait for a scheduled probe to time
  out), and is not run when both are in flight (``busy``). So an agent's results for a
  check may arrive out of the order their probes started: a quick answer overtakes a
  probe that is timing out. All of these are counted in ``stats``.

Faults
------

Probe faults, each active on ``[start, end)`` (probe start times): ``GlobalOutage``,
``RegionalOutage``, ``AgentOutage`` (one agent, one check), ``AgentCutOff`` (one agent,
every check), ``RandomLoss`` (each probe of every agent fails with a probability) and
``Flapping`` (a target that alternates down and up). ``Disconnect`` takes an agent's
stream away on its window and brings it back at ``end``.

What it records: ``changes`` (every transition with its simulated time, unless
``keep_changes`` is false), ``change_counts`` (always), ``deliveries`` (every result
folded, when ``keep_deliveries``), ``impaired_log`` (after every engine call, or with
``watch_impaired`` false only after each ``tick()``, which is cheaper) and the counters
in ``stats``.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from coordinator.engine import VerdictEngine
from coordinator.judgement import EngineSettings
from coordinator.verdicts import ProbeNow, Transition, Verdict, VerdictState
from vantage.checks import AnyCheck, parse_check
from vantage.results import FailureClass, ProbeOutcome, ProbeResult

EPOCH = 1_800_000_000.0  # what the engine's clock reads at the simulation's start
REGION_NAMES = ("eu", "us", "ap", "sa", "af", "me", "oc", "cn")
INTERVAL = 2.0  # the generated checks' defaults, as in /work/shared/scenarios
TIMEOUT = 1.5
SECOND_OPINION_DELAY = (0.05, 0.2)  # seconds before an agent runs a requested probe

# Failure classes whose probe lasts the whole timeout; every other failure is quick.
_TIMEOUTS = frozenset(
    {FailureClass.CONNECT_TIMEOUT, FailureClass.TIMEOUT, FailureClass.DNS_TIMEOUT}
)
_SUCCESS = ProbeOutcome(success=True)
_FAILED = {
    failure: ProbeOutcome.failed(failure, f"simulated {failure}") for failure in FailureClass
}

# Event kinds. At equal times events run in the order they were queued.
_PROBE, _ASKED, _RESULT, _TICK, _CONNECT, _DISCONNECT = range(6)


# -- fleet and checks -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fleet:
    """Agents and their regions, in connection order."""

    members: tuple[tuple[str, str], ...]  # (agent, region)

    @classmethod
    def build(cls, regions: int = 3, per_region: int = 2) -> Fleet:
        """``regions`` regions (eu, us, ap, ...) of ``per_region`` agents (eu-1, eu-2...)."""
        if not 1 <= regions <= len(REGION_NAMES) or per_region < 1:
            raise ValueError(f"cannot build {regions} regions of {per_region} agents")
        return cls(
            tuple(
                (f"{region}-{number}", region)
                for region in REGION_NAMES[:regions]
                for number in range(1, per_region + 1)
            )
        )

    @classmethod
    def parse(cls, text: str) -> Fleet:
        """``"3x2"``: three regions of two agents."""
        regions, _, per_region = text.partition("x")
        return cls.build(int(regions), int(per_region))

    @property
    def agents(self) -> tuple[str, ...]:
        return tuple(agent for agent, _ in self.members)

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(region for _, region in self.members))

    def agents_in(self, region: str) -> tuple[str, ...]:
        return tuple(agent for agent, where in self.members if where == region)

    def region_of(self, agent: str) -> str:
        for name, region in self.members:
            if name == agent:
                return region
        raise KeyError(agent)

    def describe(self) -> str:
        sizes = Counter(region for _, region in self.members)
        if len(set(sizes.values())) == 1:
            return f"{len(sizes)}x{next(iter(sizes.values()))}"
        return ", ".join(f"{region}: {count}" for region, count in sizes.items())


def make_checks(count: int, interval: float = INTERVAL, timeout: float = TIMEOUT) -> list[AnyCheck]:
    """``count`` http checks c0000, c0001... on distinct targets in 198.18.0.0/15."""
    return [
        parse_check(
            {
                "name": f"c{index:04d}",
                "type": "http",
                "target": f"http://198.18.{index // 250}.{index % 250 + 1}/",
                "interval": interval,
                "timeout": timeout,
            }
        )
        for index in range(count)
    ]


# -- faults ---------------------------------------------------------------------------------


class ProbeFault(Protocol):
    """Something that makes some probes fail while it lasts."""

    @property
    def start(self) -> float: ...

    @property
    def end(self) -> float: ...

    def fails(
        self, agent: str, region: str, check: str, at: float, rng: random.Random
    ) -> FailureClass | None:
        """The failure class of ``agent``'s probe of ``check`` starting at ``at``, or None
        when this fault spares it."""
        ...


class _WindowFault:
    """A fault that fails, with ``failure``, every probe it ``hits`` that starts within
    [start, end)."""

    __slots__ = ()
    start: float
    end: float
    failure: FailureClass

    def hits(self, agent: str, region: str, check: str) -> bool:
        raise NotImplementedError

    def fails(
        self, agent: str, region: str, check: str, at: float, rng: random.Random
    ) -> FailureClass | None:
        if self.start <= at < self.end and self.hits(agent, region, check):
            return self.failure
        return None


@dataclass(frozen=True, slots=True)
class GlobalOutage(_WindowFault):
    """``check``'s target is down for every agent."""

    check: str
    start: float
    end: float
    failure: FailureClass = FailureClass.CONNECT_REFUSED

    def hits(self, agent: str, region: str, check: str) -> bool:
        return check == self.check


@dataclass(frozen=True, slots=True)
class RegionalOutage(_WindowFault):
    """``check``'s target is unreachable from every agent of ``region``."""

    check: str
    region: str
    start: float
    end: float
    failure: FailureClass = FailureClass.CONNECT_TIMEOUT

    def hits(self, agent: str, region: str, check: str) -> bool:
        return check == self.check and region == self.region


@dataclass(frozen=True, slots=True)
class AgentOutage(_WindowFault):
    """``check``'s target is unreachable from ``agent`` alone."""

    check: str
    agent: str
    start: float
    end: float
    failure: FailureClass = FailureClass.CONNECT_TIMEOUT

    def hits(self, agent: str, region: str, check: str) -> bool:
        return check == self.check and agent == self.agent


@dataclass(frozen=True, slots=True)
class AgentCutOff(_WindowFault):
    """``agent`` reaches no target at all, while its stream to the coordinator stays up."""

    agent: str
    start: float
    end: float
    failure: FailureClass = FailureClass.CONNECT_TIMEOUT

    def hits(self, agent: str, region: str, check: str) -> bool:
        return agent == self.agent


@dataclass(frozen=True, slots=True)
class RandomLoss:
    """Each probe of every agent fails with probability ``rate``, independently."""

    rate: float
    start: float = 0.0
    end: float = math.inf
    failure: FailureClass = FailureClass.CONNECT_TIMEOUT

    def fails(
        self, agent: str, region: str, check: str, at: float, rng: random.Random
    ) -> FailureClass | None:
        if self.start <= at < self.end and rng.random() < self.rate:
            return self.failure
        return None


@dataclass(frozen=True, slots=True)
class Flapping:
    """``check``'s target goes down at ``toggles[0]``, up at ``toggles[1]``, down at
    ``toggles[2]``... and stays up from the last toggle on."""

    check: str
    toggles: tuple[float, ...]
    failure: FailureClass = FailureClass.CONNECT_REFUSED

    @property
    def start(self) -> float:
        return self.toggles[0]

    @property
    def end(self) -> float:
        return self.toggles[-1]

    @classmethod
    def build(
        cls,
        check: str,
        start: float,
        intervals: int,
        rng: random.Random,
        interval: float = INTERVAL,
        failure: FailureClass = FailureClass.CONNECT_REFUSED,
    ) -> Flapping:
        """Flapping for ``intervals`` intervals from ``start``, each down or up spell one or
        two intervals long (the last one cut to fit)."""
        end = start + intervals * interval
        toggles = [start]
        while toggles[-1] < end:
            toggles.append(min(end, toggles[-1] + rng.choice((1, 2)) * interval))
        return cls(check, tuple(toggles), failure)

    def fails(
        self, agent: str, region: str, check: str, at: float, rng: random.Random
    ) -> FailureClass | None:
        # Odd positions are inside a down spell: toggles[0] <= at < toggles[1] and so on.
        if (
            check == self.check
            and self.start <= at < self.end
            and bisect.bisect_right(self.toggles, at) % 2 == 1
        ):
            return self.failure
        return None


@dataclass(frozen=True, slots=True)
class Disconnect:
    """``agent``'s stream to the coordinator is down from ``start`` until ``end``."""

    agent: str
    start: float
    end: float = math.inf


Fault = GlobalOutage | RegionalOutage | AgentOutage | AgentCutOff | RandomLoss | Flapping


# -- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """A transition the engine returned, at simulated time ``at``."""

    at: float
    check: str
    previous: VerdictState | None
    state: VerdictState
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Delivery:
    """A result folded into the engine at ``at``; the probe started at ``started``."""

    at: float
    started: float
    agent: str
    result: ProbeResult
    fault: ProbeFault | None  # what failed the probe; None for a success
    asked: bool  # an out-of-schedule probe the engine requested


@dataclass
class Stats:
    """Counters of what happened to results and out-of-schedule probe requests."""

    results: int = 0  # folded into the engine
    dropped: int = 0  # arrived while the agent was disconnected
    requested: int = 0  # (check, agent) probes asked for by take_requests()
    honoured: int = 0  # of those, passed on to the agent
    coalesced: int = 0  # of those, already pending
    ignored: int = 0  # of those, for an unknown check or agent, or a disconnected agent
    busy: int = 0  # honoured requests not run: two probes of the check were in flight
    concurrent: int = 0  # honoured requests run beside a probe of the check in flight
    overran: int = 0  # scheduled runs skipped: the check's own run was still in flight


@dataclass(frozen=True, slots=True)
class _Spec:
    interval: float
    timeout: float
    revision: int


# -- the simulator --------------------------------------------------------------------------


class Simulator:
    """One engine, one fleet, one check set and a list of faults on a simulated clock.

    Construction sets the checks and connects every agent at time 0; nothing else happens
    until ``run_until()``, which can be called repeatedly with later times (sample the
    engine in between). Faults can be added with ``add()`` while running, as long as they
    start no earlier than ``now``.
    """

    def __init__(
        self,
        checks: Sequence[AnyCheck],
        fleet: Fleet | None = None,
        faults: Iterable[ProbeFault | Disconnect] = (),
        *,
        seed: int | str = 0,
        settings: EngineSettings | None = None,
        epoch: float = EPOCH,
        keep_changes: bool = True,
        keep_deliveries: bool = False,
        watch_impaired: bool = True,
    ) -> None:
        self.fleet = fleet or Fleet.build()
        self.rng = random.Random(seed)
        self.epoch = epoch
        self.now = 0.0
        self.keep_changes = keep_changes
        self.keep_deliveries = keep_deliveries
        self.watch_impaired = watch_impaired
        self.changes: list[Change] = []
        self.change_counts: Counter[tuple[VerdictState | None, VerdictState]] = Counter()
        self.deliveries: list[Delivery] = []
        self.impaired_log: list[tuple[float, frozenset[str]]] = []
        self.stats = Stats()
        self._impaired: frozenset[str] = frozenset()
        self._faults: list[ProbeFault] = []
        self._specs = {
            check.name: _Spec(check.interval, check.timeout, check.revision) for check in checks
        }
        self._region = dict(self.fleet.members)
        self._connected = dict.fromkeys(self._region, False)
        self._seq = dict.fromkeys(self._region, 0)
        self._pending: set[tuple[str, str]] = set()  # (agent, check) requested, not started
        # (agent, check) with its own run in flight, and with an extra (requested) one.
        self._in_flight: set[tuple[str, str]] = set()
        self._extra: set[tuple[str, str]] = set()
        self._queue: list[tuple[float, int, int, str, str, Any]] = []
        self._order = itertools.count()

        self.engine = VerdictEngine(settings or EngineSettings(), self.clock)
        self._after(self.engine.set_checks(checks))
        for agent, region in self.fleet.members:
            self._connected[agent] = True
            self._after(self.engine.agent_connected(agent, region))
        for check in checks:
            for agent in self._region:
                self._push(self.rng.random() * check.interval, _PROBE, agent, check.name)
        self._push(1.0, _TICK)
        for fault in faults:
            self.add(fault)

    def clock(self) -> float:
        """The engine's clock: wall-clock seconds."""
        return self.epoch + self.now

    def add(self, fault: ProbeFault | Disconnect) -> None:
        """Add a fault; it acts on probes (or, for ``Disconnect``, the stream) from its
        start on. ValueError when it starts before ``now``."""
        if fault.start < self.now:
            raise ValueError(f"{fault!r} starts before now ({self.now})")
        if isinstance(fault, Disconnect):
            if fault.agent not in self._region:
                raise ValueError(f"no agent {fault.agent!r} in the fleet")
            self._push(fault.start, _DISCONNECT, fault.agent)
            if math.isfinite(fault.end):
                self._push(fault.end, _CONNECT, fault.agent)
        else:
            self._faults.append(fault)

    def run_until(self, until: float) -> None:
        """Process every event up to and including ``until``; then ``now`` is ``until``."""
        queue = self._queue
        pop = heapq.heappop
        while queue and queue[0][0] <= until:
            at, _, kind, agent, check, payload = pop(queue)
            self.now = at
            # Results and probe starts are nearly every event: dispatch them first.
            if kind == _RESULT:
                self._deliver(agent, check, payload)
            elif kind == _PROBE:
                self._probe(at, agent, check, scheduled=True)
            elif kind == _ASKED:
                self._probe(at, agent, check, scheduled=False)
            elif kind == _TICK:
                self._push(at + 1.0, _TICK)
                self._after(self.engine.tick(), tick=True)
            elif kind == _DISCONNECT:
                self._connected[agent] = False
                self._after(self.engine.agent_disconnected(agent))
            elif kind == _CONNECT:
                self._connected[agent] = True
                self._after(self.engine.agent_connected(agent, self._region[agent]))
        self.now = max(self.now, until)

    def verdict(self, check: str) -> Verdict:
        verdict = self.engine.verdict(check)
        if verdict is None:
            raise KeyError(check)
        return verdict

    def state(self, check: str) -> VerdictState:
        return self.verdict(check).state

    # -- internals ------------------------------------------------------------------------

    def _push(
        self, at: float, kind: int, agent: str = "", check: str = "", payload: Any = None
    ) -> None:
        heapq.heappush(self._queue, (at, next(self._order), kind, agent, check, payload))

    def _probe(self, at: float, agent: str, check: str, *, scheduled: bool) -> None:
        spec = self._specs[check]
        key = (agent, check)
        push, order, queue = heapq.heappush, self._order, self._queue
        if scheduled:
            push(queue, (at + spec.interval, next(order), _PROBE, agent, check, None))
        else:
            self._pending.discard(key)
        extra = key in self._in_flight
        if extra:
            if scheduled:
                self.stats.overran += 1
                return
            if key in self._extra:
                self.stats.busy += 1
                return
            self.stats.concurrent += 1
            self._extra.add(key)
        else:
            self._in_flight.add(key)
        rng = self.rng
        cause: ProbeFault | None = None
        failure: FailureClass | None = None
        if self._faults:
            region = self._region[agent]
            for fault in self._faults:
                failure = fault.fails(agent, region, check, at, rng)
                if failure is not None:
                    cause = fault
                    break
        if failure is None:
            outcome = _SUCCESS
            duration = 0.002 + rng.random() * 0.038
        else:
            outcome = _FAILED[failure]
            duration = spec.timeout if failure in _TIMEOUTS else 0.0005 + rng.random() * 0.0045
        payload = (at, duration, outcome, cause, not scheduled, extra)
        push(queue, (at + duration, next(order), _RESULT, agent, check, payload))

    def _deliver(self, agent: str, check: str, payload: Any) -> None:
        started, duration, outcome, cause, asked, extra = payload
        (self._extra if extra else self._in_flight).discard((agent, check))
        if not self._connected[agent]:
            self.stats.dropped += 1
            return
        seq = self._seq[agent] = self._seq[agent] + 1
        result = ProbeResult(
            check, self._specs[check].revision, seq, self.epoch + started, duration, outcome
        )
        self.stats.results += 1
        if self.keep_deliveries:
            self.deliveries.append(Delivery(self.now, started, agent, result, cause, asked))
        self._after(self.engine.observe(agent, result))

    def _after(self, transitions: list[Transition], *, tick: bool = False) -> None:
        """Record what an engine call returned, and honour what it now asks for."""
        for transition in transitions:
            state = transition.verdict.state
            self.change_counts[(transition.previous, state)] += 1
            if self.keep_changes:
                self.changes.append(
                    Change(
                        self.now, transition.check, transition.previous, state, transition.verdict
                    )
                )
        requests = self.engine.take_requests()
        if requests:
            self._ask(requests)
        if tick or self.watch_impaired:
            impaired = self.engine.impaired()
            if impaired != self._impaired:
                self._impaired = impaired
                self.impaired_log.append((self.now, impaired))

    def _ask(self, requests: list[ProbeNow]) -> None:
        low, high = SECOND_OPINION_DELAY
        for request in requests:
            for agent in request.agents:
                self.stats.requested += 1
                key = (agent, request.check)
                if (
                    request.check not in self._specs
                    or agent not in self._region
                    or not self._connected[agent]
                ):
                    self.stats.ignored += 1
                elif key in self._pending:
                    self.stats.coalesced += 1
                else:
                    self.stats.honoured += 1
                    self._pending.add(key)
                    delay = low + self.rng.random() * (high - low)
                    self._push(self.now + delay, _ASKED, agent, request.check)
