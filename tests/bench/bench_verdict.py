#!/usr/bin/env python3
"""Verdict engine scores from the seeded simulator (``verdict_sim``).

Run with the project's interpreter (or ``make bench-verdict BENCH_ARGS=...``)::

    .venv/bin/python tests/bench/bench_verdict.py [--quick] [--rounds N] [--seed S]
        [--fleet 3x2] [--jobs J] [--out docs/verdict-scores.md]

Six scores, each printed next to its target with "met" or "NOT met":

1. Detection and recovery of global, regional and single-agent outages (2-10 intervals
   long, random start): detection time runs from the earliest failing probe's result to
   the first transition into the expected state; recovery time from the first successful
   probe after the outage to the transition back to ``up``. In intervals.
2. False alarms under 20% independent loss on every agent: check-rounds (one check over
   one interval, sampled at each interval boundary) whose verdict is ``global`` or
   ``regional``. Run as four independent simulations of 200 checks, whatever ``--jobs``.
3. An agent cut off from every target while its peers see them up: named by
   ``impaired()`` within 2 intervals, with no check going regional or global.
4. A target flapping for 20 intervals: transitions produced, ``degraded`` at the end;
   then steady again: intervals until it reads ``up`` (``stable_after``, 5, at most).
5. Agents leaving one region at a time: never ``regional`` or ``global``.
6. ``observe()`` throughput on one core, over a pre-built list of results.

Every trial has its own seed derived from ``--seed``, so the figures do not depend on
``--jobs`` (independent trials run in worker processes; the throughput runs alone, after
them). The table also goes to ``--out`` as markdown, with the date, seed, parameters, the
engine (its source digest and settings) and the machine at the top. Asserts nothing; not
collected by pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import math
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from verdict_sim import (  # noqa: E402
    EPOCH,
    INTERVAL,
    TIMEOUT,
    AgentCutOff,
    AgentOutage,
    Change,
    Disconnect,
    Fault,
    Flapping,
    Fleet,
    GlobalOutage,
    RandomLoss,
    RegionalOutage,
    Simulator,
    Stats,
    make_checks,
)

from coordinator.engine import VerdictEngine  # noqa: E402
from coordinator.judgement import EngineSettings  # noqa: E402
from coordinator.verdicts import Verdict, VerdictState  # noqa: E402
from vantage.results import FailureClass  # noqa: E402

UP, DEGRADED, LOCAL = VerdictState.UP, VerdictState.DEGRADED, VerdictState.LOCAL
REGIONAL, GLOBAL, UNKNOWN = VerdictState.REGIONAL, VerdictState.GLOBAL, VerdictState.UNKNOWN
OUTAGE_KINDS = ("global", "regional", "local")
# Intervals before any fault: a minute of history, so that every verdict has settled on
# up and every view knows its path's random loss (a brand-new view needs one failure more
# in a row: coordinator.views.LOSS_PRIOR).
WARM_UP = 30.0
LOSS = 0.2
LOSS_CHECKS = 200
LOSS_SHARDS = 4  # independent runs of LOSS_CHECKS checks; fixed, so --jobs changes nothing
TARGET_ROUNDS = 1_000_000  # the false-global target is stated over this many check-rounds
FLAP_INTERVALS = 20
SETTLE_WAIT = 25  # intervals a steady-again target is followed for, past its 20-result window
FEW_FLAP_TRANSITIONS = 3  # our reading of "few transitions" over the flapping window
THROUGHPUT_TARGET = 200_000

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """How much of everything to run: --quick or full, with --rounds on top."""

    outage_trials: int
    loss_rounds: int
    impaired_trials: int
    flap_trials: int
    disconnect_trials: int
    throughput_checks: int
    throughput_intervals: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            plan = cls(100, 100_000, 50, 20, 5, 1000, 20)
        else:
            plan = cls(400, TARGET_ROUNDS, 200, 50, 20, 1000, 50)
        if args.rounds is not None:
            plan = dataclasses.replace(plan, loss_rounds=args.rounds)
        return plan

    def describe(self) -> str:
        return (
            f"{self.outage_trials} outages of each kind, {self.loss_rounds:,} check-rounds at "
            f"{LOSS:.0%} loss, {self.impaired_trials} cut-off agents, {self.flap_trials} "
            f"flapping targets, {self.disconnect_trials} disconnect runs, throughput over "
            f"{self.throughput_checks} checks x {self.throughput_intervals} intervals"
        )


@dataclass(frozen=True)
class Row:
    section: str
    metric: str
    figure: str
    target: str = ""
    met: bool | None = None  # None: a figure with no target

    @property
    def status(self) -> str:
        return "" if self.met is None else ("met" if self.met else "NOT met")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    loss_cost: str = ""  # what the false-alarm run costs, for the run-time note
    loss_full_wall: float = 0.0  # projected wall seconds of a full false-alarm run

    def add(
        self, section: str, metric: str, figure: str, target: str = "", met: bool | None = None
    ) -> None:
        self.rows.append(Row(section, metric, figure, target, met))


# -- figures --------------------------------------------------------------------------------


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def in_intervals(seconds: float) -> str:
    return f"{seconds / INTERVAL:.2f} ({seconds:.2f} s)"


def share(count: int, total: int) -> str:
    return f"{count}/{total} ({count / total:.1%})" if total else "0/0"


def path_text(counts: Counter[str], total: int) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{state} {count / total:.0%}" for state, count in counts.most_common())


def trial_rng(seed: int, section: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{section}/{index}")


# -- 1. detection and recovery --------------------------------------------------------------


@dataclass(frozen=True)
class OutageTrial:
    detected_after: float | None  # seconds, earliest failing result -> expected state
    right_class: bool  # the detecting verdict named the fault's failure class
    via: tuple[str, ...]  # states entered before the expected one
    recovered_after: float | None  # seconds, first success after the outage -> up
    recovery_via: tuple[str, ...]  # states entered between detection and up
    transitions: int  # from the earliest failing result to the return to up
    beyond: tuple[str, ...]  # states worse than expected (global for a regional outage...)
    left_up: bool  # the verdict moved at all
    duration: float  # the outage's, seconds


def outage_trial(kind: str, seed: int, index: int, fleet_text: str) -> OutageTrial:
    rng = trial_rng(seed, kind, index)
    fleet = Fleet.parse(fleet_text)
    checks = make_checks(5)
    check = rng.choice(checks).name
    start = rng.uniform(WARM_UP, WARM_UP + 2) * INTERVAL
    end = start + rng.uniform(2, 10) * INTERVAL
    failure = rng.choice((FailureClass.CONNECT_TIMEOUT, FailureClass.CONNECT_REFUSED))
    fault: Fault
    if kind == "global":
        fault = GlobalOutage(check, start, end, failure)
        affected = set(fleet.agents)
        worse: set[VerdictState] = set()

        def expected(verdict: Verdict) -> bool:
            return verdict.state is GLOBAL

    elif kind == "regional":
        region = rng.choice(fleet.regions)
        fault = RegionalOutage(check, region, start, end, failure)
        affected = set(fleet.agents_in(region))
        worse = {GLOBAL}

        def expected(verdict: Verdict) -> bool:
            return verdict.state is REGIONAL and region in verdict.regions_down

    else:
        agent = rng.choice(fleet.agents)
        region = fleet.region_of(agent)
        fault = AgentOutage(check, agent, start, end, failure)
        affected = {agent}
        worse = {REGIONAL, GLOBAL}

        def expected(verdict: Verdict) -> bool:
            view = verdict.regions.get(region)
            return verdict.state is LOCAL and view is not None and agent in view.failing_agents

    sim = Simulator(checks, fleet, [fault], seed=rng.randrange(2**32), keep_deliveries=True)
    sim.run_until(end + 8 * INTERVAL)

    first_fail = min(d.at for d in sim.deliveries if d.fault is fault)
    recovery_start = min(
        (
            d.at
            for d in sim.deliveries
            if d.result.check == check
            and d.agent in affected
            and d.result.success
            and d.started >= end
        ),
        default=None,
    )
    changes = [c for c in sim.changes if c.check == check and c.at >= first_fail]
    detected = None
    via: list[str] = []
    for change in changes:
        if expected(change.verdict):
            detected = change
            break
        if change.state is UP:
            break  # back to up before the outage was recognised
        via.append(change.state.value)
    recovered = None
    if recovery_start is not None:
        recovered = next((c for c in changes if c.state is UP and c.at >= recovery_start), None)
    after = detected.at if detected is not None else first_fail
    until = recovered.at if recovered is not None else math.inf
    return OutageTrial(
        detected_after=detected.at - first_fail if detected is not None else None,
        right_class=detected is not None and detected.verdict.failure is failure,
        via=tuple(via),
        recovered_after=(
            recovered.at - recovery_start
            if recovered is not None and recovery_start is not None
            else None
        ),
        recovery_via=tuple(c.state.value for c in changes if after < c.at < until),
        transitions=sum(1 for c in changes if c.at <= until),
        beyond=tuple(c.state.value for c in changes if c.at <= until and c.state in worse),
        left_up=bool(changes),
        duration=end - start,
    )


def score_outages(report: Report, kind: str, trials: list[OutageTrial]) -> None:
    section = f"1. {kind} outage"
    expected = {"global": "global", "regional": "regional", "local": "local"}[kind]
    total = len(trials)
    times = [t.detected_after for t in trials if t.detected_after is not None]
    detected = len(times)
    report.add(
        section,
        f"detected as {expected}",
        share(detected, total),
        "every outage",
        detected == total,
    )
    if times:
        median, high = statistics.median(times), p95(times)
        report.add(
            section, "detection median, intervals", in_intervals(median), "<= 1", median <= INTERVAL
        )
        report.add(
            section, "detection p95, intervals", in_intervals(high), "<= 2", high <= 2 * INTERVAL
        )
    else:
        report.add(section, "detection median, intervals", "n/a", "<= 1", False)
        report.add(section, "detection p95, intervals", "n/a", "<= 2", False)
    recoveries = [t.recovered_after for t in trials if t.recovered_after is not None]
    moved = sum(1 for t in trials if t.left_up)
    if recoveries:
        median, high = statistics.median(recoveries), p95(recoveries)
        report.add(
            section,
            "recovery median, intervals",
            in_intervals(median),
            "<= 2",
            median <= 2 * INTERVAL,
        )
        report.add(
            section, "recovery p95, intervals", in_intervals(high), "<= 2", high <= 2 * INTERVAL
        )
    else:
        report.add(section, "recovery median, intervals", "n/a", "<= 2", False)
        report.add(section, "recovery p95, intervals", "n/a", "<= 2", False)
    if len(recoveries) < moved:
        report.add(section, "never back to up", share(moved - len(recoveries), moved))
    right = sum(1 for t in trials if t.right_class)
    report.add(section, "failure class named right", share(right, detected))
    via = Counter(state for t in trials for state in set(t.via))
    passed = sum(1 for t in trials if t.via)
    report.add(
        section,
        f"entered other states before {expected}",
        f"{share(passed, total)}: {path_text(via, total)}",
    )
    recovery_via = Counter(state for t in trials for state in set(t.recovery_via))
    report.add(
        section,
        "states on the way back to up",
        f"{share(sum(1 for t in trials if t.recovery_via), total)}: "
        f"{path_text(recovery_via, total)}",
    )
    counts = [t.transitions for t in trials]
    report.add(
        section,
        "transitions per outage",
        f"median {statistics.median(counts):g}, max {max(counts)}",
    )
    if kind != "global":
        beyond = Counter(state for t in trials for state in set(t.beyond))
        worse = sum(1 for t in trials if t.beyond)
        report.add(
            section,
            "went beyond the expected state",
            f"{share(worse, total)}" + (f": {path_text(beyond, total)}" if beyond else ""),
            "never",
            worse == 0,
        )
    missed = [t for t in trials if t.detected_after is None]
    if missed:
        lengths = sorted(t.duration / INTERVAL for t in missed)
        seen = Counter(state for t in missed for state in set(t.via))
        report.notes.append(
            f"{len(missed)} of {total} {kind} outages never read {expected}; they lasted "
            f"{lengths[0]:.1f}-{lengths[-1]:.1f} intervals (all outages: 2-10), and the verdict "
            + (f"went {' / '.join(sorted(seen))} instead." if seen else "stayed up.")
        )
    if passed:
        report.notes.append(
            f"{kind} outages: {passed / total:.0%} of them entered "
            f"{' / '.join(sorted(via))} before the verdict reached {expected} "
            f"(median {statistics.median(counts):g} transitions per outage, up and back)."
        )


# -- 2. false alarms ------------------------------------------------------------------------


@dataclass(frozen=True)
class LossShard:
    sampled: Counter[str]  # verdict states at interval boundaries, one per check-round
    entered: Counter[str]  # transitions into each state, at any moment
    impaired: frozenset[str]  # every agent impaired() named at a tick
    stats: Stats  # over the sampled rounds, warm-up excluded
    seconds: float  # CPU, warm-up included


def loss_shard(seed: int, shard: int, intervals: int, fleet_text: str) -> LossShard:
    started = time.process_time()
    checks = make_checks(LOSS_CHECKS)
    names = [check.name for check in checks]
    sim = Simulator(
        checks,
        Fleet.parse(fleet_text),
        [RandomLoss(LOSS)],
        seed=f"{seed}/loss/{shard}",
        keep_changes=False,
        watch_impaired=False,
    )
    sim.run_until(WARM_UP * INTERVAL)  # the first verdicts are not rounds under test
    warm = dataclasses.replace(sim.stats)
    sampled: Counter[str] = Counter()
    for boundary in range(1, intervals + 1):
        sim.run_until((WARM_UP + boundary) * INTERVAL)
        sampled.update(sim.state(name).value for name in names)
    entered: Counter[str] = Counter()
    for (_, state), count in sim.change_counts.items():
        entered[state.value] += count
    named = frozenset(agent for _, agents in sim.impaired_log for agent in agents)
    return LossShard(
        sampled,
        entered,
        named,
        Stats(
            **{
                name: getattr(sim.stats, name) - getattr(warm, name)
                for name in Stats.__dataclass_fields__
            }
        ),
        time.process_time() - started,
    )


def score_false_alarms(report: Report, shards: list[LossShard], fleet_text: str, jobs: int) -> None:
    section = f"2. {LOSS:.0%} loss, no outage"
    sampled: Counter[str] = Counter()
    entered: Counter[str] = Counter()
    for shard in shards:
        sampled.update(shard.sampled)
        entered.update(shard.entered)
    rounds = sum(sampled.values())
    false_global = sampled[GLOBAL.value]
    false_regional = sampled[REGIONAL.value]
    report.add(
        section,
        f"global check-rounds of {rounds:,}",
        f"{false_global:,} ({false_global / rounds:.2e}/round)",
        f"0 in {TARGET_ROUNDS:,}",
        false_global == 0,
    )
    if rounds < TARGET_ROUNDS:
        report.notes.append(
            f"The false-global target is stated over {TARGET_ROUNDS:,} check-rounds; this run "
            f"had {rounds:,} (--quick or --rounds), so its 'met' only says none were seen."
        )
    report.add(
        section,
        f"regional check-rounds of {rounds:,}",
        f"{false_regional:,} ({false_regional / rounds:.2e}/round)",
        "< 1e-5 per round",
        false_regional / rounds < 1e-5,
    )
    for state in (LOCAL, UNKNOWN, DEGRADED):
        report.add(
            section,
            f"{state} check-rounds",
            f"{sampled[state.value]:,} ({sampled[state.value] / rounds:.2e}/round)",
        )
    report.add(
        section,
        "transitions into global / regional (any moment)",
        f"{entered[GLOBAL.value]:,} / {entered[REGIONAL.value]:,} "
        f"({entered[REGIONAL.value] / rounds:.2e} regional per round)",
    )
    named = frozenset().union(*(shard.impaired for shard in shards))
    report.add(
        section,
        "agents named impaired (sampled each tick)",
        ", ".join(sorted(named)) or "none",
        "none",
        not named,
    )
    stats = Stats()
    for shard in shards:
        for name in Stats.__dataclass_fields__:
            setattr(stats, name, getattr(stats, name) + getattr(shard.stats, name))
    scheduled = len(Fleet.parse(fleet_text).members)  # probes per check-round
    ran = stats.honoured - stats.busy
    report.add(
        section,
        "out-of-schedule probes per check-round",
        f"asked {stats.requested / rounds:.2f}, run {ran / rounds:.2f} (scheduled: {scheduled}); "
        f"{stats.concurrent / rounds:.2f} beside a probe in flight",
    )
    report.add(
        section,
        "scheduled runs skipped (the check's previous run in flight)",
        f"{stats.overran / rounds:.2f} per check-round; results {stats.results / rounds:.2f}",
    )
    if ran / rounds > scheduled / 2:
        report.notes.append(
            f"Under {LOSS:.0%} independent loss the engine asked for "
            f"{stats.requested / rounds:.1f} out-of-schedule probes per check-round, of which "
            f"{ran / rounds:.1f} ran, on top of the {scheduled} scheduled ones "
            f"({stats.results / rounds / scheduled - 1:.0%} more results than the schedule alone)."
        )
    cpu = sum(shard.seconds for shard in shards)
    per_round = cpu / rounds
    full = per_round * TARGET_ROUNDS
    report.add(
        section,
        "simulation cost, engine included",
        f"{per_round * 1e6:.0f} us CPU/round: {TARGET_ROUNDS / 1e6:g}M rounds ~ {full:.0f} s CPU",
    )
    report.loss_cost = (
        f"{TARGET_ROUNDS:,} false-alarm check-rounds cost about {full:.0f} s of CPU with this "
        f"engine ({per_round * 1e6:.0f} us per check-round, engine and simulator, for "
        f"{stats.results / rounds:.1f} results per check-round, out-of-schedule probes included)"
    )
    report.loss_full_wall = full / max(1, min(jobs, LOSS_SHARDS))
    if false_regional:
        report.notes.append(
            f"Under {LOSS:.0%} independent loss and no outage, {false_regional:,} of "
            f"{rounds:,} check-rounds were regional ({false_regional / rounds:.1e}/round, "
            f"target < 1e-5) and {false_global:,} global."
        )


# -- 3. impaired agent ----------------------------------------------------------------------


@dataclass(frozen=True)
class ImpairedTrial:
    impaired_after: float | None  # seconds from the cut until impaired() named the agent
    spread: int  # checks that went regional or global during the trial
    local: int  # checks that went local during the trial
    others: tuple[str, ...]  # other agents impaired() named
    cleared_after: float | None  # seconds from the end of the cut until it was no longer named
    checks: int
    local_seconds: tuple[float, ...]  # per check, time spent local from the cut on


def impaired_trial(seed: int, index: int, fleet_text: str) -> ImpairedTrial:
    rng = trial_rng(seed, "impaired", index)
    fleet = Fleet.parse(fleet_text)
    checks = make_checks(20)
    agent = rng.choice(fleet.agents)
    cut = rng.uniform(WARM_UP, WARM_UP + 2) * INTERVAL
    end = cut + 10 * INTERVAL
    sim = Simulator(checks, fleet, [AgentCutOff(agent, cut, end)], seed=rng.randrange(2**32))
    sim.run_until(end + 5 * INTERVAL)
    named_at = next((at for at, agents in sim.impaired_log if at >= cut and agent in agents), None)
    cleared_at = None
    if named_at is not None:
        cleared_at = next(
            (at for at, agents in sim.impaired_log if at >= end and agent not in agents), None
        )
    during = [c for c in sim.changes if c.at >= cut]
    return ImpairedTrial(
        impaired_after=named_at - cut if named_at is not None else None,
        spread=len({c.check for c in during if c.state in (REGIONAL, GLOBAL)}),
        local=len({c.check for c in during if c.state is LOCAL}),
        others=tuple(sorted({a for _, agents in sim.impaired_log for a in agents} - {agent})),
        cleared_after=cleared_at - end if cleared_at is not None else None,
        checks=len(checks),
        local_seconds=tuple(
            seconds_in(sim.changes, check.name, LOCAL, cut, sim.now) for check in checks
        ),
    )


def seconds_in(
    changes: Sequence[Change], check: str, state: VerdictState, start: float, stop: float
) -> float:
    """How long ``check``'s verdict was ``state`` between ``start`` and ``stop``."""
    current: VerdictState | None = None
    since = start
    total = 0.0
    for change in changes:
        if change.check != check:
            continue
        if change.at >= stop:
            break
        if change.at > start:
            if current is state:
                total += change.at - since
            since = change.at
        current = change.state
    if current is state:
        total += stop - since
    return total


