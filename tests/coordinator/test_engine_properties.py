"""Invariants of the verdict engine, over generated fleets, settings and event sequences.

Hypothesis draws a fleet (1-4 regions of 1-4 agents each), engine settings, one to three
checks and a sequence of events: rounds of results (everyone up, everyone failing, one
region failing, or any mix of failure classes), single results, the clock moving on by a
fraction of an interval, ticks, disconnects and reconnects (sometimes into another region)
-- and whether the caller answers the engine's second-opinion requests at once or never.
A ``Driver`` feeds them to an engine under a fake clock through its public API only, and
keeps its own account of the fleet from the events it fed -- who is connected where, when
each result arrived, when each check was last brought up to date -- so the tests can judge
the engine's verdicts and evidence after every step.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TypeAlias

import hypothesis
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from coordinator.engine import VerdictEngine
from coordinator.judgement import EngineSettings
from coordinator.verdicts import ProbeNow, RegionState, Transition, Verdict, VerdictState
from vantage.checks import AnyCheck, parse_check
from vantage.results import FailureClass, ProbeOutcome, ProbeResult

T0 = 1_800_000_000.0
REGIONS = ("eu", "us", "ap", "sa")
NEW_REGION = "af"  # a region no generated fleet has
CHECKS = ("web", "api", "db")
EXTRA = "extra"  # the agent the monotonicity test adds
FAILURES = (
    FailureClass.CONNECT_REFUSED,
    FailureClass.CONNECT_TIMEOUT,
    FailureClass.HTTP_STATUS,
    FailureClass.DNS_SERVFAIL,
)
# How bad a verdict is; ``unknown`` is not on the scale.
RANK = {
    VerdictState.UP: 0,
    VerdictState.DEGRADED: 1,
    VerdictState.LOCAL: 2,
    VerdictState.REGIONAL: 3,
    VerdictState.GLOBAL: 4,
}
# About 2 s a test, the file well under 20 s. No explain phase: it traces every line (slow
# before Python 3.12), and shrinking alone gives a readable failing case.
PROPERTY = settings(
    max_examples=150, deadline=None, phases=[p for p in Phase if p is not Phase.explain]
)
# Steps of the clock, as fractions of a check's interval: multiples of 1/4, so that with
# the intervals, timeouts and stale_intervals below every time is exact in binary floating
# point and results land exactly on the edge of a staleness window now and then.
FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.5)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSpec:
    name: str
    interval: float
    timeout: float

    def build(self) -> AnyCheck:
        return parse_check(
            {
                "name": self.name,
                "type": "http",
                "target": "http://example.org/",
                "interval": self.interval,
                "timeout": self.timeout,
            }
        )

    def window(self, config: EngineSettings) -> float:
        """The staleness window, computed as the module docstring defines it."""
        return config.stale_intervals * self.interval + self.timeout


@dataclass(frozen=True)
class Round:
    """Every connected fleet agent reports on ``check``, in fleet order. ``outcomes`` has
    one entry per fleet agent: None for a success, else the failure class."""

    check: str
    outcomes: tuple[FailureClass | None, ...]


@dataclass(frozen=True)
class Report:
    """One result from one agent (skipped while the agent is disconnected)."""

    agent: str
    check: str
    failure: FailureClass | None


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class Disconnect:
    agent: str


@dataclass(frozen=True)
class Connect:
    """A (re)connect; ``region`` is usually the agent's own, sometimes another one."""

    agent: str
    region: str


Event: TypeAlias = Round | Report | Advance | Tick | Disconnect | Connect


@dataclass(frozen=True)
class Scenario:
    config: EngineSettings
    checks: tuple[CheckSpec, ...]
    fleet: tuple[tuple[str, str], ...]  # (agent, region), all connected at the start
    events: tuple[Event, ...]
    # Whether the caller relays the engine's second-opinion requests and the agents asked
    # answer at once; if not, nobody answers them, and episodes end by scheduled results,
    # deadlines (noticed by tick()) or changes in who counts.
    answers: bool = True

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(sorted({region for _, region in self.fleet}))


