"""Judging recorded runs: expectations in their window, `never`, and the verdict history."""

from __future__ import annotations

from typing import Any

from testbed.judge import judge_expectation, judge_history, judge_never, moments
from testbed.observer import Record, SeenAgents, SeenTransition, SeenVerdicts
from testbed.scenario import Expectation

T0 = 100.0


def verdict(
    state: str, down: list[str] | None = None, failure: str | None = None
) -> dict[str, Any]:
    return {
        "check": "web",
        "state": state,
        "regions_down": down or [],
        "failure": failure,
        "reason": f"{state} for a test",
    }


def transition(
    at: float, id_: int, previous: str | None, state: str, **evidence: Any
) -> SeenTransition:
    return SeenTransition(T0 + at, 0, id_, "web", previous, verdict(state, **evidence))


def outage_record() -> Record:
    """up at 1s; regional (eu, connect_timeout) at 12s, then us too at 14s; up at 41s."""
    record = Record(epochs=[T0 - 5])
    record.transitions = [
        transition(1, 1, "unknown", "up"),
        transition(12, 2, "up", "regional", down=["eu"], failure="connect_timeout"),
        transition(41, 3, "regional", "up"),
    ]
    record.verdicts = [
        SeenVerdicts(T0 + 14, 0, {"web": verdict("regional", ["eu", "us"], "connect_timeout")}),
        SeenVerdicts(T0 + 41.05, 0, {"web": verdict("regional", ["eu"])}),  # raced: ignored
    ]
    record.agents = [
        SeenAgents(T0 + 2, [{"name": "eu-1", "impaired": False}]),
        SeenAgents(T0 + 20, [{"name": "eu-1", "impaired": True}]),
    ]
    return record


def test_an_expectation_is_met_by_a_moment_inside_its_window() -> None:
    seen = moments(outage_record(), "web", T0)
    finding = judge_expectation(
        Expectation("web", "regional", at=10, within=8, regions_down=frozenset({"eu"})), seen
    )
    assert finding.ok
    assert "at 12.0s" in finding.line


def test_evidence_that_moved_without_a_transition_counts() -> None:
    seen = moments(outage_record(), "web", T0)
    both = Expectation("web", "regional", at=10, within=8, regions_down=frozenset({"eu", "us"}))
    assert judge_expectation(both, seen).ok


def test_a_state_outside_the_window_misses_and_says_what_was_seen() -> None:
    seen = moments(outage_record(), "web", T0)
    finding = judge_expectation(Expectation("web", "global", at=10, within=8), seen)
    assert not finding.ok
    assert finding.line.startswith("MISSED")
    assert "up 10.0-12.0s" in finding.line
    assert "regional down [eu] (connect_timeout) 12.0-14.0s" in finding.line


def test_the_state_in_force_when_the_window_opens_counts() -> None:
    seen = moments(outage_record(), "web", T0)
    assert judge_expectation(Expectation("web", "regional", at=30, within=5), seen).ok


def test_impaired_agents_are_an_exact_set() -> None:
    seen = moments(outage_record(), "web", T0)
    impaired = frozenset({"eu-1"})
    assert judge_expectation(Expectation("web", "regional", 15, 10, impaired=impaired), seen).ok
    assert not judge_expectation(Expectation("web", "regional", 12, 3, impaired=impaired), seen).ok
    assert judge_expectation(Expectation("web", "up", 0, 5, impaired=frozenset()), seen).ok


def test_never_ignores_the_placeholder_before_the_first_verdict_only() -> None:
    seen = moments(outage_record(), "web", T0)
    assert judge_never(Expectation("web", "unknown"), seen, end=55).ok
    broken = judge_never(Expectation("web", "regional"), seen, end=55)
    assert not broken.ok
    assert "12.0-41.0s" in broken.line


def test_a_clean_history_holds() -> None:
    finding = judge_history(outage_record(), {"web": "up"}, metric_transitions=3.0)
    assert finding.ok, finding.line
    assert "3 transitions" in finding.line


def test_a_gap_a_duplicate_and_a_broken_chain_are_each_named() -> None:
    record = outage_record()
    record.transitions = [
        transition(1, 1, "unknown", "up"),
        transition(12, 3, "up", "regional"),
        transition(13, 3, "regional", "regional"),
        transition(41, 4, "global", "up"),
    ]
    finding = judge_history(record, {"web": "up"}, metric_transitions=4.0)
    assert not finding.ok
    assert "ids [2] never seen" in finding.line
    assert "duplicate ids [3]" in finding.line
    assert "previous global" in finding.line
    assert "regional -> regional repeats the state" in finding.line


def test_the_history_must_end_where_the_coordinator_is_and_match_its_counter() -> None:
    finding = judge_history(outage_record(), {"web": "global"}, metric_transitions=5.0)
    assert not finding.ok
    assert "the coordinator says global, the transitions end at up" in finding.line
    assert "vantage_verdict_transitions_total is 5" in finding.line


def test_each_coordinator_life_numbers_its_transitions_from_one() -> None:
    record = outage_record()
    record.epochs.append(T0 + 20)
    record.transitions = [
        transition(1, 1, "unknown", "up"),
        SeenTransition(T0 + 25, 1, 1, "web", "unknown", verdict("up")),
    ]
    finding = judge_history(record, {"web": "up"}, metric_transitions=1.0)
    assert finding.ok, finding.line
    assert "in 2 coordinator lives" in finding.line