def score_impaired(report: Report, trials: list[ImpairedTrial]) -> None:
    section = "3. agent cut off (20 checks)"
    total = len(trials)
    good = sum(
        1
        for t in trials
        if t.impaired_after is not None and t.impaired_after <= 2 * INTERVAL and not t.spread
    )
    report.add(
        section,
        "impaired within 2 intervals, no regional/global",
        share(good, total),
        ">= 99% of trials",
        good >= 0.99 * total,
    )
    times = [t.impaired_after for t in trials if t.impaired_after is not None]
    report.add(
        section,
        "named impaired at all",
        share(len(times), total),
    )
    report.add(
        section,
        "time to impaired, median / p95",
        f"{in_intervals(statistics.median(times))} / {in_intervals(p95(times))}"
        if times
        else "never named",
    )
    spread = sum(1 for t in trials if t.spread)
    report.add(
        section,
        "trials with a check regional or global",
        share(spread, total),
        "none",
        spread == 0,
    )
    checks = sum(t.checks for t in trials)
    local = sum(t.local for t in trials)
    report.add(section, "checks that went local", share(local, checks))
    spells = [seconds for t in trials for seconds in t.local_seconds if seconds]
    if spells:
        report.add(
            section,
            "time a check spent local, median / max",
            f"{in_intervals(statistics.median(spells))} / {in_intervals(max(spells))}",
        )
    others = sum(1 for t in trials if t.others)
    report.add(
        section, "trials naming another agent impaired", share(others, total), "none", others == 0
    )
    cleared = [t.cleared_after for t in trials if t.cleared_after is not None]
    if times:
        report.add(
            section,
            "no longer impaired after the cut ends, median",
            f"{in_intervals(statistics.median(cleared))} ({len(cleared)}/{len(times)} cleared)"
            if cleared
            else f"never cleared (0/{len(times)})",
        )
    else:
        report.notes.append(
            f"impaired() never named the cut-off agent in {total} trials; meanwhile "
            f"{local / checks:.0%} of the checks went local."
        )


