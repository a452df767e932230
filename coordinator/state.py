"""The one owner of the coordinator's state changes.

The verdict engine, the fleet, the check registry, the store and the transition recorder
must move together: a result moves a verdict (recorded), may ask for second opinions
(sent), and advances the agent's sequence number (stored before it is acknowledged). Every
event goes through ``CoordinatorState``, which applies it to each part and then handles
what follows, so there is one place where that happens::

    state = CoordinatorState(engine=..., fleet=..., checks=..., recorder=..., ...)
    state.restore()                              # at start: what the store knew
    replaced = state.agent_connected(hello, link)   # Welcome, assignments, rechecks
    state.results(hello, link, batch, log)       # acknowledged on ``link``
    state.heartbeat(hello, counters)
    state.agent_disconnected(hello, link)
    change = state.set_checks(checks)            # pushed to every connected agent
    state.tick()                                 # about once a second

Everything runs on the event loop and every call is synchronous, so no part changes under
another. The store commits once per event-loop iteration, scheduled by the first write of
the iteration, which is before the acknowledgement of a batch is queued (``results``
writes the agent's ledger before it queues the ack): a sequence number acknowledged to an agent
is in the store, so a restarted coordinator never takes a replay for new results.

**Restore.** A restarted coordinator (same ``store_file``) knows again the agents it knew
(disconnected until they reconnect, with the last sequence number handled per agent
instance, so their replays are recognised) and starts each check from its last verdict,
marked ``unconfirmed`` until fresh results confirm or replace it (``engine.restore``): no
transition is published for a state that did not change.

**Late results.** A result older than its check's staleness window when its batch was
sent (by the agent's clock on both ends: skew does not matter) was spooled through an
outage. It is de-duplicated and counted like any other, goes into the check's failure
counts by region, and stays out of the live verdict, which it would only make stale.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from vantage.checks import AnyCheck
from vantage.logs import get_logger
from vantage.wire import WireError, result_from_pb
from vantage_proto.v1 import agent_pb2

from .engine import VerdictEngine
from .fleet import AgentFleet, AgentHello, AgentLink
from .metrics import CoordinatorMetrics
from .registry import CheckChange, CheckRegistry
from .store import TransitionStore
from .transitions import TransitionRecorder

log = get_logger("coordinator.state")

# How long past a check's staleness window a restored verdict waits for the agents to
# come back and confirm it: an agent's reconnect backoff tops out at 30 s.
RESTORE_GRACE = 30.0
MAX_FIELD = 128
_US = 1_000_000


class GreetedLink(AgentLink, Protocol):
    """An agent stream as the state driver uses it: the fleet's link, greeted first."""

    def welcome(self, last_seq: int) -> None:
        """Send Welcome (naming ``last_seq``, the highest sequence number already
        handled) and the full assignments; before anything else (never blocks)."""

    def acknowledge(self, seq: int) -> None:
        """Tell the agent everything up to ``seq`` is handled (never blocks)."""


