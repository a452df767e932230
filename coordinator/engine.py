"""The verdict engine: folds probe results into one verdict per check, with evidence
(how: docs/verdict-engine.md).

A pure module: no I/O, no protobuf, no asyncio. Time comes from an injected clock
(wall-clock seconds), so the engine runs the same under a fake clock in tests. The
coordinator feeds it the fleet's connects and disconnects, the check set and every result,
calls ``tick()`` about once a second, and publishes the transitions it returns. This is
the bookkeeping: which views count (freshness, agent health), second opinions, restore,
measurements; each view is ``coordinator.views``, the judgement ``coordinator.judgement``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vantage.checks import AnyCheck
from vantage.results import FailureClass, ProbeResult

from .judgement import EngineSettings, Judgement, RegionTally, judge
from .verdicts import ProbeNow, Transition, Verdict, VerdictState
from .views import Member, View

# How far an agent's clock may lag the coordinator's before its fresh answers to a second
# opinion are taken for probes that started before the ask (NTP keeps them within ms).
ASK_CLOCK_MARGIN = 0.5
# A probe said to have started longer ago than this is from an agent whose clock is off:
# its start time tells nothing about when it ran relative to the ask.
_PLAUSIBLE_PROBE_AGE = 60.0
# Second opinions one agent may be asked for in one episode, whatever its view needs.
_MAX_ASKS = 12


class _Check:
    __slots__ = (
        "asked",
        "asked_at",
        "dirty",
        "failures",
        "name",
        "next_expiry",
        "pending",
        "restored_until",
        "round_deadline",
        "settings",
        "settle_span",
        "stale",
        "timeout",
        "verdict",
        "views",
        "window",
    )

    def __init__(
        self,
        name: str,
        window: float,
        timeout: float,
        verdict: Verdict,
        settings: EngineSettings,
    ) -> None:
        self.name = name
        self.settings = settings  # the engine's, with the check's own overrides
        self.window = window  # staleness window, seconds
        self.timeout = timeout  # the probe's, seconds: how long a second opinion takes
        self.settle_span = 0.0  # how long a flapping view must agree to be stable (set_checks)
        # An episode of second opinions in progress: the agents asked and not heard from
        # since, until the deadline; how often each agent was asked in the episode.
        self.pending: set[str] = set()
        self.asked: dict[str, int] = {}
        self.asked_at: dict[str, float] = {}  # when each agent was first asked in it
        self.round_deadline = -math.inf
        # A view's contribution changed during the episode: the verdict is re-evaluated
        # when it ends (otherwise the one stored before it is still exact).
        self.dirty = False
        self.views: dict[str, View] = {}
        self.verdict = verdict
        # When the first fresh view of a connected agent goes stale, as of the last
        # evaluation. Only a lower bound afterwards (results make views fresher), so
        # looking again once it has passed is never late, at worst early (_went_stale).
        self.next_expiry = math.inf
        self.stale = 0  # connected agents' stale views, as of the last evaluation
        # Failed results folded, by the agent's region and the failure class.
        self.failures: dict[tuple[str, FailureClass], int] = {}
        # The verdict is a restored one (``restore``), kept while the views cannot say
        # anything (unknown) until this time; -inf: not restored.
        self.restored_until = -math.inf

    def settle(self) -> None:
        """End the episode of second opinions, if any."""
        self.pending.clear()
        self.asked.clear()
        self.asked_at.clear()


class _PhaseSums:
    """Phase timings of a region's views added up (floats unboxed when compiled)."""

    __slots__ = ("connect", "processing", "resolve", "tls", "transfer", "views")

    def __init__(self) -> None:
        self.views = 0
        self.resolve = self.connect = self.tls = self.processing = self.transfer = 0.0

    def add(self, view: View) -> None:
        self.views += 1
        self.resolve += view.resolve
        self.connect += view.connect
        self.tls += view.tls
        self.processing += view.processing
        self.transfer += view.transfer

    def means(self) -> tuple[float, float, float, float, float]:
        n = self.views
        return (
            self.resolve / n,
            self.connect / n,
            self.tls / n,
            self.processing / n,
            self.transfer / n,
        )