# -- 4. flapping ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FlapTrial:
    transitions: int
    final: str
    states: tuple[str, ...]  # states entered, in order
    first_degraded: float | None  # seconds after the flapping started
    # Intervals from the last toggle (steady up from then on) until the verdict is up;
    # None when it is not within SETTLE_WAIT intervals.
    settled: float | None


def flap_trial(seed: int, index: int, fleet_text: str) -> FlapTrial:
    rng = trial_rng(seed, "flap", index)
    checks = make_checks(5)
    check = rng.choice(checks).name
    start = rng.uniform(WARM_UP, WARM_UP + 2) * INTERVAL
    flap = Flapping.build(check, start, FLAP_INTERVALS, rng)
    sim = Simulator(checks, Fleet.parse(fleet_text), [flap], seed=rng.randrange(2**32))
    sim.run_until(flap.end)
    changes = [c for c in sim.changes if c.check == check and c.at >= start]
    degraded = next((c.at - start for c in changes if c.state is DEGRADED), None)
    final = sim.state(check)
    settled: float | None = 0.0
    if final is not UP:
        sim.run_until(flap.end + SETTLE_WAIT * INTERVAL)
        settled = next(
            ((c.at - flap.end) / INTERVAL for c in sim.changes[len(changes) :] if c.check == check
             and c.at > flap.end and c.state is UP),
            None,
        )  # fmt: skip
    return FlapTrial(
        transitions=len(changes),
        final=final.value,
        states=tuple(c.state.value for c in changes),
        first_degraded=degraded,
        settled=settled,
    )


