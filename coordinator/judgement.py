"""The pure judgement of a check: what its regions' agents say, tallied per region
(``RegionTally``), makes each region's state and the check's verdict with its one-line
reason (``judge``), under the thresholds of ``EngineSettings``. Rules 7 and 8 of
docs/verdict-engine.md.

No state, no clock: the engine judges its views with it, on-demand checks
(``coordinator.ondemand``) their agents' one-off answers.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from vantage.checks import VerdictOptions
from vantage.results import FailureClass

from .verdicts import RegionState, RegionView, VerdictState

# Agents named one by one in a reason; the rest are summarised as "N more".
_NAMED_AGENTS = 5


# An ordinary class even when compiled (vantage.native): a compiled class would refuse a
# value of the wrong type with its own TypeError before validation names the setting.
@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The engine's thresholds (docs/verdict-engine.md, "Parameters"). Validated on
    construction."""

    min_agents: int = 3
    min_regions: int = 2
    min_region_agents: int = 1
    fail_after: int = 2
    recover_after: int = 2
    stale_intervals: float = 2.0
    impaired_share: float = 0.5
    impaired_min_checks: int = 3
    second_opinion: bool = True
    second_opinion_slack: float = 1.0
    adaptive_confirmation: bool = True
    max_false_down: float = 1e-5
    loss_memory: int = 20
    stable_after: int = 5

    def for_check(self, options: VerdictOptions) -> EngineSettings:
        """These settings with one check's own thresholds (its ``verdict:`` options)."""
        if not options.overrides():
            return self
        return dataclasses.replace(
            self,
            min_agents=_chosen(options.min_agents, self.min_agents),
            min_regions=_chosen(options.min_regions, self.min_regions),
            min_region_agents=_chosen(options.min_region_agents, self.min_region_agents),
            fail_after=_chosen(options.fail_after, self.fail_after),
            recover_after=_chosen(options.recover_after, self.recover_after),
        )

    def failures_needed(self, loss: float) -> int:
        """Failures in a row that confirm a view down, for a view whose probes fail at
        random ``loss`` of the time while the check is up: at least ``fail_after``, and
        enough that random loss alone does it with at most ``max_false_down`` chance
        (only ``fail_after`` without ``adaptive_confirmation``)."""
        if not self.adaptive_confirmation or loss <= self.max_false_down:
            return self.fail_after
        return max(self.fail_after, math.ceil(math.log(self.max_false_down) / math.log(loss)))

    def __post_init__(self) -> None:
        for name in (
            "min_agents",
            "min_regions",
            "min_region_agents",
            "fail_after",
            "recover_after",
            "impaired_min_checks",
            "loss_memory",
            "stable_after",
        ):
            _require_count(name, getattr(self, name))
        slack = self.second_opinion_slack
        if isinstance(slack, bool) or not isinstance(slack, int | float) or not slack >= 0:
            raise ValueError(f"second_opinion_slack must be a number of seconds, got {slack!r}")
        chance = self.max_false_down
        if isinstance(chance, bool) or not isinstance(chance, int | float) or not 0 < chance < 1:
            raise ValueError(f"max_false_down must be a number between 0 and 1, got {chance!r}")
        share = self.impaired_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
            raise ValueError(f"impaired_share must be a number between 0 and 1, got {share!r}")
        value = self.stale_intervals
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"stale_intervals must be a number above 0, got {value!r}")


def _chosen(own: int | None, default: int) -> int:
    return default if own is None else own


def _require_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


class RegionTally:
    """What one region's agents say about a check, the input of ``judge``: how many see
    it up (flapping ones included), which see it down with their failure class, how many
    are stale, and which of the up ones flap."""

    __slots__ = ("failing", "flapping", "stale", "up")

    def __init__(self) -> None:
        self.up = 0
        self.stale = 0
        self.failing: list[tuple[str, FailureClass | None]] = []
        self.flapping: list[str] = []


@dataclass(frozen=True, slots=True)
class Judgement:
    """A check's verdict state with its evidence, as ``judge`` reaches it."""

    state: VerdictState
    regions: dict[str, RegionView]
    regions_down: tuple[str, ...]
    failure: FailureClass | None
    reason: str
    stale: int  # agents counted stale, over every region


