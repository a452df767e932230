"""The verdict engine: hysteresis, freshness, regions and verdicts, with a fake clock."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.engine import VerdictEngine
from coordinator.judgement import EngineSettings
from coordinator.verdicts import RegionState, RegionView, Transition, Verdict, VerdictState
from vantage.checks import AnyCheck, parse_check
from vantage.results import (
    FailureClass,
    HttpDetails,
    Phases,
    ProbeOutcome,
    ProbeResult,
    TlsDetails,
)

T0 = 1_800_000_000.0
# interval 30s, timeout 10s: with the default stale_intervals=2 a view is fresh for 70s.
WINDOW = 70.0
FLEET = {"eu-1": "eu", "eu-2": "eu", "us-1": "us", "us-2": "us", "ap-1": "ap", "ap-2": "ap"}


class FakeClock:
    """The engine's clock in a test. The newest one is the time at which ``result()``
    says a probe started, unless told otherwise: a probe that has just run."""

    latest: FakeClock | None = None

    def __init__(self, now: float = T0) -> None:
        self.now = now
        FakeClock.latest = self

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_seq = itertools.count(1)


def check(name: str = "web", interval: float = 30, timeout: float = 10) -> AnyCheck:
    return parse_check(
        {
            "name": name,
            "type": "http",
            "target": "http://example.org/",
            "interval": interval,
            "timeout": timeout,
        }
    )


def result(name: str, failure: FailureClass | None = None, at: float | None = None) -> ProbeResult:
    if at is None:
        at = FakeClock.latest.now if FakeClock.latest is not None else T0
    outcome = (
        ProbeOutcome(True) if failure is None else ProbeOutcome.failed(failure, f"{failure} here")
    )
    return ProbeResult(name, 1, next(_seq), at, 0.05, outcome)


def engine_with_fleet(
    clock: FakeClock, checks: tuple[str, ...] = ("web",), **overrides: Any
) -> VerdictEngine:
    # Rounds of second opinions hold verdicts until every agent asked has reported, and
    # adaptive confirmation asks more failures in a row of lossy (or new) views: tests of
    # how views add up to a verdict turn both off; their own tests turn them on.
    overrides.setdefault("second_opinion", False)
    overrides.setdefault("adaptive_confirmation", False)
    engine = VerdictEngine(EngineSettings(**overrides), clock)
    engine.set_checks(check(name) for name in checks)
    for agent, region in FLEET.items():
        engine.agent_connected(agent, region)
    return engine


def report(
    engine: VerdictEngine,
    failures: dict[str, FailureClass] | None = None,
    agents: Any = FLEET,
    name: str = "web",
) -> list[Transition]:
    """One round: every agent in ``agents`` reports; those in ``failures`` fail."""
    failures = failures or {}
    transitions: list[Transition] = []
    for agent in agents:
        transitions += engine.observe(agent, result(name, failures.get(agent)))
    return transitions


def state(engine: VerdictEngine, name: str = "web") -> VerdictState:
    verdict = engine.verdict(name)
    assert verdict is not None
    return verdict.state


# -- example scenarios -------------------------------------------------------------------


def test_three_regions_of_two_agents_seeing_it_work_make_it_up() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    clock.advance(5)

    transitions = report(engine)

    assert [(t.previous, t.verdict.state, t.at) for t in transitions] == [
        (VerdictState.UNKNOWN, VerdictState.UP, T0 + 5)
    ]
    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.state is VerdictState.UP
    assert verdict.since == T0 + 5
    assert verdict.regions == {r: RegionView(RegionState.UP, up=2) for r in ("ap", "eu", "us")}
    assert verdict.regions_down == ()
    assert verdict.failure is None
    assert verdict.reason == "up from 6/6 agents in 3 regions"


def test_global_needs_fail_after_rounds_not_one() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    everyone_refused = dict.fromkeys(FLEET, FailureClass.CONNECT_REFUSED)

    clock.advance(30)
    assert report(engine, everyone_refused) == []
    assert state(engine) is VerdictState.UP

    clock.advance(30)
    transitions = report(engine, everyone_refused)

    # Without second opinions, results are folded one at a time and the verdict
    # escalates as agents confirm (see the next test for what second opinions change).
    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.UP, VerdictState.LOCAL),  # eu-1
        (VerdictState.LOCAL, VerdictState.REGIONAL),  # eu-2: eu is down
        (VerdictState.REGIONAL, VerdictState.GLOBAL),  # ap-2: the last region is down
    ]
    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.state is VerdictState.GLOBAL
    assert verdict.since == T0 + 60
    assert verdict.regions_down == ("ap", "eu", "us")
    assert verdict.failure is FailureClass.CONNECT_REFUSED
    assert verdict.reason == "down from 6/6 agents in 3 regions (connect_refused)"
    assert verdict.regions["eu"] == RegionView(
        RegionState.DOWN,
        down=2,
        failure=FailureClass.CONNECT_REFUSED,
        failing_agents=("eu-1", "eu-2"),
    )


def answer(engine: VerdictEngine, failure: FailureClass | None) -> list[Transition]:
    """Every agent asked for a second opinion answers at once, until nobody is asked."""
    transitions: list[Transition] = []
    while requests := engine.take_requests():
        for request in requests:
            for agent in request.agents:
                transitions += engine.observe(agent, result(request.check, failure))
    return transitions


def test_second_opinions_take_an_outage_straight_to_global_within_one_round() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=True)
    report(engine)
    everyone_refused = dict.fromkeys(FLEET, FailureClass.CONNECT_REFUSED)
    clock.advance(30)

    transitions = report(engine, everyone_refused)
    assert transitions == []  # the verdict waits for the second opinions asked
    [first, *_] = engine.take_requests()
    assert first.check == "web"
    assert first.agents == tuple(sorted(FLEET))  # eu-1's failure asked everyone at once
    for agent in first.agents:
        transitions += engine.observe(agent, result("web", FailureClass.CONNECT_REFUSED))
    transitions += answer(engine, FailureClass.CONNECT_REFUSED)

    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.UP, VerdictState.GLOBAL)
    ]

    clock.advance(30)
    transitions = report(engine) + answer(engine, None)
    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.GLOBAL, VerdictState.UP)
    ]


def test_second_opinions_not_answered_in_time_let_the_verdict_move() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=True)
    report(engine)
    clock.advance(30)
    assert report(engine, {"eu-1": FailureClass.TIMEOUT}) == []
    assert engine.take_requests()  # asked; nobody answers
    clock.advance(12)  # past the deadline: timeout 10 s + slack 1 s
    engine.tick()
    clock.advance(18)
    transitions = report(engine, {"eu-1": FailureClass.TIMEOUT})
    assert [t.verdict.state for t in transitions] == [VerdictState.LOCAL]


def test_a_probe_that_started_before_the_ask_is_no_answer() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=True)
    report(engine)
    clock.advance(30)
    assert engine.observe("eu-1", result("web", FailureClass.TIMEOUT)) == []
    [asked] = engine.take_requests()
    clock.advance(2)

    # us-1's scheduled probe, started 5 s before the ask, timed out: that is what the
    # target did before. us-1 runs the asked probe beside it: it is not asked again, and
    # the verdict waits for that answer.
    assert engine.observe("us-1", result("web", FailureClass.TIMEOUT, at=clock.now - 7)) == []
    assert engine.take_requests() == []
    transitions: list[Transition] = []
    for agent in asked.agents:
        transitions += engine.observe(agent, result("web", FailureClass.TIMEOUT))
    transitions += answer(engine, FailureClass.TIMEOUT)

    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.UP, VerdictState.GLOBAL)
    ]


def test_one_failing_agent_is_local() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)

    report(engine, {"eu-1": FailureClass.TIMEOUT})
    assert state(engine) is VerdictState.UP, "one failed probe never moves a verdict"
    transitions = report(engine, {"eu-1": FailureClass.TIMEOUT})

    assert [t.verdict.state for t in transitions] == [VerdictState.LOCAL]
    verdict = transitions[0].verdict
    assert verdict.regions_down == ()
    assert verdict.failure is FailureClass.TIMEOUT
    assert verdict.regions["eu"] == RegionView(
        RegionState.UP, up=1, down=1, failure=FailureClass.TIMEOUT, failing_agents=("eu-1",)
    )
    assert verdict.reason == "failing from 1/6 agents: eu-1 (timeout)"


def test_a_whole_region_failing_is_regional() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=True)
    report(engine)
    eu_times_out = {"eu-1": FailureClass.CONNECT_TIMEOUT, "eu-2": FailureClass.CONNECT_TIMEOUT}

    report(engine, eu_times_out)
    transitions = report(engine, eu_times_out)

    assert [t.verdict.state for t in transitions] == [VerdictState.REGIONAL]
    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.regions_down == ("eu",)
    assert verdict.failure is FailureClass.CONNECT_TIMEOUT
    assert verdict.regions["eu"].failing_agents == ("eu-1", "eu-2")
    assert verdict.regions["us"].state is RegionState.UP
    assert verdict.reason == "down in eu (connect_timeout); up in ap, us"


def test_recovery_needs_recover_after_successes_in_a_row() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, recover_after=3, second_opinion=True)
    report(engine)
    everyone_refused = dict.fromkeys(FLEET, FailureClass.CONNECT_REFUSED)
    report(engine, everyone_refused)
    report(engine, everyone_refused)
    assert state(engine) is VerdictState.GLOBAL

    report(engine)
    report(engine)
    report(engine, everyone_refused)  # a relapse restarts the count
    report(engine)
    report(engine)
    assert state(engine) is VerdictState.GLOBAL
    transitions = report(engine)

    # Held for the round the first success started: straight back to up.
    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.GLOBAL, VerdictState.UP)
    ]


def test_from_no_view_one_success_confirms_up_but_one_failure_confirms_nothing() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)

    report(engine, dict.fromkeys(FLEET, FailureClass.DNS_NXDOMAIN))
    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.state is VerdictState.UNKNOWN
    assert verdict.reason == "no fresh agents, 3 needed"

    report(engine, dict.fromkeys(FLEET, FailureClass.DNS_NXDOMAIN))
    assert state(engine) is VerdictState.GLOBAL


def test_stale_results_make_it_unknown_never_up() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)

    clock.advance(WINDOW)
    assert engine.tick() == [], "a view exactly at the window's edge is still fresh"
    clock.advance(0.5)
    transitions = engine.tick()

    assert [(t.previous, t.verdict.state, t.at) for t in transitions] == [
        (VerdictState.UP, VerdictState.UNKNOWN, T0 + WINDOW + 0.5)
    ]
    stale = transitions[0].verdict
    assert stale.regions["eu"] == RegionView(RegionState.UNKNOWN, stale=2)
    assert stale.reason == "no fresh agents, 3 needed (6 stale)"

    # Two fresh agents are not enough evidence for "up", whatever they say.
    assert report(engine, agents=["eu-1", "us-1"]) == []
    thin = engine.verdict("web")
    assert thin is not None
    assert thin.state is VerdictState.UNKNOWN
    assert thin.reason == "only 2 fresh agents, 3 needed (4 stale)"


def test_agents_that_keep_reporting_never_go_stale_and_one_that_stops_does() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    assert state(engine) is VerdictState.UP
    # Agents report one after another, 5s apart, for many staleness windows: each time the
    # check's earliest view would expire, a fresher result has replaced it.
    last_seen: dict[str, float] = {}
    for step in range(10 * len(FLEET) * 3):
        clock.advance(5)
        agent = list(FLEET)[step % len(FLEET)]
        assert engine.observe(agent, result("web")) == []
        last_seen[agent] = clock.now
        assert engine.tick() == []
        verdict = engine.verdict("web")
        assert verdict is not None
        assert all(view.stale == 0 for view in verdict.regions.values())

    # us-1 stops. Its view goes stale exactly one window after its last result, however
    # often the others' results moved the check's earliest expiry on meanwhile.
    others = [agent for agent in FLEET if agent != "us-1"]
    step = 0
    while clock.now + 5 <= last_seen["us-1"] + WINDOW:
        clock.advance(5)
        engine.observe(others[step % len(others)], result("web"))
        step += 1
        assert engine.tick() == []
        verdict = engine.verdict("web")
        assert verdict is not None
        assert verdict.regions["us"].stale == 0
    clock.now = last_seen["us-1"] + WINDOW + 0.5
    assert engine.tick() == []  # still up: five fresh agents
    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.regions["us"] == RegionView(RegionState.UP, up=1, stale=1)


def test_a_stale_view_is_forgotten_so_hysteresis_starts_over() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    everyone_refused = dict.fromkeys(FLEET, FailureClass.CONNECT_REFUSED)
    report(engine, everyone_refused)
    report(engine, everyone_refused)
    assert state(engine) is VerdictState.GLOBAL

    clock.advance(WINDOW + 1)
    report(engine)  # after a gap, one success is a first result again

    assert state(engine) is VerdictState.UP


def test_disconnects_drop_views_at_once_and_below_min_agents_it_is_unknown() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)

    assert engine.agent_disconnected("eu-1") == []
    assert engine.agent_disconnected("us-1") == []
    assert engine.agent_disconnected("us-1") == [], "disconnecting twice changes nothing"
    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.state is VerdictState.UP
    assert verdict.regions["eu"] == RegionView(RegionState.UP, up=1), "not counted, not stale"

    assert engine.agent_disconnected("ap-1") == [], "3 agents are still enough"
    transitions = engine.agent_disconnected("ap-2")
    assert [t.verdict.state for t in transitions] == [VerdictState.UNKNOWN]
    assert transitions[0].verdict.reason == "only 2 fresh agents, 3 needed"
    assert sorted(transitions[0].verdict.regions) == ["eu", "us"]

    # A quick reconnect brings the agent's still-fresh view back at once.
    clock.advance(10)
    transitions = engine.agent_connected("ap-1", "ap")
    assert [t.verdict.state for t in transitions] == [VerdictState.UP]


def test_evidence_moves_without_a_transition() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    report(engine, {"eu-1": FailureClass.TIMEOUT})
    report(engine, {"eu-1": FailureClass.TIMEOUT})
    assert state(engine) is VerdictState.LOCAL

    assert report(engine, {"eu-1": FailureClass.TLS_HANDSHAKE}) == []

    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.failure is FailureClass.TLS_HANDSHAKE
    assert verdict.regions["eu"].failure is FailureClass.TLS_HANDSHAKE
    assert verdict.reason == "failing from 1/6 agents: eu-1 (tls_handshake)"


def test_a_result_brings_its_check_up_to_date_between_ticks() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine, agents=["eu-1", "eu-2", "us-1", "us-2"])
    clock.advance(WINDOW - 10)
    report(engine, agents=["eu-1", "us-1"])
    clock.advance(20)  # eu-2 and us-2 are stale now, but nobody has called tick()

    transitions = engine.observe("eu-1", result("web"))

    assert [t.verdict.state for t in transitions] == [VerdictState.UNKNOWN]
    assert transitions[0].verdict.reason == "only 2 fresh agents, 3 needed (2 stale)"


def test_a_region_with_only_disconnected_agents_is_not_listed() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)

    engine.agent_disconnected("ap-1")
    engine.agent_disconnected("ap-2")

    verdict = engine.verdict("web")
    assert verdict is not None
    assert sorted(verdict.regions) == ["eu", "us"]
    assert verdict.state is VerdictState.UP


def test_too_few_regions_is_unknown() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine, agents=["eu-1", "eu-2"])
    engine.agent_connected("eu-3", "eu")
    report(engine, agents=["eu-3"])

    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.state is VerdictState.UNKNOWN
    assert verdict.reason == "only 1 region with enough fresh agents (eu), 2 needed"


def test_every_region_down_from_too_few_agents_is_unknown_not_global() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, min_agents=4)
    report(engine, agents=["eu-1", "eu-2", "us-1"])  # eu-2 stays up
    refused = {"eu-1": FailureClass.CONNECT_REFUSED, "us-1": FailureClass.CONNECT_REFUSED}
    report(engine, refused, agents=["eu-1", "us-1"])
    report(engine, refused, agents=["eu-1", "us-1"])
    report(engine, agents=["eu-2"])
    engine.agent_connected("us-3", "us")
    report(engine, {"us-3": FailureClass.CONNECT_REFUSED}, agents=["us-3"])
    report(engine, {"us-3": FailureClass.CONNECT_REFUSED}, agents=["us-3"])
    engine.agent_connected("eu-3", "eu")
    report(engine, {"eu-3": FailureClass.TIMEOUT}, agents=["eu-3"])
    report(engine, {"eu-3": FailureClass.TIMEOUT}, agents=["eu-3"])

    # eu: 2 of 3 down, us: 2 of 2 down -> both regions down, 4 agents down: global.
    assert state(engine) is VerdictState.GLOBAL
    engine.agent_disconnected("us-3")  # us: 1 of 1 down; 3 agents down, 4 needed
    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.state is VerdictState.UNKNOWN
    assert verdict.regions_down == ("eu", "us")
    assert verdict.reason == "down in every region (eu, us) but from only 3 agents, 4 needed"


def test_dominant_failure_ties_go_to_the_class_name_sorting_first() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    mixed = {"us-1": FailureClass.TIMEOUT, "eu-1": FailureClass.HTTP_STATUS}

    report(engine, mixed)
    report(engine, mixed)

    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.state is VerdictState.LOCAL
    assert verdict.failure is FailureClass.HTTP_STATUS
    assert verdict.reason == "failing from 2/6 agents: eu-1 (http_status), us-1 (timeout)"


def test_a_new_check_starts_unknown_without_a_transition() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    clock.advance(3)

    assert engine.set_checks([check("web"), check("api")]) == []

    verdict = engine.verdict("api")
    assert verdict is not None
    assert verdict.state is VerdictState.UNKNOWN
    assert verdict.since == T0 + 3
    assert verdict.regions == {}
    assert state(engine, "web") is VerdictState.UP, "a kept check keeps its state"
    assert [v.check for v in engine.verdicts()] == ["api", "web"]


def test_a_removed_check_disappears_with_its_state() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, checks=("web", "api"))
    report(engine)

    assert engine.set_checks([check("api")]) == []

    assert engine.verdict("web") is None
    assert [v.check for v in engine.verdicts()] == ["api"]
    with pytest.raises(ValueError, match="unknown check 'web'"):
        engine.observe("eu-1", result("web"))
    engine.set_checks([check("api"), check("web")])
    assert state(engine) is VerdictState.UNKNOWN, "re-adding starts from scratch"


def test_a_longer_interval_is_taken_over_keeping_state() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    clock.advance(WINDOW + 1)

    # 2 * 60s + 10s: the views are fresh again under the new window.
    assert engine.set_checks([check("web", interval=60)]) == []
    assert engine.tick() == []
    assert state(engine) is VerdictState.UP

    transitions = engine.set_checks([check("web", interval=20, timeout=5)])
    assert [t.verdict.state for t in transitions] == [VerdictState.UNKNOWN]


def test_results_from_unconnected_agents_are_refused() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    engine.agent_disconnected("eu-1")

    with pytest.raises(ValueError, match="not connected"):
        engine.observe("eu-1", result("web"))
    with pytest.raises(ValueError, match="not connected"):
        engine.observe("nobody", result("web"))


def test_freshness_uses_the_engine_clock_not_the_agent_timestamp() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    for agent in FLEET:
        engine.observe(agent, result("web", at=T0 - 3600))  # an agent clock an hour behind

    assert state(engine) is VerdictState.UP


def test_an_agent_moving_region_moves_its_views() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)

    engine.agent_connected("ap-2", "sa")

    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.regions["ap"] == RegionView(RegionState.UP, up=1)
    assert verdict.regions["sa"] == RegionView(RegionState.UP, up=1)


def test_disconnected_agents_are_forgotten_once_their_views_expire() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    engine.agent_disconnected("eu-1")

    clock.advance(WINDOW + 1)
    engine.tick()
    engine.agent_connected("eu-1", "eu")

    verdict = engine.verdict("web")
    assert verdict is not None
    assert verdict.regions["eu"].stale == 1, "only eu-2, still connected, counts as stale"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_agents", 0),
        ("min_regions", -1),
        ("min_region_agents", 1.5),
        ("fail_after", True),
        ("recover_after", 0),
        ("stale_intervals", 0),
        ("stale_intervals", float("nan")),
    ],
)
def test_settings_are_validated(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        EngineSettings(**{field: value})


# -- properties ----------------------------------------------------------------------------

RANK = {
    VerdictState.UP: 0,
    VerdictState.LOCAL: 1,
    VerdictState.REGIONAL: 2,
    VerdictState.GLOBAL: 3,
}
REGIONS = ["eu", "us", "ap", "sa"]
FAILURES = [FailureClass.CONNECT_REFUSED, FailureClass.TIMEOUT, FailureClass.HTTP_STATUS]

engine_settings = st.builds(
    EngineSettings,
    min_agents=st.integers(1, 4),
    min_regions=st.integers(1, 3),
    min_region_agents=st.integers(1, 2),
    fail_after=st.integers(1, 3),
    recover_after=st.integers(1, 3),
    stale_intervals=st.sampled_from([1.0, 2.0]),
    second_opinion=st.booleans(),
)
# An agent of a generated fleet: its region and what it ends up saying about the check.
agent_views = st.tuples(
    st.sampled_from(REGIONS),
    st.sampled_from(["up", "down", "stale", "unconfirmed", "silent"]),
    st.sampled_from(FAILURES),
)


def build_fleet(
    config: EngineSettings, fleet: list[tuple[str, str, FailureClass]]
) -> tuple[VerdictEngine, FakeClock]:
    clock = FakeClock()
    engine = VerdictEngine(config, clock)
    engine.set_checks([check("web")])
    for index, (region, _, _) in enumerate(fleet):
        engine.agent_connected(f"a{index}", region)
    for index, (_, view, _) in enumerate(fleet):
        if view == "stale":
            engine.observe(f"a{index}", result("web"))
    clock.advance(config.stale_intervals * 30 + 10 + 1)
    for index, (_, view, failure) in enumerate(fleet):
        if view == "up":
            engine.observe(f"a{index}", result("web"))
        elif view == "down":
            for _ in range(config.fail_after):
                engine.observe(f"a{index}", result("web", failure))
        elif view == "unconfirmed" and config.fail_after > 1:
            engine.observe(f"a{index}", result("web", failure))
    engine.tick()
    return engine, clock


@settings(max_examples=300, deadline=None)
@given(
    config=engine_settings,
    fleet=st.lists(agent_views, max_size=10),
    newcomer_region=st.sampled_from([*REGIONS, "new"]),
)
def test_one_more_agent_seeing_it_up_never_makes_the_verdict_worse(
    config: EngineSettings, fleet: list[tuple[str, str, FailureClass]], newcomer_region: str
) -> None:
    engine, _ = build_fleet(config, fleet)
    before = state(engine)

    engine.agent_connected("newcomer", newcomer_region)
    engine.observe("newcomer", result("web"))
    after = state(engine)

    if before is VerdictState.UNKNOWN:
        # More evidence may settle an unknown verdict, but a success cannot make it global.
        assert after is not VerdictState.GLOBAL
    else:
        assert after is not VerdictState.UNKNOWN
        assert RANK[after] <= RANK[before]


observations = st.tuples(
    st.just("observe"),
    st.integers(0, 5),
    st.sampled_from(["a", "b"]),
    st.sampled_from([None, None, *FAILURES]),
)
operations = st.one_of(
    observations,
    observations,
    observations,
    # every connected agent reports on one check, in order
    st.tuples(st.just("round"), st.sampled_from(["a", "b"]), st.sampled_from([None, *FAILURES])),
    st.tuples(st.just("tick")),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 3, 10, 30])),
    st.tuples(st.just("connect"), st.integers(0, 5), st.sampled_from(REGIONS[:3])),
    st.tuples(st.just("disconnect"), st.integers(0, 5)),
    st.tuples(st.just("checks"), st.sampled_from(["b=10s", "b=20s", "no b"])),
)


@settings(max_examples=300, deadline=None)
@given(config=engine_settings, ops=st.lists(operations, min_size=10, max_size=100))
def test_invariants_hold_under_any_sequence_of_events(
    config: EngineSettings, ops: list[tuple[Any, ...]]
) -> None:
    clock = FakeClock()
    engine = VerdictEngine(config, clock)
    windows = {"a": config.stale_intervals * 10 + 5, "b": config.stale_intervals * 10 + 5}
    engine.set_checks([check("a", 10, 5), check("b", 10, 5)])
    connected: dict[str, bool] = {}
    for index in range(6):
        engine.agent_connected(f"g{index}", REGIONS[index % 3])
        connected[f"g{index}"] = True
    last_seen: dict[tuple[str, str], float] = {}  # (agent, check) -> observed at
    states = {v.check: v.state for v in engine.verdicts()}

    for op in ops:
        transitions: list[Transition] = []
        if op[0] == "connect":
            transitions = engine.agent_connected(f"g{op[1]}", op[2])
            connected[f"g{op[1]}"] = True
        elif op[0] == "disconnect":
            transitions = engine.agent_disconnected(f"g{op[1]}")
            connected[f"g{op[1]}"] = False
        elif op[0] == "observe":
            agent, name = f"g{op[1]}", op[2]
            if not connected.get(agent) or name not in windows:
                with pytest.raises(ValueError, match=r"not connected|unknown check"):
                    engine.observe(agent, result(name, op[3]))
                continue
            transitions = engine.observe(agent, result(name, op[3]))
            last_seen[agent, name] = clock.now
        elif op[0] == "round":
            if op[1] not in windows:
                continue
            for agent in sorted(a for a, is_connected in connected.items() if is_connected):
                transitions += engine.observe(agent, result(op[1], op[2]))
                last_seen[agent, op[1]] = clock.now
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "tick":
            transitions = engine.tick()
        else:
            specs = [check("a", 10, 5)]
            if op[1] == "no b":
                windows.pop("b", None)
                states.pop("b", None)
                last_seen = {key: at for key, at in last_seen.items() if key[1] != "b"}
            else:
                interval = 10 if op[1] == "b=10s" else 20
                specs.append(check("b", interval, 5))
                windows["b"] = config.stale_intervals * interval + 5
                states.setdefault("b", VerdictState.UNKNOWN)  # a new check: no transition
            transitions = engine.set_checks(specs)

        for transition in transitions:
            assert transition.previous is states[transition.check]
            assert transition.verdict.state is not transition.previous
            assert transition.verdict.since == transition.at == clock.now
            states[transition.check] = transition.verdict.state
        assert {v.check: v.state for v in engine.verdicts()} == states

        for verdict in engine.verdicts():
            down = [r for r, view in verdict.regions.items() if view.state is RegionState.DOWN]
            assert list(verdict.regions_down) == down
            for region in verdict.regions_down:
                view = verdict.regions[region]
                assert view.down * 2 > view.up + view.down >= config.min_region_agents
            if verdict.state is VerdictState.GLOBAL:
                assert len(verdict.regions_down) >= config.min_regions
                assert sum(v.down for v in verdict.regions.values()) >= config.min_agents
            if verdict.state is VerdictState.UP:
                assert verdict.failure is None
                assert all(v.down == 0 for v in verdict.regions.values())
                assert sum(v.up for v in verdict.regions.values()) >= config.min_agents

        for verdict in engine.verdicts():
            internal = engine._checks[verdict.check]
            if clock.now > internal.next_expiry:
                continue  # a view went stale since the last evaluation; tick() will see it
            if internal.pending:
                continue  # a round of second opinions holds the verdict until it is in
            # No view has expired since the last evaluation, so the stored verdict must be
            # exactly what the views support now: observe()'s shortcut and tick()'s
            # due-list skipped nothing they should not have.
            fresh, _ = engine._evaluate(internal, clock.now)
            assert (
                fresh.state,
                fresh.regions,
                fresh.regions_down,
                fresh.failure,
                fresh.reason,
            ) == (
                verdict.state,
                verdict.regions,
                verdict.regions_down,
                verdict.failure,
                verdict.reason,
            )
            # A region named down has a connected agent seen within the window.
            window = windows[verdict.check]
            for region in verdict.regions_down:
                assert any(
                    connected.get(agent)
                    and clock.now - at <= window
                    and engine._agents[agent].region == region
                    for (agent, name), at in last_seen.items()
                    if name == verdict.check
                )


# Agent health


def reason_of(engine: VerdictEngine, name: str) -> str:
    current = engine.verdict(name)
    assert current is not None
    return current.reason


def test_agent_failing_every_check_while_its_peers_see_them_up_is_impaired() -> None:
    clock = FakeClock()
    names = ("web", "shop", "api")
    engine = engine_with_fleet(clock, checks=names)
    for name in names:
        report(engine, name=name)
    assert all(state(engine, name) is VerdictState.UP for name in names)

    transitions: list[Transition] = []
    for _ in range(3):
        clock.advance(30)
        for name in names:
            transitions += report(engine, {"us-1": FailureClass.CONNECT_TIMEOUT}, name=name)

    assert engine.impaired() == {"us-1"}
    assert all(state(engine, name) is VerdictState.UP for name in names)
    assert "impaired, not counted: us-1" in reason_of(engine, "web")
    assert all(t.verdict.state in (VerdictState.UP, VerdictState.LOCAL) for t in transitions)

    for _ in range(2):
        clock.advance(30)
        for name in names:
            report(engine, name=name)
    assert engine.impaired() == frozenset()
    assert "impaired" not in reason_of(engine, "web")


def test_a_whole_region_failing_everything_is_regional_not_impaired() -> None:
    clock = FakeClock()
    names = ("web", "shop", "api")
    engine = engine_with_fleet(clock, checks=names)
    down = {"eu-1": FailureClass.CONNECT_TIMEOUT, "eu-2": FailureClass.CONNECT_TIMEOUT}
    for _ in range(3):
        for name in names:
            report(engine, down, name=name)
        engine.tick()
        clock.advance(30)

    assert engine.impaired() == frozenset()
    assert all(state(engine, name) is VerdictState.REGIONAL for name in names)


def test_an_agent_alone_in_its_region_is_judged_against_the_other_regions() -> None:
    clock = FakeClock()
    names = ("web", "shop", "api")
    engine = VerdictEngine(EngineSettings(), clock)
    engine.set_checks(check(name) for name in names)
    fleet = {"eu-1": "eu", "us-1": "us", "ap-1": "ap"}
    for agent, region in fleet.items():
        engine.agent_connected(agent, region)
    for _ in range(3):
        for name in names:
            report(engine, {"ap-1": FailureClass.CONNECT_TIMEOUT}, agents=fleet, name=name)
        clock.advance(30)

    assert engine.impaired() == {"ap-1"}
    # Two healthy agents are too few for a verdict (min_agents 3): unknown, not regional.
    assert all(state(engine, name) is VerdictState.UNKNOWN for name in names)


def test_an_agent_with_too_few_checks_is_never_impaired() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, checks=("web", "shop"))
    for _ in range(3):
        for name in ("web", "shop"):
            report(engine, {"us-1": FailureClass.CONNECT_TIMEOUT}, name=name)
        clock.advance(30)
    assert engine.impaired() == frozenset()
    assert state(engine, "web") is VerdictState.LOCAL


# Flapping


@pytest.mark.parametrize("second_opinion", [False, True])
def test_a_flapping_target_is_degraded_not_a_storm_of_transitions(second_opinion: bool) -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=second_opinion)
    everyone_refused = dict.fromkeys(FLEET, FailureClass.CONNECT_REFUSED)
    transitions: list[Transition] = []
    for index in range(40):  # down every other round
        clock.advance(30)
        transitions += report(engine, everyone_refused if index % 2 else None)
        transitions += engine.tick()

    assert state(engine) is VerdictState.DEGRADED
    assert reason_of(engine, "web").startswith("flapping from 6/6 agents")
    assert len(transitions) <= 3, [t.verdict.state for t in transitions]

    # Steady again: up within stable_after (5) intervals, not once the changes age out
    # of the 20-result flapping window.
    steady = []
    for _ in range(25):
        clock.advance(30)
        report(engine)
        engine.tick()
        steady.append(state(engine))
    assert steady.index(VerdictState.UP) < 5, steady
    assert set(steady[5:]) == {VerdictState.UP}


@pytest.mark.parametrize("stable_after", [1, 5, 8])
def test_a_flapping_target_reads_up_after_stable_after_steady_results(stable_after: int) -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=False, stable_after=stable_after)
    everyone_refused = dict.fromkeys(FLEET, FailureClass.CONNECT_REFUSED)
    for index in range(16):  # up two rounds, down two: every change confirmed
        clock.advance(30)
        report(engine, everyone_refused if index % 4 >= 2 else None)
    assert state(engine) is VerdictState.DEGRADED
    steady = []
    for _ in range(stable_after + 2):
        clock.advance(30)
        report(engine)
        steady.append(state(engine))
    # Each view, down after the last two rounds, needs recover_after (2) successes to be
    # up, and stable_after results agreeing with that to stop flapping: whichever is
    # later; the 20-result window still holds six changes.
    settled = max(stable_after, 2)
    assert steady[settled - 1 :] == [VerdictState.UP] * (len(steady) - settled + 1), steady
    assert VerdictState.UP not in steady[: settled - 1], steady


def test_a_target_is_flapping_as_soon_as_it_goes_down_the_second_time() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=True)
    report(engine)
    refused = FailureClass.CONNECT_REFUSED
    transitions: list[Transition] = []
    for failure in (refused, None, refused, None, refused):
        clock.advance(30)
        transitions += report(engine, dict.fromkeys(FLEET, refused) if failure else None)
        transitions += answer(engine, failure)

    # Down, up, and down again: three changes of every view's confirmed state, and it
    # stays degraded while it goes on.
    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.UP, VerdictState.GLOBAL),
        (VerdictState.GLOBAL, VerdictState.UP),
        (VerdictState.UP, VerdictState.DEGRADED),
    ]


def test_twenty_percent_random_loss_is_no_outage_and_no_flapping() -> None:
    import random

    rng = random.Random(7)
    clock = FakeClock()
    engine = engine_with_fleet(clock, second_opinion=True, adaptive_confirmation=True)
    report(engine)
    seen: set[VerdictState] = set()
    for _ in range(300):
        clock.advance(30)
        lost = {a: FailureClass.CONNECT_TIMEOUT for a in FLEET if rng.random() < 0.2}
        report(engine, lost)
        # The second opinions asked for are answered at once, with the same loss.
        for request in engine.take_requests():
            for agent in request.agents:
                failure = FailureClass.CONNECT_TIMEOUT if rng.random() < 0.2 else None
                engine.observe(agent, result("web", failure))
        engine.tick()
        seen.add(state(engine))

    assert seen <= {VerdictState.UP, VerdictState.LOCAL}, seen


def test_a_check_s_own_thresholds_override_the_engine_s() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, checks=())
    strict = parse_check(
        {"name": "strict", "type": "http", "target": "http://example.org/", "interval": 30,
         "timeout": 10, "verdict": {"fail_after": 3, "min_agents": 2}}
    )  # fmt: skip
    engine.set_checks([check("web"), strict])
    everyone_refused = dict.fromkeys(FLEET, FailureClass.CONNECT_REFUSED)
    for name in ("web", "strict"):
        report(engine, name=name)
    for _ in range(2):
        for name in ("web", "strict"):
            report(engine, everyone_refused, name=name)
    assert state(engine, "web") is VerdictState.GLOBAL  # fail_after 2
    assert state(engine, "strict") is VerdictState.UP  # fail_after 3: not yet
    report(engine, everyone_refused, name="strict")
    assert state(engine, "strict") is VerdictState.GLOBAL


def test_an_agent_whose_canaries_are_all_down_is_impaired_whatever_its_peers_see() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock, checks=())
    canary = parse_check(
        {"name": "canary", "type": "icmp", "target": "198.18.0.1", "interval": 30,
         "timeout": 10, "canary": True}
    )  # fmt: skip
    engine.set_checks([check("web"), canary])
    refused = FailureClass.CONNECT_REFUSED
    for name in ("web", "canary"):
        report(engine, name=name)
    assert engine.impaired() == frozenset()

    # us-1 loses its own connectivity: its canary fails, and so does web from there.
    for _ in range(2):
        clock.advance(30)
        report(engine, {"us-1": FailureClass.TIMEOUT}, name="canary")
        report(engine, {"us-1": refused}, name="web")

    assert engine.impaired() == {"us-1"}
    assert state(engine, "web") is VerdictState.UP
    assert "impaired, not counted: us-1" in reason_of(engine, "web")

    for _ in range(2):
        clock.advance(30)
        report(engine, name="canary")
        report(engine, name="web")
    assert engine.impaired() == frozenset()


# -- measurements ------------------------------------------------------------------------


def measured(
    phases: tuple[float, ...] = (), failure: FailureClass | None = None, expiry: float = 0.0
) -> ProbeResult:
    """A web result with phase timings and, with ``expiry``, a TLS session."""
    tls = TlsDetails("TLSv1.3", "", expiry) if expiry else None
    details = HttpDetails(status_code=200, tls=tls)
    at = FakeClock.latest.now if FakeClock.latest is not None else T0
    found = (
        ProbeOutcome(True, None, "", Phases(*phases), details)
        if failure is None
        else ProbeOutcome.failed(failure, "failed here", Phases(*phases), details)
    )
    return ProbeResult("web", 1, next(_seq), at, 0.05, found)


def test_measurements_come_from_the_views_that_count() -> None:
    """Phase means per region over fresh, healthy views whose latest result succeeded; the
    earliest certificate expiry they saw, kept through failures; failures by region and
    class."""
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    engine.observe("eu-1", measured((0.001, 0.002, 0.003, 0.010, 0.001), expiry=T0 + 9e5))
    engine.observe("eu-2", measured((0.003, 0.004, 0.005, 0.030, 0.001), expiry=T0 + 8e5))
    engine.observe("us-1", measured((0.002, 0.020, 0.003, 0.050, 0.002), expiry=T0 + 7e5))
    engine.observe("us-2", measured(failure=FailureClass.CONNECT_REFUSED))
    engine.observe("us-2", measured(failure=FailureClass.CONNECT_REFUSED))
    engine.observe("ap-1", measured((0.001, 0.001, 0.001, 0.001, 0.001)))

    (web,) = engine.measurements()
    assert web.check == "web"
    assert web.phases["eu"] == pytest.approx((0.002, 0.003, 0.004, 0.020, 0.001))
    assert web.phases["us"] == pytest.approx((0.002, 0.020, 0.003, 0.050, 0.002))  # us-2 fails
    assert web.cert_expiry == T0 + 7e5
    assert web.failures == {("us", FailureClass.CONNECT_REFUSED): 2}

    # us-1 fails without a TLS session: its expiry stays, its phases go.
    engine.observe("us-1", measured(failure=FailureClass.CONNECT_TIMEOUT))
    (web,) = engine.measurements()
    assert "us" not in web.phases
    assert web.cert_expiry == T0 + 7e5
    # Disconnected and stale views count no more.
    engine.agent_disconnected("us-1")
    clock.advance(WINDOW / 2)
    engine.observe("eu-1", measured((0.001, 0.002, 0.003, 0.010, 0.001)))
    clock.advance(WINDOW / 2 + 1)  # every view but eu-1's is stale
    (web,) = engine.measurements()
    assert web.phases == {"eu": pytest.approx((0.001, 0.002, 0.003, 0.010, 0.001))}
    assert web.cert_expiry == T0 + 9e5
    assert web.failures == {
        ("us", FailureClass.CONNECT_REFUSED): 2,
        ("us", FailureClass.CONNECT_TIMEOUT): 1,
    }


# -- restore: a restarted coordinator's starting point -----------------------------------


def restored_engine(clock: FakeClock, previous: VerdictState, grace: float = 30) -> VerdictEngine:
    """A fresh engine (no agent yet) given ``previous`` as web's last verdict."""
    engine = VerdictEngine(EngineSettings(second_opinion=False, adaptive_confirmation=False), clock)
    engine.set_checks([check()])
    before = Verdict("web", previous, T0 - 3600, reason="from the store")
    assert engine.restore([before], grace) == 1
    return engine