def score_flapping(report: Report, trials: list[FlapTrial]) -> None:
    section = f"4. flapping for {FLAP_INTERVALS} intervals"
    total = len(trials)
    degraded = sum(1 for t in trials if t.final == DEGRADED.value)
    report.add(
        section, "degraded at the end", share(degraded, total), "every trial", degraded == total
    )
    counts = [t.transitions for t in trials]
    report.add(
        section,
        "transitions while flapping, median / max",
        f"{statistics.median(counts):g} / {max(counts)}",
        f"few (<= {FEW_FLAP_TRANSITIONS})",
        max(counts) <= FEW_FLAP_TRANSITIONS,
    )
    settled = [t.settled for t in trials if t.settled is not None]
    stable_after = EngineSettings().stable_after
    report.add(
        section,
        "steady again: intervals until up, median / max",
        f"{statistics.median(settled):.2f} / {max(settled):.2f}" if settled else "never",
        f"<= {stable_after} (stable_after), every trial",
        len(settled) == total and max(settled) <= stable_after,
    )
    finals = Counter(t.final for t in trials)
    report.add(section, "verdict at the end", path_text(finals, total))
    entered = Counter(state for t in trials for state in t.states)
    report.add(
        section,
        "transitions into each state",
        ", ".join(f"{state} {count}" for state, count in entered.most_common()),
    )
    if degraded < total:
        report.notes.append(
            f"A target flapping for {FLAP_INTERVALS} intervals ended degraded in "
            f"{degraded}/{total} trials and produced a median of "
            f"{statistics.median(counts):g} transitions (max {max(counts)})."
        )