engine_settings = st.builds(
    EngineSettings,
    min_agents=st.integers(1, 5),
    min_regions=st.integers(1, 3),
    min_region_agents=st.integers(1, 3),
    fail_after=st.integers(1, 3),
    recover_after=st.integers(1, 3),
    stale_intervals=st.sampled_from((1.0, 1.5, 2.0, 3.0)),
    second_opinion=st.booleans(),
)
check_timings = st.tuples(st.sampled_from((10.0, 30.0, 60.0)), st.sampled_from((2.0, 5.0, 9.0)))
# Strategies drawn from inside the composites below are module constants or built from
# hashable arguments (which hypothesis caches): building fresh ones for every event would
# cost more than running the engine.
EVENT_KINDS = st.sampled_from(
    # Rounds and the clock moving on are the common case; the rest perturbs them.
    ("round", "advance", "round", "advance", "round", "report", "tick", "disconnect", "connect")
)
ROUND_KINDS = st.sampled_from(("up", "everyone", "region", "mixed"))
FAILURE = st.sampled_from(FAILURES)
OUTCOME = st.sampled_from((None, None, None, *FAILURES))  # None: a success
FRACTION = st.sampled_from(FRACTIONS)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    regions = draw(st.lists(st.sampled_from(REGIONS), min_size=1, max_size=4, unique=True))
    fleet: list[tuple[str, str]] = []
    for region in regions:
        size = draw(st.integers(1, 4))
        fleet.extend((f"{region}-{index}", region) for index in range(1, size + 1))
    return tuple(fleet)


@st.composite
def events(
    draw: st.DrawFn, fleet: tuple[tuple[str, str], ...], checks: tuple[CheckSpec, ...]
) -> Event:
    """One event. Rounds are mostly correlated (everyone, or one region, failing alike), so
    outages that take several agents to confirm are common, plus arbitrary mixes."""
    kind = draw(EVENT_KINDS)
    regions = tuple(sorted({region for _, region in fleet}))
    if kind == "round":
        check = draw(st.sampled_from(checks)).name
        how = draw(ROUND_KINDS)
        if how == "up":
            return Round(check, (None,) * len(fleet))
        failure = draw(FAILURE)
        if how == "everyone":
            return Round(check, (failure,) * len(fleet))
        if how == "region":
            failing = draw(st.sampled_from(regions))
            return Round(check, tuple(failure if r == failing else None for _, r in fleet))
        return Round(check, tuple(draw(OUTCOME) for _ in fleet))
    if kind == "advance":
        return Advance(draw(st.sampled_from(checks)).interval * draw(FRACTION))
    if kind == "tick":
        return Tick()
    agent, home = draw(st.sampled_from(fleet))
    if kind == "report":
        return Report(agent, draw(st.sampled_from(checks)).name, draw(OUTCOME))
    if kind == "disconnect":
        return Disconnect(agent)
    elsewhere = tuple(region for region in regions if region != home)
    return Connect(agent, draw(st.sampled_from((home, home, home, *elsewhere))))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    config = draw(engine_settings)
    answers = draw(st.booleans())
    # Up to three checks: with three, an agent failing two of them while its peers see
    # them work is impaired (the default impaired_share and impaired_min_checks).
    timings = draw(st.lists(check_timings, min_size=1, max_size=3))
    checks = tuple(
        CheckSpec(name, interval, timeout)
        for name, (interval, timeout) in zip(CHECKS, timings, strict=False)
    )
    fleet = draw(fleets())
    # Batches of events: a flat st.lists() averages a handful of events, too few for
    # outages to be confirmed, go stale and recover; nested lists average about twenty
    # and still shrink by deleting events anywhere.
    batches = draw(st.lists(st.lists(events(fleet, checks), min_size=1, max_size=8), max_size=10))
    events_ = tuple(itertools.chain.from_iterable(batches))
    return Scenario(config, checks, fleet, events_, answers)