def test_a_restored_verdict_is_flagged_until_fresh_results_confirm_it() -> None:
    clock = FakeClock()
    engine = restored_engine(clock, VerdictState.UP)
    verdict = engine.verdict("web")
    assert verdict is not None
    assert (verdict.state, verdict.unconfirmed, verdict.since) == (VerdictState.UP, True, T0 - 3600)
    # Agents come back one by one: too few to say anything keeps the restored verdict.
    transitions = []
    for agent, region in FLEET.items():
        transitions += engine.agent_connected(agent, region)
        transitions += engine.observe(agent, result("web"))
    assert transitions == []  # confirmed: the same state, no transition
    verdict = engine.verdict("web")
    assert verdict is not None
    assert (verdict.state, verdict.unconfirmed, verdict.since) == (
        VerdictState.UP,
        False,
        T0 - 3600,
    )


def test_a_restored_verdict_the_results_contradict_moves_with_one_transition() -> None:
    clock = FakeClock()
    engine = restored_engine(clock, VerdictState.GLOBAL)
    transitions = []
    for agent, region in FLEET.items():
        transitions += engine.agent_connected(agent, region)
        transitions += engine.observe(agent, result("web"))
    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.GLOBAL, VerdictState.UP)
    ]
    assert engine.verdict("web").unconfirmed is False  # type: ignore[union-attr]