# -- 5. disconnects -------------------------------------------------------------------------


@dataclass(frozen=True)
class DisconnectTrial:
    bad: int  # checks that went regional or global
    entered: tuple[
        tuple[str, str], ...
    ]  # (previous, state) of each transition from the first leave
    unknown_with_one_region: int  # checks unknown while a single region was connected
    up_at_end: int
    checks: int
    dropped: int


def disconnect_trial(seed: int, index: int, fleet_text: str) -> DisconnectTrial:
    rng = trial_rng(seed, "disconnect", index)
    fleet = Fleet.parse(fleet_text)
    checks = make_checks(20)
    regions = list(fleet.regions)
    rng.shuffle(regions)
    first, second = regions[0], regions[1]
    leave1 = rng.uniform(WARM_UP, WARM_UP + 2) * INTERVAL
    leave2 = leave1 + rng.uniform(4, 6) * INTERVAL
    back = leave2 + rng.uniform(5, 8) * INTERVAL
    faults = [
        Disconnect(agent, when + rng.uniform(0, 0.5), back + rng.uniform(0, 0.5))
        for region, when in ((first, leave1), (second, leave2))
        for agent in fleet.agents_in(region)
    ]
    sim = Simulator(checks, fleet, faults, seed=rng.randrange(2**32))
    sim.run_until(back - 0.5 * INTERVAL)
    unknown = sum(1 for check in checks if sim.state(check.name) is UNKNOWN)
    sim.run_until(back + 8 * INTERVAL)
    during = [c for c in sim.changes if c.at >= leave1]
    return DisconnectTrial(
        bad=len({c.check for c in during if c.state in (REGIONAL, GLOBAL)}),
        entered=tuple(
            (c.previous.value if c.previous is not None else "-", c.state.value) for c in during
        ),
        unknown_with_one_region=unknown if len(regions) == 3 else -1,
        up_at_end=sum(1 for check in checks if sim.state(check.name) is UP),
        checks=len(checks),
        dropped=sim.stats.dropped,
    )


