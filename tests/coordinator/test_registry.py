"""The check set and what changes when it is replaced."""

from __future__ import annotations

from coordinator.registry import CheckRegistry
from vantage.checks import parse_check


def _tcp(name: str, target: str = "h:1") -> object:
    return parse_check({"name": name, "type": "tcp", "target": target})


def test_change_names_new_changed_and_removed_checks() -> None:
    registry = CheckRegistry([_tcp("a"), _tcp("b"), _tcp("c")])  # type: ignore[list-item]
    new = [_tcp("b"), _tcp("c", "h:2"), _tcp("d")]
    change = registry.change_to(new)  # type: ignore[arg-type]
    assert [check.name for check in change.upserts] == ["c", "d"]
    assert change.removed == ("a",)
    assert [check.name for check in registry] == ["a", "b", "c"]  # nothing applied yet
    registry.replace(new)  # type: ignore[arg-type]
    assert "a" not in registry
    assert len(registry) == 3
    assert not registry.change_to(new)  # type: ignore[arg-type]