def test_a_restored_verdict_nobody_confirms_goes_unknown_after_window_and_grace() -> None:
    clock = FakeClock()
    engine = restored_engine(clock, VerdictState.REGIONAL, grace=30)
    clock.advance(WINDOW + 29)
    assert engine.tick() == []
    assert state(engine) is VerdictState.REGIONAL
    clock.advance(2)
    transitions = engine.tick()
    assert [(t.previous, t.verdict.state) for t in transitions] == [
        (VerdictState.REGIONAL, VerdictState.UNKNOWN)
    ]
    assert engine.verdict("web").unconfirmed is False  # type: ignore[union-attr]


def test_restore_skips_unknown_and_checks_no_longer_in_the_set() -> None:
    clock = FakeClock()
    engine = VerdictEngine(EngineSettings(), clock)
    engine.set_checks([check()])
    gone = Verdict("gone", VerdictState.GLOBAL, T0)
    unknown = Verdict("web", VerdictState.UNKNOWN, T0)
    assert engine.restore([gone, unknown], 30) == 0
    assert engine.verdict("gone") is None
    assert engine.verdict("web").unconfirmed is False  # type: ignore[union-attr]


def test_a_late_result_counts_as_a_failure_and_leaves_the_verdict_alone() -> None:
    clock = FakeClock()
    engine = engine_with_fleet(clock)
    report(engine)
    assert state(engine) is VerdictState.UP
    engine.observe_late("eu", result("web", FailureClass.CONNECT_TIMEOUT, at=T0 - 3600))
    assert state(engine) is VerdictState.UP
    (measured,) = engine.measurements()
    assert measured.failures == {("eu", FailureClass.CONNECT_TIMEOUT): 1}
    assert engine.stale_window("web") == WINDOW
