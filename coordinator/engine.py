"""The verdict engine: folds probe results into one verdict per check, with evidence.

A pure module: no I/O, no protobuf, no asyncio. Time comes from an injected clock
(wall-clock seconds), so the engine runs the same under a fake clock in tests. The
coordinator feeds it the fleet's connects and disconnects, the check set and every result,
calls ``tick()`` about once a second, and publishes the transitions it returns.

How a verdict is reached
------------------------

1. **Each agent's view of a check** (hysteresis: consecutive results, chosen over a
   Bayesian belief because its behaviour is easy to state and to test, with the one thing
   a belief does better -- knowing how much a lossy path fails by chance -- added in 2).
   An agent has no view of a check until its first result. From no view, one success
   makes the view ``up``; ``down`` needs failures in a row (see 2). From ``down``,
   ``recover_after`` consecutive successes make it ``up`` again. So one failed probe
   never moves a verdict, and recovery is confirmed too. The engine keeps the agent's
   latest failure class and message.

2. **Adaptive confirmation.** Each view keeps a moving average (memory ``loss_memory``
   results) of how often its probes fail while it is up: random loss on that agent's
   path. A run of failures confirms the view down after ``fail_after`` failures, or more
   when the path is lossy: enough that random loss alone would do it with at most
   ``max_false_down`` chance (at 20% loss and 1e-5, eight; on a clean path, two). A new
   view assumes 1% loss (``LOSS_PRIOR``) until it knows better. Off with
   ``adaptive_confirmation: false``.

3. **Second opinions.** When a view starts to waver (a failure while up, a success while
   down), every healthy agent with a fresh view of the check is asked to probe it at once
   (``take_requests()``: the coordinator sends them over the agents' streams); from then
   on each agent is asked again as soon as it answers while its view still wavers, up to
   what its confirmation needs (plus one). While such an episode is on, the check's
   verdict waits: an outage seen everywhere goes from ``up`` to ``global`` in one
   transition once the answers are in, instead of passing through ``local`` and
   ``regional`` as results trickle in, and failures are confirmed within seconds instead
   of intervals. A result from a probe that started before the agent was first asked in
   the episode is no answer: it tells what the target did before the change, and the
   agent runs the asked probe beside it (``agent/scheduler.py``), so the answer is still
   due. Any later result is one (a scheduled result too), and an agent whose view no
   longer wavers is not asked again. An episode ends when nobody asked is left to hear
   from, at its deadline (the check's timeout plus ``second_opinion_slack`` after the
   latest ask, noticed by ``tick()``), or when who counts changes (an agent leaves, is
   impaired or recovers, a view goes stale).

4. **Freshness.** A view is *fresh* while the agent is connected and its latest result for
   the check arrived within ``stale_intervals * interval + timeout`` seconds (the check's
   *staleness window*), measured on the coordinator's clock when the result was folded,
   not the agent's timestamp, so agent clock skew does not matter. A connected agent whose
   view is older counts as ``stale`` in its region; a disconnected agent is not counted
   anywhere. A stale view is forgotten: the agent's next result starts over as if it were
   its first (old evidence does not carry hysteresis across a gap).

5. **Agent health.** An agent whose latest results fail more than ``impaired_share`` of
   its checks (and at least ``impaired_min_checks`` of them) while a healthy peer sees
   them work is *impaired*: the trouble is the agent's, as Trinocular blames an outage of
   most of a vantage point's targets on the vantage point. Peers are the other agents of
   its region; an agent alone in its region is judged against the other regions. A whole
   region failing everything is a regional outage, not impairment. An agent whose views of
   every *canary* check it runs (``canary: true`` in the checks file: a target that is
   always up, such as the coordinator's own address) are down has lost its own
   connectivity and is impaired too, whatever its peers see. An impaired agent's failing
   views are left out of every count (the reason names it; ``impaired()`` lists it) until
   it fails no more than that share again.

6. **Flapping.** A view *flaps* when its confirmed state changed at least 3 times over its
   latest 20 results (down, up and down again; it stops flapping once at most one change
   is left in that window), or when its moving average of failures reaches 40% (stops
   below 30%): a target that works about half the time. A flapping view counts as up in
   its region.

7. **Regions.** Among a region's fresh, healthy agents with a confirmed view (the
   *counted* agents), the region is ``down`` when strictly more than half of them are
   down and at least ``min_region_agents`` of them are down (so an agent that sees the
   check up never tips a region into down); ``up`` when there are at least
   ``min_region_agents`` and it is not down; ``unknown`` otherwise. A fresh agent whose
   view is not confirmed yet (one failure so far, say) is not counted, and not stale
   either. ``failure`` is the most common failure class among the region's down agents; a
   tie goes to the class whose name sorts first, so every coordinator replica names the
   same class whatever order results arrived in.

8. **The check's verdict**, first match wins:

   - ``unknown`` with fewer than ``min_agents`` counted agents in all, or fewer than
     ``min_regions`` regions in a known (up/down) state. Never ``up`` on thin evidence.
   - ``global`` when every known region is down and at least ``min_agents`` agents are
     down ("down for everyone"). When every known region is down but fewer agents than
     that, the verdict stays ``unknown`` and the reason says so.
   - ``regional`` when at least one known region is down and at least one is up.
   - ``local`` when no region is down but some counted agent's view is down.
   - ``degraded`` when at least half of the counted agents' views flap (a flapping view
     counts as up in its region, never as down).
   - ``up`` when every counted view is up.

   Rules 7 and 8 are ``judge()``, a pure function of per-region tallies: on-demand checks
   (``coordinator.ondemand``) judge their agents' one-off answers with it too.

Every verdict carries its evidence: a ``RegionView`` for each region with a connected
agent that has reported on the check (unknown regions included), the names of the down
regions, the dominant failure class over all down agents (same tie rule), the time of
the last state change and a one-line reason such as ``down in eu (connect_timeout); up
in ap, us``. Only state changes are transitions; evidence moves without one.

Parameters (``EngineSettings``)
-------------------------------

``min_agents`` (3)
    Counted agents needed for any verdict but ``unknown``; also the down agents a
    ``global`` verdict needs.
``min_regions`` (2)
    Regions in a known state needed for any verdict but ``unknown``.
``min_region_agents`` (1)
    Counted (and, for down, down) agents a region needs to be ``up`` or ``down``.
``fail_after`` (2)
    The fewest consecutive failures that confirm an agent's view ``down``.
``recover_after`` (2)
    Consecutive successes before a ``down`` view is ``up`` again.
``stale_intervals`` (2.0)
    A view older than ``stale_intervals * interval + timeout`` is stale.
``impaired_share`` (0.5), ``impaired_min_checks`` (3)
    When an agent is impaired (5).
``second_opinion`` (true), ``second_opinion_slack`` (1 s)
    Second opinions, and how long past the check's timeout an answer may take (3).
``adaptive_confirmation`` (true), ``max_false_down`` (1e-5), ``loss_memory`` (20)
    Failures needed on lossy paths (2).

Errors: a result for a check the engine does not know, or from an agent that is not
connected, is a caller bug and raises ``ValueError``; so do invalid settings and a check
set with a duplicate name. The engine folds every result it is given, in call order:
recognising duplicates and replays by sequence number is the caller's job. An agent's
results for a check may come out of the order their probes started (an asked probe that
overtook one timing out); they too are folded as they come.

Cost: ``observe()`` touches one check; when the agent's contribution to it (view, failure
class, flapping, freshness) did not change and nobody else has gone stale, it does not
re-evaluate at all, and an episode of second opinions during which no contribution
changed ends without one too. A re-evaluation is linear in the check's agents. Each
check remembers when its earliest fresh view expires; once that time has passed
(``observe()`` or ``tick()``, whichever comes first), one pass over its views (no
re-evaluation) either finds that no view actually went stale -- results arrived
meanwhile -- and moves the time on, or re-evaluates. So while agents keep reporting, a
check costs one such pass per staleness window, not a re-evaluation, and ``tick()`` is a
scan of the checks that finds nothing due.

Measurements: besides its verdict inputs, each view keeps what its latest result measured
(phase timings while it succeeds, the latest certificate expiry seen), and each check
counts its failed results by region and class; ``measurements()`` reads them, at scrape
time, for the coordinator's metrics. Per result that is a few float copies.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mypy_extensions import mypyc_attr

from vantage.checks import AnyCheck, VerdictOptions
from vantage.results import FailureClass, HttpDetails, ProbeOutcome, ProbeResult, TcpDetails

from .verdicts import ProbeNow, RegionState, RegionView, Transition, Verdict, VerdictState

# Agents named one by one in a reason; the rest are summarised as "N more".
_NAMED_AGENTS = 5
# How far an agent's clock may lag the coordinator's before its fresh answers to a second
# opinion are taken for probes that started before the ask (NTP keeps them within ms).
ASK_CLOCK_MARGIN = 0.5
# A probe said to have started longer ago than this is from an agent whose clock is off:
# its start time tells nothing about when it ran relative to the ask.
_PLAUSIBLE_PROBE_AGE = 60.0
# Second opinions one agent may be asked for in one episode, whatever its view needs.
_MAX_ASKS = 12
# Until a view has seen enough results to know its check's random loss, it assumes this
# much: a new view needs a few more failures in a row than a well-known clean one.
LOSS_PRIOR = 0.01
# Flapping (as Nagios detects it, but counting changes rather than weighing them): over
# a view's latest FLAP_WINDOW results, how many changed its *confirmed* state. A view
# starts flapping at FLAP_START changes (down, up, down again) and stops at FLAP_STOP or
# fewer. Confirmed changes, not raw ones: at 20% random loss 32% of the results differ
# from the one before, more than for a target down and up every interval or two (13% in
# the benchmark: second opinions repeat each state), but random loss almost never
# confirms a change (see max_false_down), so three confirmed changes are a target that
# really went down twice. A count of them, rather than a share of the window, calls it
# flapping as soon as it goes down the second time, not after seven transitions.
# A target failing about half its probes while its views stay up (max_false_down makes
# such a view need many failures in a row) is flapping too: a view whose moving average
# of failures reaches FLAKY_START counts as flapping until it falls below FLAKY_STOP.
# At 20% random loss the average (memory 20) has a standard deviation of about 0.065:
# 0.4 is three of them above.
FLAP_WINDOW = 20
FLAP_START = 3
FLAP_STOP = 1
FLAKY_START = 0.4
FLAKY_STOP = 0.3
_FLAP_MASK = (1 << (FLAP_WINDOW + 1)) - 1
_CHANGE_MASK = (1 << FLAP_WINDOW) - 1  # bit i: whether result i changed the state


# An ordinary class even when compiled (vantage.native): a compiled class would refuse a
# value of the wrong type with its own TypeError before validation names the setting.
@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The engine's thresholds; see the module docstring. Validated on construction."""

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