def score_disconnects(report: Report, trials: list[DisconnectTrial]) -> None:
    section = "5. agents leave, region by region"
    checks = sum(t.checks for t in trials)
    bad = sum(t.bad for t in trials)
    report.add(
        section, "checks that went regional or global", share(bad, checks), "never", bad == 0
    )
    moves = Counter(f"{previous}->{state}" for t in trials for previous, state in t.entered)
    report.add(
        section,
        "transitions seen",
        ", ".join(f"{move} {count}" for move, count in moves.most_common()) or "none",
    )
    seen = sorted({state for t in trials for _, state in t.entered})
    report.add(section, "states seen", ", ".join(seen) or "none")
    if all(t.unknown_with_one_region >= 0 for t in trials):
        unknown = sum(t.unknown_with_one_region for t in trials)
        report.add(section, "unknown with one region left", share(unknown, checks))
    up = sum(t.up_at_end for t in trials)
    report.add(section, "up again 8 intervals after the return", share(up, checks))


# -- 6. throughput --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


def score_throughput(report: Report, plan: Plan, seed: int, fleet_text: str) -> None:
    """Measured in a fresh interpreter (spawned): the benchmark's own leftovers (every
    trial's results) would otherwise make the garbage collector's passes, and so each
    result, costlier than in a coordinator, whose heap is the engine's own state."""
    section = "6. throughput, one core"
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as alone:
        results, best_cpu, best_wall = alone.submit(
            measure_throughput, plan.throughput_checks, plan.throughput_intervals, seed,
            fleet_text,
        ).result()  # fmt: skip
    rate = results / best_cpu
    report.add(
        section,
        f"results/s folded by observe() ({results:,} results, 2% loss)",
        f"{rate:,.0f} CPU ({results / best_wall:,.0f} wall), "
        f"{best_cpu / results * 1e6:.2f} us each",
        f">= {THROUGHPUT_TARGET:,}/s",
        rate >= THROUGHPUT_TARGET,
    )