@st.composite
def scenarios_with_newcomer(draw: st.DrawFn) -> tuple[Scenario, str]:
    """A scenario and the region of one more agent: one of the fleet's regions or a new one.

    Without second opinions: they make how many results each agent sends depend on the
    whole fleet, so with one more agent every other agent's view would be fed different
    results. The invariant is about how views add up into a verdict, so each view here
    is fed by its own agent's results only (everything else, adaptive confirmation and
    impairment included, is as configured).
    """
    scenario = draw(scenarios())
    config = dataclasses.replace(scenario.config, second_opinion=False)
    scenario = dataclasses.replace(scenario, config=config)
    return scenario, draw(st.sampled_from((*scenario.regions, NEW_REGION)))


# -- driving an engine ---------------------------------------------------------------------

# One engine call of a step: the clock when it was made and the transitions it returned.
Call: TypeAlias = tuple[float, list[Transition]]


class Driver:
    """One engine under its own fake clock, fed a scenario one event at a time.

    Connects the fleet (and, with ``extra_region``, the agent ``EXTRA`` there, which then
    reports success at the end of every round) on construction. Keeps the test's own
    account of what it fed: connected agents and their regions, when each result arrived
    on the clock, and when each check was last brought up to date (its last ``observe()``
    or ``tick()``: the docstring's points where staleness is noticed).
    """

    def __init__(
        self,
        scenario: Scenario,
        extra_region: str | None = None,
        extra_failure: FailureClass | None = None,
    ) -> None:
        self.scenario = scenario
        self.extra_failure = extra_failure  # what EXTRA reports: None for up
        self.clock = FakeClock()
        self.engine = VerdictEngine(scenario.config, self.clock)
        self.windows = {spec.name: spec.window(scenario.config) for spec in scenario.checks}
        self.extra = extra_region is not None
        self.connected: dict[str, str] = {}  # agent -> region
        self.results: dict[tuple[str, str], float] = {}  # (agent, check) -> clock when fed
        self.last: dict[tuple[str, str], FailureClass | None] = {}  # its latest outcome
        self.asked: list[ProbeNow] = []  # second opinions the engine asked for
        self.swept = dict.fromkeys(self.windows, T0)  # check -> last observe()/tick()
        self._seq = itertools.count(1)
        self.created = self.clock.now
        # Setting up: the checks, then the fleet. Nothing here may cause a transition.
        self.setup: list[Call] = [(T0, self.engine.set_checks(s.build() for s in scenario.checks))]
        members = [*scenario.fleet, *([(EXTRA, extra_region)] if extra_region else [])]
        for agent, region in members:
            self.setup.append(self.apply(Connect(agent, region))[0])

    def apply(self, event: Event) -> list[Call]:
        """Feed one event, then (with ``scenario.answers``) answer every second opinion the
        engine asks for: each connected agent asked repeats its latest outcome for that
        check, at once, as a probe of a target that has not changed would. The engine
        calls it made, in order; the requests go to ``asked``."""
        calls = self._apply(event)
        for _ in range(100):  # answers may be asked for again; the engine bounds that
            requests = self.engine.take_requests()
            self.asked.extend(requests)
            if not requests or not self.scenario.answers:
                break
            for request in requests:
                for agent in request.agents:
                    if agent in self.connected:
                        failure = self.last.get((agent, request.check))
                        calls.append(self._observe(agent, request.check, failure))
        else:
            raise AssertionError("the engine kept asking for second opinions")
        return calls

    def _apply(self, event: Event) -> list[Call]:
        now = self.clock.now
        if isinstance(event, Advance):
            self.clock.now += event.seconds
            return []
        if isinstance(event, Tick):
            for name in self.swept:
                self.swept[name] = now
            return [(now, self.engine.tick())]
        if isinstance(event, Disconnect):
            self.connected.pop(event.agent, None)
            return [(now, self.engine.agent_disconnected(event.agent))]
        if isinstance(event, Connect):
            self.connected[event.agent] = event.region
            return [(now, self.engine.agent_connected(event.agent, event.region))]
        if isinstance(event, Report):
            if event.agent not in self.connected:
                return []
            return [self._observe(event.agent, event.check, event.failure)]
        calls = [
            self._observe(agent, event.check, failure)
            for (agent, _), failure in zip(self.scenario.fleet, event.outcomes, strict=True)
            if agent in self.connected
        ]
        if self.extra:
            calls.append(self._observe(EXTRA, event.check, self.extra_failure))
        return calls

    def _observe(self, agent: str, check: str, failure: FailureClass | None) -> Call:
        now = self.clock.now
        outcome = ProbeOutcome(True) if failure is None else ProbeOutcome.failed(failure, "failed")
        result = ProbeResult(check, 1, next(self._seq), now, 0.05, outcome)
        transitions = self.engine.observe(agent, result)
        self.results[agent, check] = now
        self.last[agent, check] = failure
        self.swept[check] = now
        return (now, transitions)

    def verdict(self, check: str) -> Verdict:
        verdict = self.engine.verdict(check)
        assert verdict is not None, f"no verdict for {check!r}"
        return verdict

    def fresh_agents(self, check: str, region: str) -> list[str]:
        """Connected agents in ``region`` whose latest result for ``check`` was within the
        check's staleness window when the check was last brought up to date. A view the
        engine counts (now, or at a later re-evaluation) is at least that fresh."""
        at, window = self.swept[check], self.windows[check]
        return [
            agent
            for agent, where in self.connected.items()
            if where == region
            and (agent, check) in self.results
            and self.results[agent, check] + window >= at  # the engine's own comparison
        ]


