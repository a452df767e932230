"""One agent's view of one check (rules 1, 2 and 6 of docs/verdict-engine.md): its
confirmed state with hysteresis, the failures in a row that confirm it down on its path's
random loss, flapping, and what its latest result measured. ``Member`` is an agent as the
engine knows it: region, connection, health, and its views.
"""

from __future__ import annotations

import math

from vantage.results import FailureClass, HttpDetails, ProbeOutcome, ProbeResult, TcpDetails

from .judgement import EngineSettings

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


class Member:
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


class View:
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
        "run_since",
        "tls",
        "transfer",
        "up",
    )

    def __init__(self, agent: Member) -> None:
        self.agent = agent
        self.up: bool | None = None  # the confirmed view; None until confirmed
        self.last_success = True
        self.run = 0  # consecutive results equal to last_success
        self.run_since = -math.inf  # when the first of them was folded
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

    def fold(
        self, result: ProbeResult, now: float, settings: EngineSettings, settle_span: float
    ) -> None:
        """Fold one result in, at ``now``; a flapping view is stable again after
        ``settings.stable_after`` results in a row that agree with its state and span
        ``settle_span`` seconds at least."""
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
            if self.run == 1:  # a new run (or the first since the view was forgotten)
                self.run_since = now
            if up is not True:
                if self.run < (1 if up is None else settings.recover_after):
                    if up is not None:
                        self._sample(up, settings, now - self.run_since >= settle_span)
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
            if self.run == 1:
                self.run_since = now
            self.failure = outcome.failure
            self.message = outcome.message
            if up is not False and self.run >= self.needed:
                up = self.up = False
            elif up:
                self.loss += (1.0 - self.loss) / settings.loss_memory
            elif up is None:
                return
        self._sample(up, settings, now - self.run_since >= settle_span)

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

    def _sample(self, up: bool, settings: EngineSettings, spanned: bool) -> None:
        """Add the confirmed state to the history and decide whether the view flaps."""
        history = self.history
        if history < 0:  # its first confirmed state: as if it had always been so
            history = _FLAP_MASK if up else 0
        history = self.history = ((history << 1) | up) & _FLAP_MASK
        if (
            self.flapping
            and self.last_success is up
            and self.run >= settings.stable_after
            and spanned
        ):
            # Stable again: the latest stable_after results all agree with the state. It
            # stops flapping now, not when its changes age out of the window (20
            # intervals), and starts over as a view that has always been so: without the
            # old changes, and with its loss estimate no higher than a flaky view's stop.
            self.flapping = False
            self.history = _FLAP_MASK if up else 0
            self.loss = min(self.loss, FLAKY_STOP)
            return
        changed = ((history ^ (history >> 1)) & _CHANGE_MASK).bit_count()
        if self.flapping:
            self.flapping = changed > FLAP_STOP or self.loss >= FLAKY_STOP
        else:
            self.flapping = changed >= FLAP_START or self.loss >= FLAKY_START
