"""Verdict values: what the engine concludes about a check, with its evidence.

Plain frozen values, free of protobuf and I/O. The engine (``coordinator.engine``) makes
them; the query service, metrics and the CLI render them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vantage.results import FailureClass


class VerdictState(enum.StrEnum):
    """A check's verdict, lower case on every surface (ARCHITECTURE.md)."""

    UP = "up"
    DEGRADED = "degraded"
    LOCAL = "local"
    REGIONAL = "regional"
    GLOBAL = "global"
    UNKNOWN = "unknown"


class RegionState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"  # too few fresh, healthy agents in the region to say


@dataclass(frozen=True, slots=True)
class RegionView:
    """One region's view of a check: counts of its agents by their confirmed state."""

    state: RegionState
    up: int = 0
    down: int = 0
    stale: int = 0
    failure: FailureClass | None = None  # dominant among the failing agents
    failing_agents: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    check: str
    state: VerdictState
    since: float  # wall-clock seconds of the last transition
    regions: dict[str, RegionView] = field(default_factory=dict)
    regions_down: tuple[str, ...] = ()
    failure: FailureClass | None = None  # dominant over every failing agent
    reason: str = ""
    # Restored from the store by a restarted coordinator and not yet confirmed by fresh
    # results: the state it had before, shown as a starting point rather than unknown.
    unconfirmed: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    """A verdict changed state. ``previous`` is None for a check's first verdict."""

    check: str
    previous: VerdictState | None
    verdict: Verdict
    at: float


@dataclass(frozen=True, slots=True)
class ProbeNow:
    """The engine asks ``agents`` to probe ``check`` at once, out of schedule: a second
    opinion while a check's state wavers (the coordinator sends it over their streams)."""

    check: str
    agents: tuple[str, ...]