def describe(step: int, event: Event | None) -> str:
    return f"after step {step} ({event!r})" if event is not None else "after setting up"


# -- properties ----------------------------------------------------------------------------


@PROPERTY
@given(case=scenarios_with_newcomer())
def test_one_more_agent_seeing_it_up_never_makes_a_verdict_worse(
    case: tuple[Scenario, str],
) -> None:
    """Adding one agent that reports the check up at every round (in an existing region or
    a new one) never makes any verdict worse: where both verdicts are ranked (up < degraded
    < local < regional < global), the one with the extra agent is no worse; with it the
    verdict is never ``global`` unless it is ``global`` without; and no region is down with
    it that is not down without it (the same agents are in each region, plus one that sees
    the check up). Second opinions are off here, see ``scenarios_with_newcomer``."""
    scenario, region = case
    without = Driver(scenario)
    with_extra = Driver(scenario, extra_region=region)

    for step, event in enumerate([None, *scenario.events]):
        if event is not None:
            without.apply(event)
            with_extra.apply(event)
        where = describe(step, event)
        for spec in scenario.checks:
            base, more = without.verdict(spec.name), with_extra.verdict(spec.name)
            if more.state is VerdictState.GLOBAL:
                assert base.state is VerdictState.GLOBAL, (
                    f"{spec.name} {where}: global with the extra agent, {base.state} without "
                    f"({more.reason!r} vs {base.reason!r})"
                )
            if base.state in RANK and more.state in RANK:
                assert RANK[more.state] <= RANK[base.state], (
                    f"{spec.name} {where}: {more.state} with the extra agent in {region}, "
                    f"{base.state} without ({more.reason!r} vs {base.reason!r})"
                )
            assert set(more.regions_down) <= set(base.regions_down), (
                f"{spec.name} {where}: down with the extra agent in {region}: "
                f"{more.regions_down}, without: {base.regions_down} "
                f"({more.regions} vs {base.regions})"
            )