class _Agent:
    """An agent the engine has heard of. Kept while disconnected until its views expire."""

    __slots__ = (
        "checks",
        "connected",
        "failing",
        "impaired",
        "last_observed",
        "name",
        "region",
        "suspected",
    )

    def __init__(self, name: str, region: str) -> None:
        self.name = name
        self.region = region
        self.connected = True
        self.checks: set[str] = set()  # checks this agent has a view of
        self.last_observed = -math.inf
        self.failing = 0  # its views whose latest result failed
        self.impaired = False
        self.suspected = False  # suspect() as of the last _review

    def suspect(self, settings: EngineSettings) -> bool:
        """Failing enough of its checks that impairment is worth looking into."""
        total = len(self.checks)
        return (
            total >= settings.impaired_min_checks and self.failing > settings.impaired_share * total
        )


class _View:
    """One agent's view of one check: the hysteresis state and its latest failure."""

    __slots__ = (
        "agent",
        "cert_expiry",
        "connect",
        "failure",
        "flapping",
        "history",
        "last_success",
        "loss",
        "message",
        "needed",
        "observed_at",
        "processing",
        "resolve",
        "run",
        "tls",
        "transfer",
        "up",
    )

    def __init__(self, agent: _Agent) -> None:
        self.agent = agent
        self.up: bool | None = None  # the confirmed view; None until confirmed
        self.last_success = True
        self.run = 0  # consecutive results equal to last_success
        self.observed_at = -math.inf
        self.failure: FailureClass | None = None
        self.message = ""
        # The confirmed state after each of the latest FLAP_WINDOW + 1 results, newest in
        # bit 0 (1 = up); -1 before the first. Flapping as of the latest result.
        self.history = -1
        self.flapping = False
        # The share of this agent's probes of the check that fail at random (a moving
        # average), and the failures in a row the current run of failures needs.
        self.loss = LOSS_PRIOR
        self.needed = 1
        # What the latest result measured (``measurements()``): the phase timings of the
        # latest success (current while ``last_success``), as plain floats: a Phases
        # object kept per view would be one more object per result for the garbage
        # collector to promote and scan. The certificate expiry of the latest TLS session
        # reported (0: none).
        self.resolve = self.connect = self.tls = self.processing = self.transfer = 0.0
        self.cert_expiry = 0.0

    def forget(self) -> None:
        self.up = None
        self.run = 0
        self.history = -1
        self.flapping = False

    @property
    def failing(self) -> bool:
        """Its latest result (since it was last forgotten) is a failure."""
        return self.run > 0 and not self.last_success

    @property
    def wavering(self) -> bool:
        """Its latest result disagrees with its confirmed state (or there is none yet)."""
        if self.run == 0:
            return False
        return self.up is not self.last_success

    def fold(self, result: ProbeResult, now: float, settings: EngineSettings) -> None:
        self.observed_at = now
        outcome = result.outcome
        self._measure(outcome)
        up = self.up
        if outcome.success:
            if self.last_success:
                self.run += 1
            else:
                self.last_success = True
                self.run = 1
            if up is not True:
                if self.run < (1 if up is None else settings.recover_after):
                    if up is not None:
                        self._sample(up)
                    return
                up = self.up = True
            self.loss -= self.loss / settings.loss_memory
            if self.history == _FLAP_MASK and not self.flapping and self.loss < FLAKY_START:
                return  # the steady state: up all along, and it stays so (saves the counting)
        else:
            if self.last_success:
                self.last_success = False
                self.run = 1
                self.needed = settings.failures_needed(self.loss)
            else:
                self.run += 1
            self.failure = outcome.failure
            self.message = outcome.message
            if up is not False and self.run >= self.needed:
                up = self.up = False
            elif up:
                self.loss += (1.0 - self.loss) / settings.loss_memory
            elif up is None:
                return
        self._sample(up)

    def _measure(self, outcome: ProbeOutcome) -> None:
        if outcome.success:
            phases = outcome.phases
            self.resolve = phases.resolve
            self.connect = phases.connect
            self.tls = phases.tls
            self.processing = phases.processing
            self.transfer = phases.transfer
        details = outcome.details
        if isinstance(details, (HttpDetails, TcpDetails)) and details.tls is not None:
            expiry = details.tls.earliest_expiry
            if expiry > 0:
                self.cert_expiry = expiry

    def _sample(self, up: bool) -> None:
        """Add the confirmed state to the history and decide whether the view flaps."""
        history = self.history
        if history < 0:  # its first confirmed state: as if it had always been so
            history = _FLAP_MASK if up else 0
        history = self.history = ((history << 1) | up) & _FLAP_MASK
        changed = ((history ^ (history >> 1)) & _CHANGE_MASK).bit_count()
        if self.flapping:
            self.flapping = changed > FLAP_STOP or self.loss >= FLAKY_STOP
        else:
            self.flapping = changed >= FLAP_START or self.loss >= FLAKY_START


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
        # An episode of second opinions in progress: the agents asked and not heard from
        # since, until the deadline; how often each agent was asked in the episode.
        self.pending: set[str] = set()
        self.asked: dict[str, int] = {}
        self.asked_at: dict[str, float] = {}  # when each agent was first asked in it
        self.round_deadline = -math.inf
        # A view's contribution changed during the episode: the verdict is re-evaluated
        # when it ends (otherwise the one stored before it is still exact).
        self.dirty = False
        self.views: dict[str, _View] = {}
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


