"""The set of checks the coordinator currently runs, and what changes when it is replaced.

Every check goes to every agent (assignment by region or capability is a later issue), so
the current set is also every agent's assignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, KeysView
from dataclasses import dataclass

from vantage.checks import AnyCheck


@dataclass(frozen=True, slots=True)
class CheckChange:
    """What moved between two check sets: new or changed specs, and removed names."""

    upserts: tuple[AnyCheck, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removed)


class CheckRegistry:
    """The current checks by name, in file order. Replaced as a whole, never edited."""

    def __init__(self, checks: Iterable[AnyCheck] = ()) -> None:
        self._checks: dict[str, AnyCheck] = {}
        self.replace(checks)

    def __len__(self) -> int:
        return len(self._checks)

    def __iter__(self) -> Iterator[AnyCheck]:
        return iter(tuple(self._checks.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._checks

    def names(self) -> KeysView[str]:
        """The current names, as a live view until the next ``replace``."""
        return self._checks.keys()

    def get(self, name: str) -> AnyCheck | None:
        return self._checks.get(name)

    def change_to(self, checks: Iterable[AnyCheck]) -> CheckChange:
        """What replacing the current set with ``checks`` would change (nothing is applied)."""
        new = {check.name: check for check in checks}
        upserts = tuple(
            check
            for name, check in new.items()
            if name not in self._checks or self._checks[name].revision != check.revision
        )
        removed = tuple(name for name in self._checks if name not in new)
        return CheckChange(upserts, removed)

    def replace(self, checks: Iterable[AnyCheck]) -> None:
        self._checks = {check.name: check for check in checks}
        self._scheduled = sum(1.0 / check.interval for check in self._checks.values())

    @property
    def scheduled_rate(self) -> float:
        """Results a second one agent produces on schedule running every check."""
        return self._scheduled