def measure_throughput(
    checks_count: int, intervals: int, seed: int, fleet_text: str
) -> tuple[int, float, float]:
    """Results folded, and the best CPU and wall seconds of three passes over them."""
    checks = make_checks(checks_count)
    fleet = Fleet.parse(fleet_text)
    sim = Simulator(
        checks,
        fleet,
        [RandomLoss(0.02)],
        seed=f"{seed}/throughput",
        keep_changes=False,
        keep_deliveries=True,
        watch_impaired=False,
    )
    sim.run_until(intervals * INTERVAL)
    stream = [(EPOCH + d.at, d.agent, d.result) for d in sim.deliveries]
    del sim
    best_cpu = best_wall = math.inf
    for _ in range(3):
        clock = Clock()
        engine = VerdictEngine(EngineSettings(), clock)
        engine.set_checks(checks)
        for agent, region in fleet.members:
            engine.agent_connected(agent, region)
        observe = engine.observe
        next_tick = EPOCH + 1.0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for at, agent, result in stream:
            if at >= next_tick:
                clock.now = next_tick
                engine.tick()
                engine.take_requests()
                next_tick += 1.0
            clock.now = at
            observe(agent, result)
        best_cpu = min(best_cpu, time.process_time() - cpu0)
        best_wall = min(best_wall, time.perf_counter() - wall0)
    return len(stream), best_cpu, best_wall


# -- running --------------------------------------------------------------------------------


