"""The verdict engine under the seeded simulator (tests/bench/verdict_sim.py).

Fast runs only: the simulator is deterministic, and faithful enough that an outage
everyone sees reads ``global`` and a healthy fleet reads ``up``. The engine's scores
against its targets are ``make bench-verdict``'s business, not these tests'.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from verdict_sim import (
    AgentOutage,
    Disconnect,
    Fault,
    Flapping,
    Fleet,
    GlobalOutage,
    RandomLoss,
    RegionalOutage,
    Simulator,
    make_checks,
)

from coordinator.verdicts import VerdictState
from vantage.results import FailureClass


def run(seed: int) -> Simulator:
    faults: list[Fault | Disconnect] = [
        GlobalOutage("c0000", 10.0, 18.0),
        RegionalOutage("c0001", "eu", 12.0, 24.0),
        AgentOutage("c0002", "us-2", 8.0, 20.0),
        RandomLoss(0.2, 0.0, 30.0),
        Disconnect("ap-1", 14.0, 22.0),
    ]
    sim = Simulator(make_checks(4), faults=faults, seed=seed)
    sim.run_until(40.0)
    return sim


def test_the_same_seed_gives_the_same_transitions_at_the_same_moments() -> None:
    first, again = run(7), run(7)

    seen = [(c.at, c.check, c.previous, c.state, c.verdict.reason) for c in first.changes]
    assert seen == [(c.at, c.check, c.previous, c.state, c.verdict.reason) for c in again.changes]
    assert first.stats == again.stats
    assert first.impaired_log == again.impaired_log
    assert len(seen) > 4, "the faults moved some verdicts"
    other = run(8)
    assert [(c.at, c.check) for c in other.changes] != [(c.at, c.check) for c in first.changes]


@pytest.mark.parametrize("failure", [FailureClass.CONNECT_REFUSED, FailureClass.CONNECT_TIMEOUT])
def test_a_global_outage_in_three_regions_of_two_is_global_with_its_failure_class(
    failure: FailureClass,
) -> None:
    sim = Simulator(
        make_checks(3), Fleet.build(3, 2), [GlobalOutage("c0001", 10.0, 20.0, failure)], seed=3
    )

    sim.run_until(19.0)

    verdict = sim.verdict("c0001")
    assert verdict.state is VerdictState.GLOBAL
    assert verdict.failure is failure
    assert verdict.regions_down == ("ap", "eu", "us")
    assert [sim.state(name) for name in ("c0000", "c0002")] == [VerdictState.UP] * 2
    entered = [c.state for c in sim.changes if c.check == "c0001" and c.at >= 10.0]
    assert VerdictState.GLOBAL in entered

    sim.run_until(30.0)

    assert sim.state("c0001") is VerdictState.UP


@pytest.mark.parametrize("fleet", ["3x2", "3x3"])
def test_with_no_fault_every_check_ends_up(fleet: str) -> None:
    checks = make_checks(10)
    sim = Simulator(checks, Fleet.parse(fleet), seed=5)

    sim.run_until(20.0)

    assert {sim.state(check.name) for check in checks} == {VerdictState.UP}
    assert sim.stats.dropped == 0
    assert sim.stats.results >= 10 * len(sim.fleet.members) * 9  # every agent, every 2 s
    assert sim.impaired_log == []


def test_a_disconnected_agent_s_results_are_dropped_and_it_resumes_on_return() -> None:
    sim = Simulator(make_checks(2), faults=[Disconnect("eu-1", 5.0, 15.0)], seed=1)

    sim.run_until(14.9)
    during = sim.stats.results
    assert sim.stats.dropped >= 2 * 4, "about two results per check per interval were lost"

    sim.run_until(30.0)
    assert sim.stats.results > during
    assert sim.verdict("c0000").regions["eu"].up == 2


def test_a_flapping_target_alternates_down_and_up_in_spells_of_one_or_two_intervals() -> None:
    flap = Flapping.build("c0000", 10.0, 20, random.Random(4))

    spells = [b - a for a, b in zip(flap.toggles, flap.toggles[1:], strict=False)]
    assert (flap.start, flap.end) == (10.0, 50.0)
    assert all(spell in (2.0, 4.0) for spell in spells[:-1])
    rng = random.Random(0)
    assert flap.fails("eu-1", "eu", "c0000", 10.0, rng) is FailureClass.CONNECT_REFUSED
    assert flap.fails("eu-1", "eu", "c0000", flap.toggles[1], rng) is None
    assert flap.fails("eu-1", "eu", "c0001", 10.0, rng) is None
    assert flap.fails("eu-1", "eu", "c0000", 50.0, rng) is None


def test_an_agent_runs_at_most_two_probes_of_a_check_so_a_quick_one_can_overtake() -> None:
    faults: list[Fault] = [GlobalOutage("c0000", 6.0, 14.0), RandomLoss(0.3, 0.0, 30.0)]
    sim = Simulator(make_checks(3), faults=faults, seed=2, keep_deliveries=True)

    sim.run_until(30.0)

    running: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (started, at)
    overtaken = 0
    for delivery in sim.deliveries:
        key = (delivery.agent, delivery.result.check)
        spans = running.setdefault(key, [])
        # No probe started while two others of the same check were still in flight.
        assert sum(1 for started, at in spans if started < delivery.started < at) <= 1
        if any(started > delivery.started for started, _ in spans):
            overtaken += 1
            assert not delivery.result.success  # only a probe timing out is overtaken
        spans.append((delivery.started, delivery.at))
    assert overtaken > 0, "asked probes ran beside ones timing out"
    assert sim.stats.concurrent > 0
    assert sim.stats.requested == sim.stats.honoured + sim.stats.coalesced + sim.stats.ignored