@PROPERTY
@given(case=scenarios_with_newcomer())
def test_an_impaired_agent_alone_never_moves_a_verdict(case: tuple[Scenario, str]) -> None:
    """An extra agent that fails every check at every round, once the engine judges it
    impaired, leaves every verdict as it is without that agent: the same state and the
    same regions down. (Before it is judged, its failures may show as ``local``.)
    Scenarios have one to three checks, so any number of them may make an agent impaired
    here."""
    scenario, region = case
    config = dataclasses.replace(scenario.config, impaired_min_checks=1)
    scenario = dataclasses.replace(scenario, config=config)
    without = Driver(scenario)
    with_broken = Driver(scenario, extra_region=region, extra_failure=FailureClass.CONNECT_TIMEOUT)
    for step, event in enumerate([None, *scenario.events]):
        if event is not None:
            without.apply(event)
            with_broken.apply(event)
        if EXTRA not in with_broken.engine.impaired():
            continue
        hypothesis.event("the broken agent was judged impaired")
        where = describe(step, event)
        for spec in scenario.checks:
            base, broken = without.verdict(spec.name), with_broken.verdict(spec.name)
            assert (broken.state, broken.regions_down) == (base.state, base.regions_down), (
                f"{spec.name} {where}: {broken.state} {broken.regions_down} with the impaired "
                f"agent in {region}, {base.state} {base.regions_down} without "
                f"({broken.reason!r} vs {base.reason!r})"
            )


# An episode of second opinions (nobody answers) is on while eu-1's view (its last result
# at T0 + 5) goes stale at T0 + 17, and us-1's stale view came back meanwhile, so the
# number of stale views is what it was at the last evaluation: the engine went on naming
# eu down at T0 + 17.5. Built by hand from a case hypothesis found (an up region counted
# from a stale agent), which random examples hit only rarely.
STALE_DURING_SECOND_OPINIONS = Scenario(
    EngineSettings(min_agents=1, min_regions=1, fail_after=3, recover_after=1, stale_intervals=1.0),
    (CheckSpec("web", 10.0, 2.0),),
    (("eu-1", "eu"), ("us-1", "us"), ("ap-1", "ap")),
    (
        Round("web", (None, None, None)),
        Advance(4.0),
        Report("ap-1", "web", None),
        Advance(1.0),
        Report("eu-1", "web", FailureClass.CONNECT_REFUSED),
        Report("eu-1", "web", FailureClass.CONNECT_REFUSED),
        Report("eu-1", "web", FailureClass.CONNECT_REFUSED),
        Advance(8.0),
        Tick(),
        Advance(1.0),
        Report("ap-1", "web", FailureClass.CONNECT_REFUSED),
        Report("us-1", "web", None),
        Advance(2.0),
        Report("ap-1", "web", FailureClass.CONNECT_REFUSED),
        Advance(1.5),
        Report("us-1", "web", None),
    ),
    answers=False,
)


@PROPERTY
@given(scenario=scenarios())
@example(scenario=STALE_DURING_SECOND_OPINIONS)
def test_no_region_is_named_down_without_fresh_agents(scenario: Scenario) -> None:
    """A region is named down only on fresh evidence: each region in ``regions_down`` is
    ``down`` in the evidence with at least one down agent, and no region's evidence counts
    more up and down agents than the region has connected agents whose result for the check
    arrived within its staleness window (as of the check's last ``observe()`` or
    ``tick()``). So a region whose agents are all stale or gone is never named down."""
    driver = Driver(scenario)
    for step, event in enumerate([None, *scenario.events]):
        if event is not None:
            driver.apply(event)
        where = describe(step, event)
        for verdict in driver.engine.verdicts():
            named = {r for r, view in verdict.regions.items() if view.state is RegionState.DOWN}
            assert set(verdict.regions_down) == named, f"{verdict.check} {where}"
            for region in verdict.regions_down:
                assert verdict.regions[region].down >= 1, f"{verdict.check} {where}: {region}"
            for region, view in verdict.regions.items():
                fresh = driver.fresh_agents(verdict.check, region)
                assert view.up + view.down <= len(fresh), (
                    f"{verdict.check} {where}: {region} counts {view.up} up and {view.down} "
                    f"down, but only {fresh} are connected there with a fresh result"
                )