def run_all(
    pool: ProcessPoolExecutor | None, fn: Callable[..., T], calls: Iterable[tuple[Any, ...]]
) -> list[T]:
    """``fn(*call)`` for each call, in the pool when there is one; results in call order."""
    calls = list(calls)
    if pool is None:
        return [fn(*call) for call in calls]
    return list(pool.map(fn, *zip(*calls, strict=True), chunksize=max(1, len(calls) // 32)))


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the start); "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}"
    )


ENGINE_FILES = ("coordinator/engine.py", "coordinator/judgement.py", "coordinator/views.py")


def engine_source() -> str:
    """Which engine the scores are for: its files' digest and the checkout they sit in."""
    hashed = hashlib.sha256()
    for name in ENGINE_FILES:
        hashed.update((ROOT / name).read_bytes())
    named = f"coordinator/{{engine,judgement,views}}.py sha256 {hashed.hexdigest()[:12]}"
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", *ENGINE_FILES],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return named
    state = "modified since" if changed else "as in"
    return f"{named} ({state} commit {head})"


def render_text(report: Report) -> str:
    """Sections as headings, then one aligned line per figure."""
    headers = ("metric", "figure", "target", "status")
    rows = [(r.metric, r.figure, r.target, r.status) for r in report.rows]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [line(headers)]
    section = None
    for row in report.rows:
        if row.section != section:
            section = row.section
            lines.append(section)
        lines.append(line((row.metric, row.figure, row.target, row.status)))
    return "\n".join(lines)


def render_markdown(report: Report, header: list[str]) -> str:
    lines = [
        "# Verdict engine scores",
        "",
        "Written by `make bench-verdict` (`tests/bench/bench_verdict.py`, simulator "
        "`tests/bench/verdict_sim.py`); regenerate rather than edit.",
        "",
        *(f"- {line}" for line in header),
        "",
        "| section | metric | figure | target | status |",
        "|---|---|---|---|---|",
    ]
    for row in report.rows:
        status = f"**{row.status}**" if row.met is False else row.status
        cells = (row.section, row.metric, row.figure, row.target, status)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    if report.notes:
        lines += ["", "## Observations", "", *(f"- {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, 100,000 rounds")
    parser.add_argument("--rounds", type=int, help="false-alarm check-rounds (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fleet", default="3x2", help="REGIONSxAGENTS, e.g. 3x2 or 3x3")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes for the trials"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "verdict-scores.md")
    args = parser.parse_args()
    plan = Plan.of(args)
    fleet = Fleet.parse(args.fleet)
    started = time.perf_counter()
    header = [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"seed: {args.seed}",
        f"parameters: fleet {fleet.describe()} ({len(fleet.members)} agents), checks every "
        f"{INTERVAL:g} s with a {TIMEOUT:g} s timeout; {plan.describe()}"
        + (" (--quick)" if args.quick else ""),
        f"engine: {engine_source()}; {EngineSettings()!r}",
        f"machine: {machine()}",
    ]
    print("\n".join(header))
    report = Report()
    intervals = math.ceil(plan.loss_rounds / (LOSS_CHECKS * LOSS_SHARDS))
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(args.jobs, mp_context=context) if args.jobs > 1 else None
    try:
        print("1. outages...", flush=True)
        for kind in OUTAGE_KINDS:
            trials = ((kind, args.seed, index, args.fleet) for index in range(plan.outage_trials))
            score_outages(report, kind, run_all(pool, outage_trial, trials))
        rounds = intervals * LOSS_CHECKS * LOSS_SHARDS
        print(f"2. false alarms ({rounds:,} check-rounds)...", flush=True)
        shards = run_all(
            pool, loss_shard, ((args.seed, n, intervals, args.fleet) for n in range(LOSS_SHARDS))
        )
        score_false_alarms(report, shards, args.fleet, args.jobs)
        print("3. impaired agents...", flush=True)
        calls = ((args.seed, index, args.fleet) for index in range(plan.impaired_trials))
        score_impaired(report, run_all(pool, impaired_trial, calls))
        print("4. flapping...", flush=True)
        calls = ((args.seed, index, args.fleet) for index in range(plan.flap_trials))
        score_flapping(report, run_all(pool, flap_trial, calls))
        print("5. disconnects...", flush=True)
        calls = ((args.seed, index, args.fleet) for index in range(plan.disconnect_trials))
        score_disconnects(report, run_all(pool, disconnect_trial, calls))
    finally:
        if pool is not None:
            pool.shutdown()
    print("6. throughput...", flush=True)
    score_throughput(report, plan, args.seed, args.fleet)
    elapsed = time.perf_counter() - started
    header.append(f"run time: {elapsed:.0f} s wall with --jobs {args.jobs}")
    full_size = not args.quick and plan.loss_rounds >= TARGET_ROUNDS
    if report.loss_full_wall > 120 or (full_size and elapsed > 150):
        report.notes.append(
            f"Too slow for the ~2 minute budget: this run took {elapsed:.0f} s wall (load "
            f"average {os.getloadavg()[0]:.1f} at the end); {report.loss_cost}, about "
            f"{report.loss_full_wall:.0f} s over {min(args.jobs, LOSS_SHARDS)} process(es) on "
            f"an idle machine. Scale the false-alarm run with --rounds."
        )
    print()
    print(render_text(report))
    if report.notes:
        print("\nobservations:")
        for note in report.notes:
            print(f"- {note}")
    print(f"\n{header[-1]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_markdown(report, header))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