class CoordinatorState:
    """Applies every event to the engine, fleet, registry and store, and records what
    follows; see the module docstring. ``checks`` holds the initial check set."""

    def __init__(
        self,
        *,
        engine: VerdictEngine,
        fleet: AgentFleet,
        checks: CheckRegistry,
        recorder: TransitionRecorder,
        store: TransitionStore,
        metrics: CoordinatorMetrics,
    ) -> None:
        self.engine = engine
        self.fleet = fleet
        self.checks = checks
        self._recorder = recorder
        self._store = store
        self._metrics = metrics
        self.stopping = False
        recorder.record(engine.set_checks(tuple(checks)))

    # -- events ----------------------------------------------------------------------------

    def restore(self) -> None:
        """Take up what the store kept from the coordinator's previous life: the fleet
        (as disconnected) and each check's last verdict (unconfirmed)."""
        ledgers = self._store.agents()
        self.fleet.restore(ledgers)
        latest = [recorded.transition.verdict for recorded in self._store.latest()]
        restored = self.engine.restore(latest, RESTORE_GRACE)
        if ledgers or latest:
            log.info(
                "state restored from the store",
                store=self._store.where,
                agents=len(ledgers),
                verdicts=restored,
                verdicts_stored=len(latest),
            )

    def stop(self) -> None:
        """The coordinator is stopping: from now on agents leaving and time passing no
        longer move verdicts (every agent is about to leave; the verdicts stored are
        what the next start restores), and the store is committed."""
        self.stopping = True
        self._store.flush()

    def set_checks(self, checks: Sequence[AnyCheck]) -> CheckChange:
        """Replace the check set (ValueError on a duplicate name, before any change);
        the change is pushed to every connected agent. An empty change changes nothing."""
        change = self.checks.change_to(checks)
        if not change:
            return change
        transitions = self.engine.set_checks(checks)
        self.checks.replace(checks)
        for name in change.removed:
            self._metrics.forget_check(name)
        self._store.forget_verdicts(change.removed)
        self._recorder.record(transitions)
        for link in self.fleet.links():
            link.assign(change)
        self._send_rechecks()
        return change

    def agent_connected(self, hello: AgentHello, link: GreetedLink) -> AgentLink | None:
        """``link`` is the agent's live stream from now: greeted (Welcome, assignments)
        before any recheck. Returns the stream it replaced (told to end), if any."""
        replaced = self.fleet.connect(hello, link)
        self._recorder.record(
            self.engine.agent_connected(hello.name, hello.region),
            agent=hello.name,
            region=hello.region,
        )
        link.welcome(self.fleet.last_seq(hello.name, hello.instance_id))
        self._save(hello.name)
        self._send_rechecks()
        return replaced

    def agent_disconnected(self, hello: AgentHello, link: AgentLink) -> bool:
        """The stream ended; False (nothing changes) when it had been replaced."""
        if not self.fleet.disconnect(hello.name, link):
            return False
        self._save(hello.name)
        if self.stopping:
            return True
        self._recorder.record(
            self.engine.agent_disconnected(hello.name), agent=hello.name, region=hello.region
        )
        self._send_rechecks()
        return True

    def seen(self, name: str) -> None:
        """A message from the agent arrived."""
        self.fleet.seen(name)

    def heartbeat(self, hello: AgentHello, counters: agent_pb2.AgentCounters) -> None:
        self.fleet.report(hello.name, counters.results_dropped, counters.runs_skipped)
        self._save(hello.name)

    def results(
        self,
        hello: AgentHello,
        link: GreetedLink,
        batch: agent_pb2.ResultBatch,
        stream_log: FilteringBoundLogger,
    ) -> int:
        """Fold a batch in and acknowledge it on ``link`` (the stream it came on) with
        the highest sequence number handled, which is returned.

        A sequence number at or below the highest handled is a replay, dropped as a
        duplicate before anything else is looked at. Results that do not convert or
        name a check not assigned are dropped and counted; late ones (module docstring)
        go into the failure counts only.
        """
        started = time.perf_counter()
        name = hello.name
        region = hello.region
        engine = self.engine
        assigned = self.checks.names()  # a set-like view: `in` without a method call
        observe = engine.observe
        handled = self.fleet.last_seq(name, hello.instance_id)
        sent = batch.sent_unix_us / _US  # 0: no send time, every result taken as fresh
        ingested = late = 0
        for message in batch.results:
            seq = message.seq
            if 0 < seq <= handled:
                self._metrics.result_dropped("duplicate")
                stream_log.debug("result dropped", reason="duplicate", check=message.check, seq=seq)
                continue
            if seq > handled:
                handled = seq
            try:
                result = result_from_pb(message)
            except WireError as exc:
                self._drop(stream_log, "invalid", message, error=str(exc))
                continue
            if result.check not in assigned:
                self._drop(stream_log, "unassigned", message)
                continue
            ingested += 1
            if sent and sent - result.started_at > engine.stale_window(result.check):
                engine.observe_late(region, result)
                late += 1
                continue
            try:
                transitions = observe(name, result)
            except ValueError as exc:
                # The engine and the registry are updated together, so this is a bug; the
                # result is still accounted for rather than lost silently.
                ingested -= 1
                self._drop(stream_log, "unassigned", message, error=str(exc))
                continue
            if transitions:
                self._recorder.record(transitions, agent=name, region=region)
        if batch.HasField("counters"):
            counters = batch.counters
            self.fleet.report(name, counters.results_dropped, counters.runs_skipped)
        # Counted once per batch: per result, the label lookups cost more than the folding.
        if ingested:
            self.fleet.count_result(name, ingested, late)
        if late:
            stream_log.debug("late results kept out of the live verdict", late=late)
        self._metrics.results_ingested(region, ingested, started)
        self.fleet.advance_seq(name, hello.instance_id, handled)
        self._save(name)  # the commit this schedules runs before the ack is written
        link.acknowledge(handled)
        self._send_rechecks()
        return handled

    def tick(self) -> None:
        """Time passed: stale views, rounds of second opinions and restored verdicts
        whose time is up move verdicts (not once stopping)."""
        if self.stopping:
            return
        started = time.perf_counter()
        self._recorder.record(self.engine.tick())
        self._metrics.engine_ticked(time.perf_counter() - started)
        self._send_rechecks()

    # -- what follows ----------------------------------------------------------------------

    def _save(self, name: str) -> None:
        self._store.save_agent(self.fleet.ledger(name))

    def _send_rechecks(self) -> None:
        """Send the second opinions the engine asked for since the last event (never
        blocks): each connected agent asked gets one Recheck naming every check asked
        of it, each once. Agents no longer connected are skipped."""
        requests = self.engine.take_requests()
        if not requests:
            return
        asked: dict[str, dict[str, None]] = {}  # agent -> its checks, in order, once each
        for request in requests:
            for agent in request.agents:
                asked.setdefault(agent, {})[request.check] = None
        probes = 0
        not_connected: list[str] = []
        for agent, checks in asked.items():
            link = self.fleet.link(agent)
            if link is None:
                not_connected.append(agent)
                continue
            link.recheck(list(checks))
            probes += len(checks)
        if probes:
            self._metrics.rechecks_requested(probes)
        log.debug(
            "second opinions asked",
            checks=len({request.check for request in requests}),
            agents=len(asked) - len(not_connected),
            probes=probes,
            not_connected=not_connected,
        )

    def _drop(
        self,
        stream_log: FilteringBoundLogger,
        reason: str,
        message: agent_pb2.ProbeResult,
        **fields: object,
    ) -> None:
        self._metrics.result_dropped(reason)
        stream_log.warning(
            "result dropped",
            reason=reason,
            check=message.check[:MAX_FIELD],
            seq=message.seq,
            **fields,
        )
