"""The scheduler with small probe functions passed in: timing, sequence, assignment changes
and the result store it fills."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import structlog

from agent.buffer import ResultBuffer
from agent.probes.launch import Abort, Done, Launch
from agent.scheduler import Assignment, Scheduler
from vantage.checks import parse_check
from vantage.results import FailureClass, HttpDetails, ProbeOutcome, ProbeResult, TcpDetails
from vantage.wire import AnyCheck


class NoJitter(random.Random):
    """First runs start at once, so tests need not wait up to an interval."""

    def uniform(self, a: float, b: float) -> float:
        return a


def check(name: str = "c", target: str = "127.0.0.1:1", **spec: Any) -> AnyCheck:
    return parse_check({"name": name, "type": "tcp", "target": target, **spec})


def assign(*checks: AnyCheck) -> list[Assignment]:
    return [Assignment.of(c) for c in checks]


UP = ProbeOutcome(success=True, details=TcpDetails(peer="127.0.0.1:1"))


class Probe:
    """Records calls; answers UP at once unless told to block until cancelled."""

    def __init__(self, block: Callable[[AnyCheck], bool] = lambda check: False) -> None:
        self.calls: list[tuple[str, str, float]] = []  # (name, target, loop time)
        self.cancelled: list[str] = []
        self.called = asyncio.Event()
        self._block = block

    async def __call__(self, check: AnyCheck) -> ProbeOutcome:
        self.calls.append((check.name, check.target, asyncio.get_running_loop().time()))
        self.called.set()
        if self._block(check):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(check.target)
                raise
        return UP


@contextlib.asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[None]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def take(store: ResultBuffer, count: int) -> list[ProbeResult]:
    """The next ``count`` results stored, oldest first, once they are there."""
    deadline = asyncio.get_running_loop().time() + 5
    assert await store.wait_unsent(count, deadline), f"only {store.unsent} of {count} results"
    return store.take_unsent(count)


def scheduler_for(probe: Probe, store: ResultBuffer, **kwargs: Any) -> Scheduler:
    kwargs.setdefault("rng", NoJitter())
    return Scheduler(
        store, agent="eu-1", region="eu", probes={"tcp": probe, "http": probe}, **kwargs
    )


async def test_first_runs_are_spread_within_one_interval(until: Any) -> None:
    probe = Probe()
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store, rng=random.Random(7))
    checks = [check(f"c{i}", interval="1s", timeout="500ms") for i in range(40)]
    scheduler.apply(True, assign(*checks))

    started = asyncio.get_running_loop().time()
    async with running(scheduler):
        await until(lambda: len({name for name, _, _ in probe.calls}) == 40)

    first = {}
    for name, _, at in probe.calls:
        first.setdefault(name, at - started)
    offsets = sorted(first.values())
    assert offsets[0] >= 0
    assert offsets[-1] <= 1.0 + 0.1
    assert offsets[-1] - offsets[0] > 0.5  # spread out, not all on one tick


async def test_results_carry_strictly_increasing_seq_from_one() -> None:
    probe = Probe()
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(*(check(f"c{i}") for i in range(20))))

    before = time.time()
    async with running(scheduler):
        results = await take(store, 20)

    assert [r.seq for r in results] == list(range(1, 21))
    assert {r.check for r in results} == {f"c{i}" for i in range(20)}
    for result in results:
        assert result.outcome == UP
        assert result.check_revision == check(result.check).revision
        assert before - 1 <= result.started_at <= time.time()
        assert result.duration >= 0


async def test_runs_are_fixed_rate_despite_probe_duration() -> None:
    async def slow(check: AnyCheck) -> ProbeOutcome:
        await asyncio.sleep(0.3)
        return UP

    store = ResultBuffer(100_000)
    scheduler = Scheduler(store, agent="a", region="r", probes={"tcp": slow}, rng=NoJitter())
    scheduler.apply(True, assign(check(interval="1s", timeout="500ms")))

    async with running(scheduler):
        results = await take(store, 3)

    starts = [r.started_at for r in results]
    # Every interval from the previous *start*, not from the previous end (1.3 s).
    assert starts[1] - starts[0] == pytest.approx(1.0, abs=0.15)
    assert starts[2] - starts[1] == pytest.approx(1.0, abs=0.15)


async def test_new_revision_restarts_the_check() -> None:
    probe = Probe(block=lambda c: c.target == "127.0.0.1:1")
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    old, new = check(target="127.0.0.1:1"), check(target="127.0.0.1:2")
    assert old.revision != new.revision
    scheduler.apply(True, assign(old))

    async with running(scheduler):
        await probe.called.wait()
        scheduler.apply(False, assign(new))
        [result] = await take(store, 1)

    assert probe.cancelled == ["127.0.0.1:1"]  # the old run was stopped, not finished
    assert result.check_revision == new.revision
    assert scheduler.assignments["c"].revision == new.revision


async def test_same_revision_does_not_restart() -> None:
    probe = Probe(block=lambda c: True)
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(check()))

    async with running(scheduler):
        await probe.called.wait()
        scheduler.apply(True, assign(check()))
        scheduler.apply(False, assign(check()))
        await asyncio.sleep(0.05)
        assert probe.cancelled == []
        assert len(probe.calls) == 1


async def test_removal_stops_the_loop(until: Any) -> None:
    probe = Probe(block=lambda c: c.name == "a")
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(check("a"), check("b", interval="1s", timeout="500ms")))

    async with running(scheduler):
        await until(lambda: len(probe.calls) == 2)
        scheduler.apply(False, [], removed=["a"])
        await until(lambda: probe.cancelled == ["127.0.0.1:1"])
        assert set(scheduler.assignments) == {"b"}

        # A full set replaces everything: b stops, c starts.
        scheduler.apply(True, assign(check("c")))
        await until(lambda: any(name == "c" for name, _, _ in probe.calls))
        assert set(scheduler.assignments) == {"c"}
        calls = len(probe.calls)
        await asyncio.sleep(0.05)
        assert len(probe.calls) == calls  # nothing else runs


async def test_a_full_store_drops_the_oldest_and_counts(until: Any) -> None:
    probe = Probe()
    store = ResultBuffer(1)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(*(check(f"c{i}") for i in range(5))))

    with structlog.testing.capture_logs() as logs:
        async with running(scheduler):
            await until(lambda: store.dropped == 4)

    assert [result.seq for result in store.take_unsent(10)] == [5]  # the newest is kept
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1  # one warning when dropping starts, not one per result
    assert "dropping the oldest" in warnings[0]["event"]


async def test_probe_that_ignores_its_timeout_is_cut_off() -> None:
    async def stuck(check: AnyCheck) -> ProbeOutcome:
        await asyncio.Event().wait()
        return UP

    store = ResultBuffer(100_000)
    scheduler = Scheduler(
        store, agent="a", region="r", probes={"tcp": stuck}, grace=0.05, rng=NoJitter()
    )
    scheduler.apply(True, assign(check(timeout="100ms", interval="1s")))

    async with running(scheduler):
        [result] = await take(store, 1)

    assert result.failure is FailureClass.TIMEOUT
    assert result.outcome.message == "probe did not finish within its timeout of 100ms"


async def test_probe_exception_is_an_internal_result_and_logged() -> None:
    async def broken(check: AnyCheck) -> ProbeOutcome:
        raise RuntimeError("boom")

    store = ResultBuffer(100_000)
    scheduler = Scheduler(store, agent="a", region="r", probes={"tcp": broken}, rng=NoJitter())
    scheduler.apply(True, assign(check()))

    with structlog.testing.capture_logs() as logs:
        async with running(scheduler):
            [result] = await take(store, 1)

    assert result.failure is FailureClass.INTERNAL
    assert result.outcome.message == "probe failed: RuntimeError: boom"
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["check"] == "c"
    assert error["exc_info"]


async def test_each_result_is_logged_with_check_agent_and_region() -> None:
    probe = Probe()
    store = ResultBuffer(100_000)
    with structlog.testing.capture_logs() as logs:
        scheduler = scheduler_for(probe, store)
        scheduler.apply(True, assign(check("web")))
        async with running(scheduler):
            await take(store, 1)

    [entry] = [e for e in logs if e["event"] == "probe result"]
    assert entry["log_level"] == "debug"
    assert (entry["check"], entry["agent"], entry["region"]) == ("web", "eu-1", "eu")


async def test_check_without_a_probe_is_skipped() -> None:
    probe = Probe()
    store = ResultBuffer(100_000)
    scheduler = Scheduler(store, agent="a", region="r", probes={"tcp": probe}, rng=NoJitter())
    web = parse_check({"name": "web", "type": "http", "target": "http://127.0.0.1/"})

    with structlog.testing.capture_logs() as logs:
        scheduler.apply(True, assign(web, check("port")))

    assert set(scheduler.assignments) == {"port"}
    assert any(e["event"].startswith("check skipped") and e["check"] == "web" for e in logs)


async def test_stopping_the_scheduler_stops_every_check(until: Any) -> None:
    probe = Probe(block=lambda c: True)
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(check("a"), check("b")))

    async with running(scheduler):
        await until(lambda: len(probe.calls) == 2)

    assert sorted(probe.cancelled) == ["127.0.0.1:1", "127.0.0.1:1"]
    assert store.unsent == 0  # nothing more stored


async def test_runs_beyond_max_in_flight_are_skipped_and_counted(until: Any) -> None:
    # Two probes hang until their timeout; the third check finds no room and is skipped
    # rather than piling up more connections on an overloaded agent.
    probe = Probe(block=lambda c: c.name != "free")
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store, max_in_flight=2)
    slow = [check(f"slow{i}", interval="10s", timeout="5s") for i in range(2)]
    scheduler.apply(True, assign(*slow))

    with structlog.testing.capture_logs() as logs:
        async with running(scheduler):
            await until(lambda: len(probe.calls) == 2)
            scheduler.apply(False, assign(check("free", interval="1s", timeout="500ms")))
            await until(lambda: scheduler.skipped >= 1)

    assert [name for name, _, _ in probe.calls] == ["slow0", "slow1"]
    assert store.unsent == 0  # nothing more stored
    assert any(e["log_level"] == "warning" and e.get("max_in_flight") == 2 for e in logs)


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        scheduler_for(Probe(), ResultBuffer(1), max_in_flight=0)


# Out of schedule: run_now, the second opinions the coordinator asks for


async def test_run_now_runs_at_once_and_leaves_the_grid_alone() -> None:
    probe = Probe()
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(check(interval="1s", timeout="500ms")))

    async with running(scheduler):
        [first] = await take(store, 1)
        await asyncio.sleep(0.3)
        assert scheduler.run_now(["c"]) == 1
        [extra] = await take(store, 1)
        [scheduled] = await take(store, 1)

    assert [r.seq for r in (first, extra, scheduled)] == [1, 2, 3]
    assert all(r.check == "c" and r.success for r in (first, extra, scheduled))
    (_, _, at_first), (_, _, at_extra), (_, _, at_scheduled) = probe.calls
    # The extra run came long before the next slot, which stayed on the grid (it did not
    # move to one interval after the extra run, 1.3 s).
    assert at_extra - at_first < 0.6
    assert at_scheduled - at_first == pytest.approx(1.0, abs=0.15)


async def test_run_now_runs_beside_a_run_in_flight_but_never_a_third(until: Any) -> None:
    probe = Probe(block=lambda c: c.name == "busy")
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(
        True, assign(*(check(n, interval="10s", timeout="5s") for n in ("busy", "idle")))
    )

    async with running(scheduler):
        await until(lambda: len(probe.calls) == 2)
        [idle] = await take(store, 1)
        assert scheduler.run_now(["busy", "idle"]) == 2
        [again] = await take(store, 1)
        assert scheduler.run_now(["busy"]) == 0  # its own run and an extra one in flight
        await asyncio.sleep(0.05)
        assert sorted(name for name, _, _ in probe.calls) == ["busy", "busy", "idle", "idle"]

    assert (idle.check, again.check) == ("idle", "idle")
    assert probe.cancelled == ["127.0.0.1:1"] * 2  # both busy runs, stopped with the scheduler
    assert scheduler.skipped == 0  # left alone, not skipped


async def test_an_asked_run_overtakes_a_slow_scheduled_one(until: Any) -> None:
    release = asyncio.Event()
    calls = 0

    async def slow_first(check: AnyCheck) -> ProbeOutcome:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
        return UP

    store = ResultBuffer(100_000)
    scheduler = Scheduler(
        store, agent="eu-1", region="eu", probes={"tcp": slow_first}, rng=NoJitter()
    )
    scheduler.apply(True, assign(check(interval="10s", timeout="5s")))

    async with running(scheduler):
        await until(lambda: calls == 1)
        assert scheduler.run_now(["c"]) == 1
        [asked] = await take(store, 1)
        # The scheduled run is still the check's own: with it and the extra one done, a
        # new ask finds room again.
        release.set()
        [scheduled] = await take(store, 1)
        assert scheduler.run_now(["c"]) == 1
        [third] = await take(store, 1)

    assert [r.seq for r in (asked, scheduled, third)] == [1, 2, 3]
    assert asked.started_at > scheduled.started_at  # finished first, started later
    assert third.success


async def test_a_new_revision_stops_the_extra_run_too(until: Any) -> None:
    probe = Probe(block=lambda c: True)
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(check(interval="10s", timeout="5s")))

    async with running(scheduler):
        await until(lambda: len(probe.calls) == 1)
        assert scheduler.run_now(["c"]) == 1
        await until(lambda: len(probe.calls) == 2)
        scheduler.apply(True, assign(check(target="127.0.0.1:2", interval="10s", timeout="5s")))
        await until(lambda: len(probe.cancelled) == 2)
        assert scheduler.run_now(["c"]) == 1  # beside the new revision's run

    assert probe.cancelled[:2] == ["127.0.0.1:1"] * 2
    assert store.unsent == 0  # nothing more stored


async def test_run_now_ignores_unknown_and_repeated_names() -> None:
    probe = Probe()
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store)
    scheduler.apply(True, assign(check(interval="10s", timeout="5s")))
    assert scheduler.run_now(["c"]) == 0  # not running yet: nothing runs
    assert probe.calls == []

    async with running(scheduler):
        await take(store, 1)
        assert scheduler.run_now(["nope", "c", "", "c", "C"]) == 1
        [result] = await take(store, 1)
        assert scheduler.run_now([]) == 0
        await asyncio.sleep(0.05)

    assert result.check == "c"
    assert len(probe.calls) == 2
    assert store.unsent == 0  # nothing more stored


async def test_run_now_beyond_max_in_flight_is_skipped_and_counted(until: Any) -> None:
    probe = Probe(block=lambda c: c.name != "free")
    store = ResultBuffer(100_000)
    scheduler = scheduler_for(probe, store, max_in_flight=2)
    scheduler.apply(True, assign(check("free", interval="10s", timeout="5s")))

    async with running(scheduler):
        await take(store, 1)
        slow = [check(f"slow{i}", interval="10s", timeout="5s") for i in range(2)]
        scheduler.apply(False, assign(*slow))
        await until(lambda: len(probe.calls) == 3)
        assert scheduler.run_now(["free", "slow0"]) == 0
        await asyncio.sleep(0.05)

    assert [name for name, _, _ in probe.calls] == ["free", "slow0", "slow1"]
    assert scheduler.skipped == 2  # both for want of room, slow0's extra run included
    assert store.unsent == 0  # nothing more stored


# Launched runs: probes that run on loop callbacks (agent.probes.launch)


class Launcher:
    """Stands in for a probe's launcher: records launches and aborts; answers UP on the
    next loop turn, never (``answer=False``), or raises when launched (``broken``)."""

    def __init__(self, *, answer: bool = True, broken: bool = False) -> None:
        self.launched: list[str] = []
        self.aborted: list[str] = []
        self._answer = answer
        self._broken = broken

    def prepare(self, check: AnyCheck) -> Launch:
        def launch(loop: asyncio.AbstractEventLoop, done: Done) -> Abort:
            if self._broken:
                raise RuntimeError("boom")
            self.launched.append(check.name)
            if self._answer:
                loop.call_soon(done, UP)
            return lambda: self.aborted.append(check.name)

        return launch


def launched_scheduler(
    launcher: Launcher, store: ResultBuffer, **kwargs: Any
) -> tuple[Scheduler, Probe]:
    probe = Probe()  # the coroutine the launcher stands in for: must not be called
    scheduler = Scheduler(
        store,
        agent="a",
        region="r",
        probes={"tcp": probe},
        launchers={probe: launcher.prepare},
        rng=NoJitter(),
        **kwargs,
    )
    return scheduler, probe


async def test_launched_runs_publish_without_a_task_per_run() -> None:
    launcher = Launcher()
    store = ResultBuffer(100_000)
    scheduler, probe = launched_scheduler(launcher, store)
    scheduler.apply(
        True, assign(*(check(f"c{i}", interval="1s", timeout="500ms") for i in range(3)))
    )

    async with running(scheduler):
        tasks = len(asyncio.all_tasks())
        results = await take(store, 3)
        assert len(asyncio.all_tasks()) == tasks

    assert sorted(r.check for r in results) == ["c0", "c1", "c2"]
    assert [r.seq for r in results] == [1, 2, 3]
    assert all(r.success for r in results)
    assert probe.calls == []


async def test_run_now_launches_a_launched_probe() -> None:
    launcher = Launcher()
    store = ResultBuffer(100_000)
    scheduler, probe = launched_scheduler(launcher, store)
    scheduler.apply(True, assign(check(interval="10s", timeout="5s")))

    async with running(scheduler):
        await take(store, 1)
        assert scheduler.run_now(["c"]) == 1
        [result] = await take(store, 1)

    assert result.success
    assert launcher.launched == ["c", "c"]
    assert probe.calls == []


async def test_launched_run_that_never_answers_is_cut_off_and_aborted() -> None:
    launcher = Launcher(answer=False)
    store = ResultBuffer(100_000)
    scheduler, _ = launched_scheduler(launcher, store, grace=0.05)
    scheduler.apply(True, assign(check(timeout="100ms", interval="1s")))

    async with running(scheduler):
        [result] = await take(store, 1)

    assert result.failure is FailureClass.TIMEOUT
    assert result.outcome.message == "probe did not finish within its timeout of 100ms"
    assert launcher.aborted == ["c"]


async def test_removing_a_check_aborts_its_launched_run(until: Any) -> None:
    launcher = Launcher(answer=False)
    store = ResultBuffer(100_000)
    scheduler, _ = launched_scheduler(launcher, store)
    scheduler.apply(True, assign(check("a", timeout="5s", interval="10s")))

    async with running(scheduler):
        await until(lambda: launcher.launched == ["a"])
        scheduler.apply(True, [])
        assert launcher.aborted == ["a"]
        await asyncio.sleep(0.05)

    assert store.unsent == 0  # nothing more stored


async def test_launch_that_raises_is_an_internal_result_and_logged() -> None:
    store = ResultBuffer(100_000)
    scheduler, _ = launched_scheduler(Launcher(broken=True), store)
    scheduler.apply(True, assign(check()))

    with structlog.testing.capture_logs() as logs:
        async with running(scheduler):
            [result] = await take(store, 1)

    assert result.failure is FailureClass.INTERNAL
    assert result.outcome.message == "probe failed: RuntimeError: boom"
    assert any(e["log_level"] == "error" and e["check"] == "c" for e in logs)


async def test_http_checks_run_through_the_real_launcher(serve: Any) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()

    port = await serve(answer)
    store = ResultBuffer(100_000)
    scheduler = Scheduler(store, agent="a", region="r", rng=NoJitter())
    web = parse_check(
        {
            "name": "web",
            "type": "http",
            "target": f"http://127.0.0.1:{port}/",
            "interval": "1s",
            "timeout": "500ms",
        }
    )
    scheduler.apply(True, assign(web))

    async with running(scheduler):
        tasks = len(asyncio.all_tasks())
        results = await take(store, 2)
        assert len(asyncio.all_tasks()) == tasks

    assert [r.success for r in results] == [True, True]
    assert isinstance(results[0].outcome.details, HttpDetails)
    assert results[0].outcome.details.status_code == 204