@PROPERTY
@given(scenario=scenarios())
def test_global_and_regional_verdicts_rest_on_enough_evidence(scenario: Scenario) -> None:
    """``global`` always has at least ``min_regions`` regions down and at least
    ``min_agents`` agents down (summed over the regions' evidence); ``regional`` always has
    at least one region down and at least one region up."""
    driver = Driver(scenario)
    config = scenario.config
    for step, event in enumerate([None, *scenario.events]):
        if event is not None:
            driver.apply(event)
        where = describe(step, event)
        for verdict in driver.engine.verdicts():
            states = [view.state for view in verdict.regions.values()]
            if verdict.state is VerdictState.GLOBAL:
                assert len(verdict.regions_down) >= config.min_regions, (
                    f"{verdict.check} {where}: global with {verdict.regions_down} down"
                )
                down = sum(view.down for view in verdict.regions.values())
                assert down >= config.min_agents, (
                    f"{verdict.check} {where}: global from {down} down agents"
                )
            if verdict.state is VerdictState.REGIONAL:
                assert RegionState.DOWN in states, f"{verdict.check} {where}: {verdict.regions}"
                assert RegionState.UP in states, f"{verdict.check} {where}: {verdict.regions}"


@PROPERTY
@given(scenario=scenarios())
def test_transitions_are_exactly_the_state_changes(scenario: Scenario) -> None:
    """Transitions tell the whole story of each verdict: every call returns its transitions
    in check-name order, stamped with the clock; each transition's ``previous`` is the state
    the verdict had just before and its new state differs from it; the verdict's state never
    changes without a transition; and ``since`` is the time of the check's last transition
    (its creation while there has been none)."""
    driver = Driver(scenario)
    states = {spec.name: VerdictState.UNKNOWN for spec in scenario.checks}
    changed = {spec.name: driver.created for spec in scenario.checks}

    for step, event in enumerate([None, *scenario.events]):
        calls = driver.setup if event is None else driver.apply(event)
        where = describe(step, event)
        for at, transitions in calls:
            names = [t.check for t in transitions]
            assert names == sorted(names), f"{where}: transitions out of order: {names}"
            for transition in transitions:
                name = transition.check
                assert transition.previous is states[name], (
                    f"{name} {where}: previous {transition.previous}, but it was {states[name]}"
                )
                assert transition.verdict.state is not transition.previous, (
                    f"{name} {where}: a transition from {transition.previous} to itself"
                )
                assert transition.verdict.check == name
                assert transition.at == at == transition.verdict.since, f"{name} {where}"
                states[name] = transition.verdict.state
                changed[name] = at
        verdicts = driver.engine.verdicts()
        assert [v.check for v in verdicts] == sorted(states), where
        for verdict in verdicts:
            assert verdict.state is states[verdict.check], (
                f"{verdict.check} {where}: {verdict.state} without a transition from "
                f"{states[verdict.check]}"
            )
            assert verdict.since == changed[verdict.check], f"{verdict.check} {where}"


@settings(PROPERTY, max_examples=75)
@given(scenario=scenarios())
def test_the_same_events_give_the_same_transitions(scenario: Scenario) -> None:
    """Two fresh engines fed the same events under the same clock return the same
    transitions (verdicts and evidence included) from every call, ask for the same second
    opinions, and end every step with the same verdicts and the same impaired agents."""
    first, second = Driver(scenario), Driver(scenario)
    assert first.setup == second.setup
    for step, event in enumerate(scenario.events, start=1):
        where = describe(step, event)
        assert first.apply(event) == second.apply(event), where
        assert first.asked == second.asked, where
        assert first.engine.verdicts() == second.engine.verdicts(), where
        assert first.engine.impaired() == second.engine.impaired(), where
