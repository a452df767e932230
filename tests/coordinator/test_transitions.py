"""Transition ids, and watchers that fall behind."""

from __future__ import annotations

import time

import pytest

from coordinator.fleet import AgentInfo
from coordinator.metrics import CoordinatorMetrics
from coordinator.transitions import TransitionFeed, TransitionLog, WatcherOverflow
from coordinator.verdicts import Transition, Verdict, VerdictState


def _transition(check: str, state: VerdictState) -> Transition:
    now = time.time()
    return Transition(check, VerdictState.UNKNOWN, Verdict(check, state, now), now)


def _metrics() -> CoordinatorMetrics:
    no_agents: list[AgentInfo] = []
    return CoordinatorMetrics(version="t", verdicts=list, agents=lambda: no_agents)


def test_ids_increase_by_one_and_recent_ones_are_kept() -> None:
    log = TransitionLog()
    ids = [log.append(_transition(name, VerdictState.UP)).id for name in "abc"]
    assert ids == [1, 2, 3]
    assert [recorded.transition.check for recorded in log.recent(2)] == ["b", "c"]


async def test_a_watcher_that_falls_behind_is_cut_off_and_others_are_not() -> None:
    metrics = _metrics()
    feed = TransitionFeed(metrics, capacity=2)
    log = TransitionLog()
    slow = feed.subscribe()
    fast = feed.subscribe()
    received = []
    for name in "abc":
        feed.publish(log.append(_transition(name, VerdictState.GLOBAL)))
        async for recorded in fast:
            received.append(recorded.transition.check)
            break
    assert received == ["a", "b", "c"]
    with pytest.raises(WatcherOverflow):
        async for _ in slow:
            pass
    assert metrics.registry.get_sample_value("vantage_watch_streams_overflowed_total") == 1
    assert metrics.registry.get_sample_value("vantage_watch_streams_open") == 1
    with fast:
        pass
    assert metrics.registry.get_sample_value("vantage_watch_streams_open") == 0


async def test_the_coordinators_own_watchers_are_not_client_watch_streams() -> None:
    metrics = _metrics()
    feed = TransitionFeed(metrics, capacity=1)
    log = TransitionLog()
    with feed.subscribe(counted=False) as own:  # the MQTT publisher's
        assert metrics.registry.get_sample_value("vantage_watch_streams_open") == 0
        for name in "ab":
            feed.publish(log.append(_transition(name, VerdictState.GLOBAL)))
        with pytest.raises(WatcherOverflow):
            async for _ in own:
                pass
    assert metrics.registry.get_sample_value("vantage_watch_streams_overflowed_total") == 0
    assert metrics.registry.get_sample_value("vantage_watch_streams_open") == 0