def judge(
    settings: EngineSettings, tallies: dict[str, RegionTally], impaired: list[str]
) -> Judgement:
    """The verdict that what each region's agents say supports, under ``settings``
    (rules 7 and 8 of docs/verdict-engine.md): each region's state, then the check's.

    Pure, and shared: the engine judges its views with it, on-demand checks
    (``coordinator.ondemand``) their agents' one-off answers. ``impaired`` names agents
    left out of the tallies for being impaired; the reason mentions them.
    """
    regions: dict[str, RegionView] = {}
    failing: list[tuple[str, FailureClass | None]] = []
    flapping: list[str] = []
    counted = stale = 0
    for region in sorted(tallies):
        tally = tallies[region]
        tally.failing.sort()
        down = len(tally.failing)
        members = tally.up + down
        # Down takes a majority *and* enough down agents: an agent that sees the
        # check up must never be what tips a region into down.
        if 2 * down > members:
            enough = down >= settings.min_region_agents
            region_state = RegionState.DOWN if enough else RegionState.UNKNOWN
        elif members >= settings.min_region_agents:
            region_state = RegionState.UP
        else:
            region_state = RegionState.UNKNOWN
        regions[region] = RegionView(
            state=region_state,
            up=tally.up,
            down=down,
            stale=tally.stale,
            failure=_dominant(tally.failing),
            failing_agents=tuple(name for name, _ in tally.failing),
        )
        failing.extend(tally.failing)
        flapping.extend(tally.flapping)
        counted += members
        stale += tally.stale
    failing.sort()
    state, reason = _classify(settings, regions, counted, stale, failing, sorted(flapping))
    if impaired:
        reason = f"{reason}; impaired, not counted: {', '.join(sorted(impaired))}"
    return Judgement(
        state=state,
        regions=regions,
        regions_down=tuple(r for r, v in regions.items() if v.state is RegionState.DOWN),
        failure=_dominant(failing),
        reason=reason,
        stale=stale,
    )


def _classify(
    settings: EngineSettings,
    regions: dict[str, RegionView],
    counted: int,
    stale: int,
    failing: list[tuple[str, FailureClass | None]],
    flapping: list[str],
) -> tuple[VerdictState, str]:
    """The verdict state and its one-line reason from the region views, under the
    check's ``settings``.

    Impaired agents are already left out of ``regions``, ``counted`` and
    ``failing``; ``flapping`` names the counted agents whose views flap.
    """
    down = [r for r, v in regions.items() if v.state is RegionState.DOWN]
    up = [r for r, v in regions.items() if v.state is RegionState.UP]
    known = len(down) + len(up)
    if counted < settings.min_agents:
        having = f"only {counted}" if counted else "no"
        stale_note = f" ({stale} stale)" if stale else ""
        return (
            VerdictState.UNKNOWN,
            f"{having} fresh {_plural(counted, 'agent')}, {settings.min_agents} needed{stale_note}",
        )
    if known < settings.min_regions:
        having = f"only {known} {_plural(known, 'region')}" if known else "no region"
        listed = f" ({', '.join(sorted(down + up))})" if known else ""
        return (
            VerdictState.UNKNOWN,
            f"{having} with enough fresh agents{listed}, {settings.min_regions} needed",
        )
    if down and not up:
        if len(failing) < settings.min_agents:
            return (
                VerdictState.UNKNOWN,
                f"down in every region ({', '.join(down)}) but from only "
                f"{len(failing)} {_plural(len(failing), 'agent')}, "
                f"{settings.min_agents} needed",
            )
        return (
            VerdictState.GLOBAL,
            f"down from {len(failing)}/{counted} agents in {len(down)} "
            f"{_plural(len(down), 'region')}{_parenthesised(_dominant(failing))}",
        )
    if down:
        where = ", ".join(f"{r}{_parenthesised(regions[r].failure)}" for r in down)
        return VerdictState.REGIONAL, f"down in {where}; up in {', '.join(up)}"
    if failing:
        named = [f"{name}{_parenthesised(failure)}" for name, failure in failing]
        return (
            VerdictState.LOCAL,
            f"failing from {len(failing)}/{counted} agents: {_named(named)}",
        )
    if flapping and 2 * len(flapping) >= counted:
        return (
            VerdictState.DEGRADED,
            f"flapping from {len(flapping)}/{counted} agents: {_named(flapping)}",
        )
    return (
        VerdictState.UP,
        f"up from {counted}/{counted} agents in {known} {_plural(known, 'region')}",
    )


def _dominant(failing: list[tuple[str, FailureClass | None]]) -> FailureClass | None:
    """The most common failure class among ``(agent, failure)`` pairs; a tie goes to the
    name that sorts first."""
    if not failing:  # the usual case, and the cheap one
        return None
    counts = Counter(failure for _, failure in failing if failure is not None)
    if not counts:
        return None
    return min(counts, key=lambda failure: (-counts[failure], failure.value))


def _named(names: list[str]) -> str:
    """Agents named one by one, up to ``_NAMED_AGENTS``; the rest as "N more"."""
    if len(names) > _NAMED_AGENTS:
        names = [*names[:_NAMED_AGENTS], f"{len(names) - _NAMED_AGENTS} more"]
    return ", ".join(names)


def _parenthesised(failure: FailureClass | None) -> str:
    return f" ({failure.value})" if failure is not None else ""


def _plural(count: int, noun: str) -> str:
    return noun if count == 1 else f"{noun}s"
