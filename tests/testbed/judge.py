"""Judging a run: the scenario's ``expect`` and ``never`` entries and the verdict history,
from what the ``Observer`` recorded. Pure functions over recorded data (no I/O), so they
are tested on made-up records.

A check's verdict over time is a list of ``Moment`` values: one per transition (the
watch stream decides the *state*), per poll (evidence that moves without a transition:
regions down, failure) and per fleet poll (which agents are impaired). Before a check's
first transition in a coordinator's life the coordinator shows a placeholder ``unknown``
(no result yet); it counts for ``expect`` (it is what a user sees) but not for ``never``:
``never: unknown`` means "no verdict of the run is unknown", not "results were there
before the first probe ran".

- An ``expect`` entry is met when some moment in force during [at, at+within] matches
  it: the state, and when given the exact set of regions down, the dominant failure
  class and the exact set of impaired agents.
- A ``never`` entry is broken by any non-placeholder moment that matches it.
- The history has no gap or duplicate when, per coordinator life, transition ids run
  1, 2, 3... without a hole or a repeat, each transition's ``previous`` is the state the
  one before it left, no transition repeats the state it comes from, and the final
  polled state of every check is the last transition's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .observer import Record
from .scenario import Expectation


@dataclass(frozen=True, slots=True)
class Moment:
    t: float  # seconds from the run's start (all agents connected)
    state: str
    placeholder: bool
    evidence: dict[str, Any] | None
    impaired: frozenset[str] | None

    def describe(self) -> str:
        text = self.state
        if self.evidence is not None:
            if self.evidence.get("regions_down"):
                text += f" down [{', '.join(self.evidence['regions_down'])}]"
            if self.evidence.get("failure"):
                text += f" ({self.evidence['failure']})"
        if self.impaired:
            text += f" impaired [{', '.join(sorted(self.impaired))}]"
        return text


@dataclass
class Finding:
    """One line of the report (``ok`` or not), with details printed under it on a miss."""

    ok: bool
    line: str
    details: list[str] = field(default_factory=list)


def moments(record: Record, check: str, t0: float) -> list[Moment]:
    """The check's verdict over the run, one moment per observation, in time order."""
    events: list[tuple[float, int, Any]] = []
    events += [(epoch_start, 0, ("epoch", n)) for n, epoch_start in enumerate(record.epochs)]
    events += [(seen.at, 1, seen) for seen in record.transitions if seen.check == check]
    events += [(seen.at, 2, seen) for seen in record.verdicts if check in seen.verdicts]
    events += [(seen.at, 3, seen) for seen in record.agents]
    events.sort(key=lambda event: (event[0], event[1]))
    state, placeholder, evidence = "unknown", True, None
    epoch = 0
    impaired: frozenset[str] | None = None
    result: list[Moment] = []
    for at, kind, seen in events:
        if kind == 0:
            epoch = seen[1]
            state, placeholder, evidence = "unknown", True, None
        elif kind == 1:
            if seen.epoch != epoch:
                continue
            state, placeholder, evidence = seen.verdict["state"], False, seen.verdict
        elif kind == 2:
            verdict = seen.verdicts[check]
            if seen.epoch != epoch or verdict["state"] != state:
                continue  # a poll racing a transition: the watch stream decides the state
            evidence = verdict
        else:
            impaired = frozenset(agent["name"] for agent in seen.agents if agent["impaired"])
        result.append(Moment(at - t0, state, placeholder, evidence, impaired))
    return result


def matches(expectation: Expectation, moment: Moment) -> bool:
    if moment.state != expectation.state:
        return False
    evidence = moment.evidence or {}
    if expectation.regions_down is not None and (
        moment.evidence is None or set(evidence["regions_down"]) != expectation.regions_down
    ):
        return False
    if expectation.failure is not None and evidence.get("failure") != expectation.failure:
        return False
    return expectation.impaired is None or moment.impaired == expectation.impaired


def segments(moments_: Sequence[Moment], start: float, end: float) -> list[str]:
    """What was seen between ``start`` and ``end``: 'up 0.0-3.2s', one per change."""
    in_force = [m for m in moments_ if m.t <= start][-1:]
    window = in_force + [m for m in moments_ if start < m.t <= end]
    parts: list[tuple[float, str]] = []
    for moment in window:
        text = moment.describe() + (" (no verdict yet)" if moment.placeholder else "")
        if not parts or parts[-1][1] != text:
            parts.append((max(moment.t, start), text))
    spans = []
    for index, (begin, text) in enumerate(parts):
        finish = parts[index + 1][0] if index + 1 < len(parts) else end
        spans.append(f"{text} {begin:.1f}-{finish:.1f}s")
    return spans or ["nothing (no observation)"]


def judge_expectation(expectation: Expectation, moments_: Sequence[Moment]) -> Finding:
    start, end = expectation.at, expectation.at + expectation.within
    label = f"{expectation.describe()} @{start:g}s+{expectation.within:g}s"
    in_force = [m for m in moments_ if m.t <= start][-1:]
    for moment in in_force + [m for m in moments_ if start < m.t <= end]:
        if matches(expectation, moment):
            when = max(moment.t, start)
            return Finding(True, f"met     {label}: at {when:.1f}s: {moment.describe()}")
    seen = "; ".join(segments(moments_, start, end))
    return Finding(False, f"MISSED  {label}: seen {seen}")