class _PhaseSums:
    """Phase timings of a region's views added up (floats unboxed when compiled)."""

    __slots__ = ("connect", "processing", "resolve", "tls", "transfer", "views")

    def __init__(self) -> None:
        self.views = 0
        self.resolve = self.connect = self.tls = self.processing = self.transfer = 0.0

    def add(self, view: _View) -> None:
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
        self._agents: dict[str, _Agent] = {}
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
            self._agents[agent] = _Agent(agent, region)
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
            view = check.views[agent] = _View(member)
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
        view.fold(result, now, settings)
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
        targets' (see the module docstring), as of the last call that changed inputs."""
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

    def _second_opinion(self, check: _Check, view: _View, now: float, started_at: float) -> bool:
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

    def _ask(self, check: _Check, views: list[_View], now: float) -> None:
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

    def _review(self, member: _Agent, now: float, *, crossing: bool) -> list[Transition]:
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

    def _canaries_down(self, member: _Agent) -> bool:
        """Whether ``member`` has a view of some canary check and every such view is down:
        the agent has lost its own connectivity, whatever its peers see."""
        if not self._canaries:
            return False
        views = [self._checks[name].views[member.name] for name in member.checks & self._canaries]
        return bool(views) and all(view.up is False for view in views)

    def _blames(self, check: _Check, member: _Agent) -> bool:
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


def judge(
    settings: EngineSettings, tallies: dict[str, RegionTally], impaired: list[str]
) -> Judgement:
    """The verdict that what each region's agents say supports, under ``settings``
    (rules 7 and 8 of the module docstring): each region's state, then the check's.

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


def _asks_allowed(view: _View, check: _Check) -> int:
    return min(max(view.needed, check.settings.recover_after), _MAX_ASKS)


def _counts(view: _View, check: _Check, now: float) -> bool:
    """Whether ``view`` is fresh and its agent healthy: one whose opinion counts."""
    agent = view.agent
    return agent.connected and not agent.impaired and view.observed_at + check.window >= now


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