@dataclass(frozen=True, slots=True)
class Measurements:
    """What a check's probes measured, beside the verdict (``VerdictEngine.measurements``).

    ``phases``: per region, the mean seconds of each probe phase (``PHASES`` order:
    resolve, connect, tls, processing, transfer) over the counted views whose latest
    result succeeded; a region without one is absent. ``cert_expiry``: the earliest
    certificate expiry (notAfter, Unix seconds) among the latest TLS sessions the counted
    views reported, 0 when none did. ``failures``: failed results folded since the check
    was added, by the agent's region and the failure class.
    """

    check: str
    phases: dict[str, tuple[float, float, float, float, float]]
    cert_expiry: float
    failures: dict[tuple[str, FailureClass], int]


class VerdictEngine:
    """Verdicts for the current check set from the connected agents' results.

    Every method that changes inputs returns the verdict state changes it caused, in
    check-name order; ``verdict()`` and ``verdicts()`` return the current verdicts with
    their evidence as of the last call that changed inputs or ``tick()``. Not thread-safe:
    one caller (the coordinator's event loop) drives it.
    """

    def __init__(self, settings: EngineSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._checks: dict[str, _Check] = {}
        self._agents: dict[str, Member] = {}
        self._longest_window = 0.0
        self._requests: list[ProbeNow] = []
        self._canaries: set[str] = set()  # names of the canary checks
        self._restored: set[str] = set()  # checks whose verdict is still a restored one

    # -- inputs --------------------------------------------------------------------------

    def set_checks(self, checks: Iterable[AnyCheck]) -> list[Transition]:
        """Replace the check set.

        A new check starts ``unknown`` (``since`` is now; no transition). A removed check
        disappears with every agent's view of it. A kept check keeps its state, whatever
        changed in its spec; a changed interval or timeout changes its staleness window at
        once, which may cause a transition. ValueError on a duplicate name, before any
        change.
        """
        specs: dict[str, AnyCheck] = {}
        for spec in checks:
            if spec.name in specs:
                raise ValueError(f"duplicate check name {spec.name!r}")
            specs[spec.name] = spec
        now = self._clock()
        for name in [name for name in self._checks if name not in specs]:
            self._restored.discard(name)
            for view in self._checks.pop(name).views.values():
                view.agent.checks.discard(name)
                if view.failing:
                    view.agent.failing -= 1
        transitions: list[Transition] = []
        for name in sorted(specs):
            spec = specs[name]
            window = self._settings.stale_intervals * spec.interval + spec.timeout
            check = self._checks.get(name)
            settings = self._settings.for_check(spec.verdict)
            if check is None:
                first = Verdict(name, VerdictState.UNKNOWN, now)
                check = self._checks[name] = _Check(name, window, spec.timeout, first, settings)
                self._refresh(check, now)
            elif window != check.window or settings != check.settings:
                check.window = window
                check.settings = settings
                self._collect(transitions, check, now)
            check.timeout = spec.timeout
            # stable_after results in a row, scheduled ones: second opinions repeat a
            # state within seconds, so the run must also span the intervals between them
            # (less half a one: scheduled runs drift by a little either way).
            check.settle_span = max(0.0, settings.stable_after - 1.5) * spec.interval
        self._longest_window = max((check.window for check in self._checks.values()), default=0.0)
        self._canaries = {name for name, spec in specs.items() if spec.canary}
        return transitions

    def restore(self, verdicts: Iterable[Verdict], grace: float) -> int:
        """Start checks from the verdicts a previous life of the coordinator reached (its
        store's), marked ``unconfirmed``; returns how many were restored.

        Only checks in the set that no result has reached yet are restored, and never
        to ``unknown``. A restored verdict stays while the check's views cannot say
        anything yet (too few agents back), with no transition; the first evaluation
        that reaches a state replaces it (a transition only if the state differs), and
        if none has by the check's staleness window plus ``grace`` (time for the agents
        to reconnect), the check goes ``unknown`` with a transition as it would have.
        """
        now = self._clock()
        restored = 0
        for verdict in verdicts:
            check = self._checks.get(verdict.check)
            if check is None or check.views or verdict.state is VerdictState.UNKNOWN:
                continue
            check.verdict = dataclasses.replace(verdict, unconfirmed=True)
            check.restored_until = now + check.window + grace
            self._restored.add(check.name)
            restored += 1
        return restored

    def agent_connected(self, agent: str, region: str) -> list[Transition]:
        """An agent's stream is up. Its views that are still fresh count again at once.

        Connecting an already connected agent with another region moves its views to the
        new region; with the same region it changes nothing.
        """
        if not agent or not region:
            raise ValueError("an agent needs a name and a region")
        member = self._agents.get(agent)
        if member is None:
            self._agents[agent] = Member(agent, region)
            return []  # no views yet, so no verdict can change
        if member.connected and member.region == region:
            return []
        member.connected = True
        member.region = region
        return self._refresh_all(member.checks)

    def agent_disconnected(self, agent: str) -> list[Transition]:
        """An agent's stream is gone: its views drop out of every count at once.

        Idempotent: an unknown or already disconnected agent changes nothing. The views are
        kept (not counted) until they would be stale, so a quick reconnect resumes them.
        """
        member = self._agents.get(agent)
        if member is None or not member.connected:
            return []
        member.connected = False
        return self._refresh_all(member.checks)

    def observe(self, agent: str, result: ProbeResult) -> list[Transition]:
        """Fold one result from a connected agent into that agent's view of its check.

        Re-evaluates only ``result.check``. ValueError when the check is unknown or the
        agent is not connected (the caller filters first). Freshness is measured from
        now on the engine's clock, not from the agent's ``started_at``.
        """
        check = self._checks.get(result.check)
        if check is None:
            raise ValueError(f"result for unknown check {result.check!r}")
        member = self._agents.get(agent)
        if member is None or not member.connected:
            raise ValueError(f"result from agent {agent!r}, which is not connected")
        now = self._clock()
        view = check.views.get(agent)
        fresh = False  # the view counted before this result: it has a contribution to change
        was_failing = False
        if view is None:
            view = check.views[agent] = View(member)
            member.checks.add(check.name)
        else:
            was_failing = view.run > 0 and not view.last_success  # view.failing, inlined
            if view.observed_at + check.window < now:
                view.forget()
                if check.stale:
                    check.stale -= 1  # counted stale at the last evaluation, fresh again
            else:
                fresh = True
        settings = check.settings
        was_up, was_flapping, was_failure = view.up, view.flapping, view.failure
        view.fold(result, now, settings, check.settle_span)
        member.last_observed = now
        failure = result.outcome.failure
        if failure is not None:
            counted = (member.region, failure)
            check.failures[counted] = check.failures.get(counted, 0) + 1
        # What the view adds to the evidence: its confirmed state, whether it flaps, and
        # its failure class while down.
        changed = (
            not fresh
            or view.up is not was_up
            or view.flapping is not was_flapping
            or (was_up is False and view.failure is not was_failure)
        )
        transitions: list[Transition] = []
        failing = view.run > 0 and not view.last_success
        if failing != was_failing:
            member.failing += 1 if failing else -1
            transitions += self._review(member, now, crossing=True)
        elif view.up is not was_up and check.name in self._canaries:
            transitions += self._review(member, now, crossing=True)
        # Second opinions matter during an episode, or when this view starts wavering
        # (view.wavering, inlined: this is the path of every result).
        if settings.second_opinion and (check.asked or view.up is not view.last_success):
            ended = self._second_opinion(check, view, now, result.started_at)
            if check.pending:
                if changed:
                    check.dirty = True
                if now <= check.next_expiry or not self._went_stale(check, now):
                    return transitions  # the verdict waits for the answers
                check.settle()  # a view went stale: who counts has changed
                self._collect(transitions, check, now)
                return transitions
            if ended and check.dirty:
                self._collect(transitions, check, now)
                return transitions
        # The steady state: no view's contribution changed since the last evaluation
        # (this one's now, or any during an episode that just ended without one), and
        # nobody has gone stale, so the stored verdict and evidence are still exact.
        if not changed and (now <= check.next_expiry or not self._went_stale(check, now)):
            return transitions
        self._collect(transitions, check, now)
        return transitions

    def observe_late(self, region: str, result: ProbeResult) -> None:
        """A result too old for the live verdict (older than its check's staleness
        window: replayed after an outage): counted in the check's failures by ``region``
        and nothing else. ValueError when the check is unknown."""
        check = self._checks.get(result.check)
        if check is None:
            raise ValueError(f"result for unknown check {result.check!r}")
        failure = result.outcome.failure
        if failure is not None:
            counted = (region, failure)
            check.failures[counted] = check.failures.get(counted, 0) + 1

    def stale_window(self, check: str) -> float:
        """How long a result of ``check`` counts for its verdict, seconds (the check's
        staleness window); inf for a check not in the set."""
        state = self._checks.get(check)
        return math.inf if state is None else state.window

    def tick(self) -> list[Transition]:
        """Re-evaluate the checks where a view has gone stale since their last evaluation,
        and restored ones whose time to be confirmed is over, and forget disconnected
        agents whose views have all expired."""
        now = self._clock()
        transitions: list[Transition] = []
        if self._restored:
            for name in sorted(n for n in self._restored if self._checks[n].restored_until < now):
                self._collect(transitions, self._checks[name], now)
        for name in sorted(
            n for n, c in self._checks.items() if c.pending and c.round_deadline < now
        ):
            check = self._checks[name]
            check.settle()
            self._collect(transitions, check, now)
        for member in [m for m in self._agents.values() if m.impaired or m.suspect(self._settings)]:
            transitions += self._review(member, now, crossing=False)
        for name in sorted(name for name, c in self._checks.items() if c.next_expiry < now):
            check = self._checks[name]
            if self._went_stale(check, now):
                check.settle()  # who counts has changed: the episode is moot
                self._collect(transitions, check, now)
        horizon = now - self._longest_window
        for member in [m for m in self._agents.values() if not m.connected]:
            if member.last_observed < horizon:
                # Nothing of it is counted or could become fresh again: drop it all.
                for name in member.checks:
                    del self._checks[name].views[member.name]
                del self._agents[member.name]
        transitions.sort(key=lambda transition: transition.check)  # stable
        return transitions

    # -- outputs -------------------------------------------------------------------------

    def verdict(self, check: str) -> Verdict | None:
        """The check's current verdict, or None when the check is not in the set."""
        state = self._checks.get(check)
        return state.verdict if state is not None else None

    def take_requests(self) -> list[ProbeNow]:
        """Out-of-schedule probes the engine wants since the last call (and forgets them):
        the caller asks those agents to probe those checks now; their results come back
        through ``observe`` like any other."""
        requests, self._requests = self._requests, []
        return requests

    def impaired(self) -> frozenset[str]:
        """Connected agents judged impaired: their failures are their own, not the
        targets' (rule 5, docs/verdict-engine.md), as of the last call that changed inputs."""
        return frozenset(m.name for m in self._agents.values() if m.impaired and m.connected)

    def verdicts(self) -> list[Verdict]:
        """Every check's current verdict, sorted by check name."""
        return [self._checks[name].verdict for name in sorted(self._checks)]

    def measurements(self) -> list[Measurements]:
        """What every check's probes measured, sorted by check name (see ``Measurements``).

        Phases and certificates come from the views that count now: connected agents not
        judged impaired, with a fresh view. Linear in the views; nothing is kept.
        """
        now = self._clock()
        measured: list[Measurements] = []
        for name in sorted(self._checks):
            check = self._checks[name]
            sums: dict[str, _PhaseSums] = {}
            expiry = math.inf
            for view in check.views.values():
                member = view.agent
                if not member.connected or member.impaired or view.observed_at + check.window < now:
                    continue
                if 0 < view.cert_expiry < expiry:
                    expiry = view.cert_expiry
                if view.last_success:  # a fresh view has a latest result: it succeeded
                    total = sums.get(member.region)
                    if total is None:
                        total = sums[member.region] = _PhaseSums()
                    total.add(view)
            phases = {region: total.means() for region, total in sums.items()}
            measured.append(
                Measurements(
                    name, phases, expiry if expiry < math.inf else 0.0, dict(check.failures)
                )
            )
        return measured

    # -- second opinions ------------------------------------------------------------------

    def _second_opinion(self, check: _Check, view: View, now: float, started_at: float) -> bool:
        """Start, follow or end ``check``'s episode of second opinions after ``view``'s
        agent reported. True when an episode ended just now (re-evaluate).

        An episode starts when a healthy view starts to waver: every healthy agent with
        a fresh view is asked. From then on each agent is asked again as soon as it has
        answered while its view still wavers (not when the slowest agent has answered),
        up to the results its confirmation needs plus one (for an ask that found the
        agent with two probes of the check in flight). A result from a probe that started
        before the agent was first asked in the episode (``started_at``, the agent's
        clock, more than ``ASK_CLOCK_MARGIN`` earlier) tells what the target did before
        the change and is no answer: agents run an asked probe beside one in flight, so
        the answer is still due. The episode ends when nobody is left to hear from, or at
        its deadline.
        """
        name = view.agent.name
        if not check.asked:
            if view.wavering and not view.agent.impaired:
                # Something changed somewhere: every healthy agent looks again at once.
                self._ask(check, [v for v in check.views.values() if _counts(v, check, now)], now)
            return False
        asked_at = check.asked_at.get(name, now)
        if (
            name in check.pending
            and asked_at - ASK_CLOCK_MARGIN > started_at > now - _PLAUSIBLE_PROBE_AGE
        ):
            return False  # the asked probe runs beside this one: its answer is still due
        check.pending.discard(name)
        if (
            name not in check.pending
            and view.wavering
            and _counts(view, check, now)
            and check.asked.get(name, 0) <= _asks_allowed(view, check)
        ):
            self._ask(check, [view], now)
        if check.pending and now <= check.round_deadline:
            return False
        check.settle()
        return True

    def _ask(self, check: _Check, views: list[View], now: float) -> None:
        agents = tuple(sorted(view.agent.name for view in views))
        if not agents:
            return
        for agent in agents:
            check.pending.add(agent)
            check.asked[agent] = check.asked.get(agent, 0) + 1
            check.asked_at.setdefault(agent, now)
        check.round_deadline = now + check.timeout + self._settings.second_opinion_slack
        self._requests.append(ProbeNow(check.name, agents))

    # -- agent health --------------------------------------------------------------------

    def _review(self, member: Member, now: float, *, crossing: bool) -> list[Transition]:
        """Decide again whether ``member`` is impaired; re-evaluate its checks if that
        changed.

        Cheap unless it matters: an agent that is not suspect (failing at most
        ``impaired_share`` of its checks) is never impaired, which needs no look at its
        peers. The look (linear in its checks) happens when an agent becomes suspect
        (``crossing``: called as its failing count moved) and on every ``tick()`` while
        it is suspect or impaired, which notices peers changing their minds.
        """
        settings = self._settings
        suspect = member.suspect(settings)
        if self._canaries_down(member):
            impaired = True
        elif crossing and suspect and member.suspected:
            return []  # looked when it became suspect; the next tick() looks again
        elif not suspect:
            impaired = False
        else:
            blamed = sum(1 for name in member.checks if self._blames(self._checks[name], member))
            impaired = blamed > settings.impaired_share * len(member.checks)
        member.suspected = suspect
        if impaired is member.impaired:
            return []
        member.impaired = impaired
        return self._refresh_all(member.checks, now)

    def _canaries_down(self, member: Member) -> bool:
        """Whether ``member`` has a view of some canary check and every such view is down:
        the agent has lost its own connectivity, whatever its peers see."""
        if not self._canaries:
            return False
        views = [self._checks[name].views[member.name] for name in member.checks & self._canaries]
        return bool(views) and all(view.up is False for view in views)

    def _blames(self, check: _Check, member: Member) -> bool:
        """Whether ``member`` fails ``check`` while a peer sees it work: another healthy
        connected agent of its region whose latest result succeeded, or, when no other
        agent of its region has a view of the check, of any region."""
        view = check.views[member.name]
        if not view.failing:
            return False
        region_peers = False
        elsewhere = False
        for other in check.views.values():
            peer = other.agent
            if peer is member or not peer.connected or peer.impaired:
                continue
            same = peer.region == member.region
            region_peers = region_peers or same
            if other.run > 0 and other.last_success:
                if same:
                    return True
                elsewhere = True
        return elsewhere and not region_peers

    # -- evaluation ----------------------------------------------------------------------

    def _refresh_all(self, names: Iterable[str], now: float | None = None) -> list[Transition]:
        """Re-evaluate ``names`` after a change to who counts (an agent connected, left,
        became impaired or healthy). Such a change also ends a round of second opinions:
        the agents asked are no longer the ones that count."""
        now = self._clock() if now is None else now
        transitions: list[Transition] = []
        for name in sorted(names):
            check = self._checks[name]
            check.settle()
            self._collect(transitions, check, now)
        return transitions

    def _collect(self, transitions: list[Transition], check: _Check, now: float) -> None:
        transition = self._refresh(check, now)
        if transition is not None:
            transitions.append(transition)

    def _refresh(self, check: _Check, now: float) -> Transition | None:
        """Re-evaluate one check and store its verdict; the transition if the state moved.

        Nothing while a round of second opinions is out: the verdict waits for them.
        """
        if check.pending:
            check.dirty = True  # evaluate when the episode ends
            return None
        check.dirty = False
        evaluation, check.next_expiry = self._evaluate(check, now)
        check.stale = evaluation.stale
        if check.restored_until > -math.inf:
            if evaluation.state is VerdictState.UNKNOWN and now <= check.restored_until:
                return None  # nothing to confirm or refute it with yet
            check.restored_until = -math.inf
            self._restored.discard(check.name)
        previous = check.verdict.state
        changed = evaluation.state is not previous
        check.verdict = Verdict(
            check=check.name,
            state=evaluation.state,
            since=now if changed else check.verdict.since,
            regions=evaluation.regions,
            regions_down=evaluation.regions_down,
            failure=evaluation.failure,
            reason=evaluation.reason,
        )
        return Transition(check.name, previous, check.verdict, now) if changed else None

    def _went_stale(self, check: _Check, now: float) -> bool:
        """Whether a counted view has gone stale since the check's last evaluation.

        Called once ``next_expiry`` has passed. Between evaluations the connected views
        stay the same, and a stale view stays stale until a result makes it fresh, which
        takes it off ``check.stale`` (``observe``), so an unchanged count of stale views
        means none went stale: the stored verdict is still
        exact, and ``next_expiry`` moves on to the earliest expiry now, without a
        re-evaluation. Linear in the check's views, but only about once per staleness
        window per check, however many results arrive meanwhile.
        """
        window = check.window
        stale = 0
        earliest = math.inf
        for view in check.views.values():
            if view.agent.connected:
                expiry = view.observed_at + window
                if expiry < now:
                    stale += 1
                elif expiry < earliest:
                    earliest = expiry
        if stale != check.stale:
            return True
        check.next_expiry = earliest
        return False

    def _evaluate(self, check: _Check, now: float) -> tuple[Judgement, float]:
        """The verdict the check's views support at ``now``, and when its earliest fresh
        view expires; stores nothing."""
        tallies: dict[str, RegionTally] = {}
        next_expiry = math.inf
        impaired: list[str] = []
        for name, view in check.views.items():
            member = view.agent
            if not member.connected:
                continue
            if member.impaired and view.up is not True:
                # Its failures are its own; what it still sees working counts, so that
                # calling an agent impaired can never make a verdict worse.
                impaired.append(name)
                continue
            tally = tallies.get(member.region)
            if tally is None:
                tally = tallies[member.region] = RegionTally()
            expiry = view.observed_at + check.window
            if expiry < now:
                tally.stale += 1
                continue
            if expiry < next_expiry:
                next_expiry = expiry
            if view.flapping:
                # Neither up nor down: counted as up in its region (a target that works
                # half the time is not down there), and the check is degraded.
                tally.up += 1
                tally.flapping.append(name)
            elif view.up is True:
                tally.up += 1
            elif view.up is False:
                tally.failing.append((name, view.failure))
            # else: fresh but not yet confirmed (e.g. one failure so far): not counted
        return judge(check.settings, tallies, impaired), next_expiry


def _asks_allowed(view: View, check: _Check) -> int:
    return min(max(view.needed, check.settings.recover_after), _MAX_ASKS)


def _counts(view: View, check: _Check, now: float) -> bool:
    """Whether ``view`` is fresh and its agent healthy: one whose opinion counts."""
    agent = view.agent
    return agent.connected and not agent.impaired and view.observed_at + check.window >= now
