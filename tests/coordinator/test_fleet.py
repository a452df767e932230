"""The fleet's records: connect, replace, disconnect, sequence numbers."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.fleet import INSTANCES_KEPT, AgentFleet, AgentHello
from coordinator.registry import CheckChange


class Link:
    """A live stream as the fleet sees it: records what it was told."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.changes: list[CheckChange] = []
        self.rechecks: list[list[str]] = []

    def assign(self, change: CheckChange) -> None:
        self.changes.append(change)

    def recheck(self, checks: Sequence[str]) -> None:
        self.rechecks.append(list(checks))

    def end(self, reason: str) -> None:
        self.ended.append(reason)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_connect_disconnect_keeps_the_record() -> None:
    clock = Clock()
    fleet = AgentFleet(clock)
    link = Link()
    assert fleet.connect(AgentHello("eu-1", "eu", "1.0", ("http",), "i"), link) is None
    clock.now = 1005.0
    fleet.seen("eu-1")
    fleet.count_result("eu-1")
    fleet.count_result("eu-1", 499)  # a whole batch at once
    [info] = fleet.agents()
    assert (info.connected, info.connected_since, info.last_seen) == (True, 1000.0, 1005.0)
    assert info.results_received == 500
    assert fleet.connected_by_region() == {"eu": 1}
    assert fleet.disconnect("eu-1", link)
    [info] = fleet.agents()
    assert not info.connected
    assert info.connected_since is None
    assert fleet.connected_by_region() == {"eu": 0}
    assert list(fleet.links()) == []


def test_a_new_stream_replaces_the_old_one() -> None:
    fleet = AgentFleet(Clock())
    old, new = Link(), Link()
    fleet.connect(AgentHello("eu-1", "eu"), old)
    assert fleet.connect(AgentHello("eu-1", "eu"), new) is old
    assert old.ended == ["replaced by a newer stream of agent 'eu-1'"]
    # The old stream's own end must not disconnect the agent from its new stream.
    assert not fleet.disconnect("eu-1", old)
    assert fleet.connected_count() == 1
    assert list(fleet.links()) == [new]
    assert fleet.link("eu-1") is new  # what a recheck for eu-1 goes through


def test_link_is_none_for_agents_not_connected() -> None:
    fleet = AgentFleet(Clock())
    link = Link()
    fleet.connect(AgentHello("eu-1", "eu"), link)
    assert fleet.link("eu-1") is link
    fleet.disconnect("eu-1", link)
    assert fleet.link("eu-1") is None
    assert fleet.link("nobody") is None


def test_sequence_numbers_per_instance_are_bounded() -> None:
    fleet = AgentFleet(Clock())
    fleet.connect(AgentHello("eu-1", "eu", instance_id="a"), Link())
    fleet.advance_seq("eu-1", "a", 10)
    fleet.advance_seq("eu-1", "a", 5)
    assert fleet.last_seq("eu-1", "a") == 10
    assert fleet.last_seq("eu-1", "b") == 0
    assert fleet.last_seq("nobody", "a") == 0
    for number in range(INSTANCES_KEPT):
        fleet.advance_seq("eu-1", f"later-{number}", 1)
    assert fleet.last_seq("eu-1", "a") == 0  # the oldest instance was forgotten