def judge_never(expectation: Expectation, moments_: Sequence[Moment], end: float) -> Finding:
    label = f"never {expectation.describe()}"
    spans: list[list[Any]] = []  # [start, finish, descriptions]
    inside = False
    for moment in moments_:
        if moment.t > end:
            break
        hit = not moment.placeholder and matches(expectation, moment)
        if hit and not inside:
            spans.append([moment.t, end, []])
        elif inside and not hit:
            spans[-1][1] = moment.t
        if hit and moment.describe() not in spans[-1][2]:
            spans[-1][2].append(moment.describe())
        inside = hit
    if not spans:
        return Finding(True, f"held    {label}")
    seen = "; ".join(f"{a:.1f}-{b:.1f}s ({', '.join(texts)})" for a, b, texts in spans)
    return Finding(False, f"BROKEN  {label}: seen {seen}")


def judge_history(
    record: Record,
    final_states: dict[str, str],
    metric_transitions: float | None,
) -> Finding:
    """Gap/duplicate check of the transition ids, ``previous`` chain and final states.
    ``metric_transitions`` is the coordinator's ``vantage_verdict_transitions_total``
    summed at the end (None when it could not be read)."""
    problems: list[str] = []
    lives = len(record.epochs)
    total = 0
    last_life: list[Any] = []
    for epoch in range(lives):
        seen = [t for t in record.transitions if t.epoch == epoch]
        total += len(seen)
        last_life = seen
        ids = [t.id for t in seen]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            problems.append(f"life {epoch + 1}: duplicate ids {duplicates}")
        missing = sorted(set(range(1, max(ids, default=0) + 1)) - set(ids))
        if missing:
            problems.append(f"life {epoch + 1}: ids {missing} never seen (a gap)")
        if ids != sorted(ids):
            problems.append(f"life {epoch + 1}: ids out of order: {ids}")
        states: dict[str, str] = {}
        for transition in seen:
            before = states.get(transition.check, "unknown")
            previous = transition.previous or "unknown"
            if previous != before:
                problems.append(
                    f"id {transition.id} ({transition.check}): previous {previous}, but the "
                    f"transition before left it {before}"
                )
            if transition.verdict["state"] == previous:
                problems.append(
                    f"id {transition.id} ({transition.check}): {previous} -> "
                    f"{transition.verdict['state']} repeats the state"
                )
            states[transition.check] = transition.verdict["state"]
    final_stream: dict[str, str] = {}
    for transition in last_life:
        final_stream[transition.check] = transition.verdict["state"]
    for check, state in sorted(final_states.items()):
        streamed = final_stream.get(check, "unknown")
        if streamed != state:
            problems.append(
                f"{check}: the coordinator says {state}, the transitions end at {streamed}"
            )
    if metric_transitions is not None and round(metric_transitions) != len(last_life):
        problems.append(
            f"vantage_verdict_transitions_total is {metric_transitions:g}, "
            f"{len(last_life)} transitions were streamed"
        )
    # Breaks before the watch was confirmed are the coordinator starting; in an earlier
    # life, the scenario restarting it.
    confirmed = record.subscribed.get(lives - 1)
    for at, epoch, code in record.watch_breaks:
        if epoch == lives - 1 and confirmed is not None and at > confirmed:
            problems.append(f"the watch stream broke ({code}) during life {epoch + 1}")
    if problems:
        return Finding(False, "BROKEN  history: " + "; ".join(problems))
    lives_text = f" in {lives} coordinator lives" if lives > 1 else ""
    return Finding(
        True, f"held    history: {total} transitions{lives_text}, ids without gap or duplicate"
    )


def timeline_lines(record: Record, check: str, t0: float) -> list[str]:
    """The check's verdict transitions, one line each, for a miss's explanation."""
    lines = []
    for transition in record.transitions:
        if transition.check != check:
            continue
        verdict = transition.verdict
        life = f"life {transition.epoch + 1} " if len(record.epochs) > 1 else ""
        lines.append(
            f"{transition.at - t0:7.1f}s  {life}#{transition.id:<3} "
            f"{transition.previous or '-'} -> {verdict['state']}: {verdict['reason']}"
        )
    return lines or ["(no transition)"]


def agent_result_lines(
    results: dict[str, list[dict[str, Any]]],
    check: str,
    wall_t0: float,
    until: float,
    keep: int = 4,
) -> list[str]:
    """Each agent's last ``keep`` results for ``check`` up to ``until`` (seconds from the
    start), from the agents' own debug log lines (``probe result``)."""
    lines = []
    for agent, events in sorted(results.items()):
        mine = []
        for event in events:
            if event.get("event") != "probe result" or event.get("check") != check:
                continue
            stamp = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            t = stamp.timestamp() - wall_t0
            if t <= until:
                mine.append((t, event))
        shown = [
            f"{t:.1f}s " + ("ok" if e.get("success") else f"{e.get('failure')}: {e.get('message')}")
            for t, e in mine[-keep:]
        ]
        lines.append(f"{agent}: " + (" | ".join(shown) if shown else "no result"))
    return lines
