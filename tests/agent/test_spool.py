"""The on-disk result spool: order and numbering across reopening, acknowledgement, the
byte bound, recovery from torn and corrupt records, the directory lock, and a real agent
killed outright (``kill -9``) that carries on where its spool left off."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from test_buffer import result, seqs

from agent.spool import MIN_SPOOL_BYTES, Spool, SpoolError
from vantage.results import HttpDetails, ProbeOutcome, ProbeResult

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
from running_system import VANTAGE, System, free_port, system, wait_until

__all__ = ["system"]


def bulky(seq: int) -> ProbeResult:
    """A result of about 300 bytes on disk, to fill a small spool quickly."""
    url = f"http://127.0.0.1:8080/{'x' * 200}/{seq}"
    return ProbeResult(
        "c", 1, seq, 0.0, 0.0, ProbeOutcome(True, details=HttpDetails(200, final_url=url))
    )


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def fill(spool: Spool, start: int, stop: int, make: Any = result) -> None:
    for seq in range(start, stop):
        spool.add(make(seq))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_results_survive_reopening_in_order_with_their_numbering_and_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path, memory_results=10)
    fill(spool, 1, 101)
    spool.take_unsent(30)  # in flight on a stream that then broke: sent again after restart
    spool.flush()
    instance = spool.id
    spool.close()

    again = Spool(tmp_path, memory_results=10)
    assert (again.id, again.next_seq, len(again), again.unsent) == (instance, 101, 100, 100)
    assert again.take_unsent(1000) == [result(seq) for seq in range(1, 101)]
    again.add(result(101))
    again.rewind()
    assert seqs(again.take_unsent(1000)) == list(range(1, 102))
    again.close()
    assert len(instance) == 32


def test_replay_reads_past_the_memory_window_while_new_results_arrive(tmp_path: Path) -> None:
    spool = Spool(tmp_path, memory_results=10)
    fill(spool, 1, 51)
    spool.flush()
    spool.rewind()  # a new stream

    replayed = seqs(spool.take_unsent(20))
    fill(spool, 51, 56)  # the scheduler goes on meanwhile
    replayed += seqs(spool.take_unsent(1000))

    assert replayed == list(range(1, 56))
    assert (spool.in_flight, spool.unsent) == (55, 0)
    spool.close()


def test_acknowledged_results_are_deleted_and_numbering_goes_on(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 1, 11)
    spool.flush()
    assert segments(tmp_path)
    spool.take_unsent(10)

    assert spool.ack(10) == 10
    spool.flush()

    assert (len(spool), spool.disk_bytes, segments(tmp_path)) == (0, 0, [])
    spool.close()
    again = Spool(tmp_path)
    assert (again.next_seq, len(again)) == (11, 0)
    again.close()


def test_acknowledged_before_the_flush_never_reaches_the_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 1, 11)
    spool.take_unsent(10)
    spool.ack(8)
    spool.flush()
    spool.close()

    again = Spool(tmp_path)
    assert seqs(again.take_unsent(100)) == [9, 10]
    again.close()


def test_ack_past_next_seq_continues_the_numbering_after_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 1, 4)

    # The coordinator ingested results 4..7 that this spool lost (sent, not yet written).
    spool.ack(7)

    assert (spool.next_seq, len(spool), spool.unsent) == (8, 0, 0)
    spool.add(result(8))
    assert seqs(spool.take_unsent(10)) == [8]
    spool.close()


def test_full_spool_drops_the_oldest_counts_and_remembers(tmp_path: Path) -> None:
    clock = Clock()
    spool = Spool(tmp_path, max_bytes=MIN_SPOOL_BYTES, clock=clock)
    with structlog.testing.capture_logs() as logs:
        for start in range(1, 2001, 100):  # 2,000 results of ~300 bytes: ~600 KB
            fill(spool, start, start + 100, bulky)
            spool.flush()
            clock.now += 1.0

    assert spool.dropped > 0
    assert sum(path.stat().st_size for path in segments(tmp_path)) <= MIN_SPOOL_BYTES
    kept = seqs(spool.take_unsent(10_000))
    assert kept == list(range(spool.dropped + 1, 2001))  # the oldest went, in order
    warnings = [e for e in logs if e["event"] == "spool full: dropped the oldest results"]
    # Rate-limited: 20 flushes a second apart, at most one line per 10 seconds.
    assert 1 <= len(warnings) <= 2
    assert warnings[-1]["dropped_total"] <= spool.dropped
    dropped = spool.dropped
    spool.close()

    again = Spool(tmp_path, max_bytes=MIN_SPOOL_BYTES)
    assert again.dropped == dropped
    assert seqs(again.take_unsent(10_000)) == kept
    again.close()


def test_torn_tail_keeps_everything_before_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 1, 11)
    spool.flush()
    fill(spool, 11, 21)
    spool.flush()
    spool.close()
    [segment] = segments(tmp_path)
    size = segment.stat().st_size
    with segment.open("r+b") as file:
        file.truncate(size - 5)  # the second flush's record, cut short mid-write

    with structlog.testing.capture_logs() as logs:
        again = Spool(tmp_path)

    assert seqs(again.take_unsent(100)) == list(range(1, 11))
    assert (again.dropped, again.next_seq) == (10, 21)  # counted once the replay got there
    [damaged] = [e for e in logs if e["event"].startswith("spool damaged")]
    assert damaged["lost"] == 10
    again.add(result(21))
    assert seqs(again.take_unsent(100)) == [21]
    again.close()


def test_torn_record_written_after_the_state_gives_its_numbers_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    fill(spool, 1, 11)
    spool.flush()
    state = (tmp_path / "state.json").read_bytes()
    fill(spool, 11, 21)
    spool.flush()
    spool.close()
    # kill -9 in the middle of a flush: its record half written, the state not yet saved.
    (tmp_path / "state.json").write_bytes(state)
    [segment] = segments(tmp_path)
    with segment.open("r+b") as file:
        file.truncate(segment.stat().st_size - 5)

    again = Spool(tmp_path)

    assert (again.next_seq, again.dropped) == (11, 10)
    assert seqs(again.take_unsent(100)) == list(range(1, 11))
    again.close()


def test_corrupt_record_in_an_older_segment_is_skipped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=MIN_SPOOL_BYTES * 4)  # segments of 8 KiB
    for start in range(1, 301, 25):
        fill(spool, start, start + 25, bulky)
        spool.flush()
    spool.close()
    older = segments(tmp_path)[1]
    data = bytearray(older.read_bytes())
    data[100] ^= 0xFF  # inside the segment's first record
    older.write_bytes(bytes(data))
    first_lost = int(older.name.removesuffix(".log"))
    after = int(segments(tmp_path)[2].name.removesuffix(".log"))

    again = Spool(tmp_path, max_bytes=MIN_SPOOL_BYTES * 4)
    with structlog.testing.capture_logs() as logs:
        replayed = seqs(again.take_unsent(10_000))
        again.rewind()
        assert seqs(again.take_unsent(10_000)) == replayed  # counted once, not per read

    assert replayed == [*range(1, first_lost), *range(after, 301)]
    assert again.dropped == after - first_lost
    assert any(e["event"] == "spool records unreadable: results lost" for e in logs)
    again.close()


def test_garbage_files_do_not_stop_the_spool(tmp_path: Path) -> None:
    (tmp_path / "00000000000000000001.log").write_bytes(b"not a record at all")
    (tmp_path / "state.json").write_text("{not json")
    (tmp_path / "id").write_text("?")

    with structlog.testing.capture_logs() as logs:
        spool = Spool(tmp_path)

    assert (spool.next_seq, len(spool)) == (1, 0)
    assert {"spool state unreadable", "spool id unreadable"} <= {
        e["event"].split(":")[0] for e in logs
    }
    fill(spool, 1, 3)
    assert seqs(spool.take_unsent(10)) == [1, 2]
    spool.close()


def test_a_second_opener_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(
        SpoolError,
        match=rf"^spool directory {tmp_path} is in use by another agent \(pid {os.getpid()}\)$",
    ):
        Spool(tmp_path)
    spool.close()
    Spool(tmp_path).close()  # the lock went with the first


def test_a_path_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match=r"is not a directory$"):
        Spool(tmp_path / "file")
    with pytest.raises(SpoolError, match=r"^cannot create spool directory .*: Not a directory$"):
        Spool(tmp_path / "file" / "spool")


async def test_run_flushes_every_interval(tmp_path: Path, until: Any) -> None:
    spool = Spool(tmp_path, flush_interval=0.02)
    task = asyncio.create_task(spool.run())
    try:
        fill(spool, 1, 4)
        await until(lambda: bool(segments(tmp_path)))
        await until(lambda: json.loads((tmp_path / "state.json").read_text())["next_seq"] == 4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        spool.close()


# -- real processes -------------------------------------------------------------------------


def agent_command(directory: Path, *flags: str) -> list[str]:
    """A `vantage agent` that opens its spool before it ever reaches the coordinator."""
    token = directory / "agent.token"
    token.write_text("spool-token-0123456789abcdef\n")
    return [VANTAGE, "agent", "--coordinator", f"127.0.0.1:{free_port()}", "--name", "eu-1",
            "--region", "eu", "--token-file", str(token), *flags]  # fmt: skip


def test_a_second_agent_on_the_same_spool_exits_with_one_line(tmp_path: Path) -> None:
    holder = Spool(tmp_path / "spool")
    try:
        second = subprocess.run(
            agent_command(tmp_path, "--spool-dir", str(tmp_path / "spool")),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        holder.close()
    assert second.returncode == 1
    assert second.stderr.splitlines()[-1] == (
        f"vantage agent: error: spool directory {tmp_path / 'spool'} is in use by another "
        f"agent (pid {os.getpid()})"
    )


@pytest.mark.parametrize(
    ("flags", "code", "line"),
    [
        (("--spool-bytes", "lots"), 2, "--spool-bytes 'lots' is not a size"),
        (("--spool-bytes", "1KiB"), 2, "spool_bytes must be at least 65536 (64KiB), not 1024"),
        (("--flush-interval", "soon"), 2, "--flush-interval: 'soon' is not a duration"),
        (("--spool-dir", "/dev/null"), 1, "spool directory /dev/null is not a directory"),
    ],
)
def test_spool_flags_are_checked(
    tmp_path: Path, flags: tuple[str, ...], code: int, line: str
) -> None:
    command = agent_command(tmp_path, *flags)
    run = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert run.returncode == code
    assert line in run.stderr.splitlines()[-1]


def _agent_events(system: System, name: str) -> list[dict[str, Any]]:
    events = []
    for line in (system.dir / f"agent-{name}.log").read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _event(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(e for e in events if e.get("event") == name)


def _results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "probe result"]


@pytest.mark.e2e
def test_agent_killed_outright_goes_on_with_its_numbering_and_no_duplicate(
    system: System, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default spool directory: $STATE_DIRECTORY/spool/NAME, as under systemd.
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    closed = free_port()
    config = system.write_config(
        "checks:\n"
        + "".join(
            f"  - {{name: c{index}, type: tcp, target: '127.0.0.1:{closed}', "
            "interval: 1s, timeout: 500ms}\n"
            for index in range(10)
        )
    )
    coordinator = system.coordinator(config)

    def received() -> float:
        return coordinator.metric("vantage_results_received_total", region="eu")

    def duplicates() -> float:
        return coordinator.metric("vantage_results_dropped_total", reason="duplicate")

    def connected() -> bool:
        agents = json.loads(coordinator.cli("agents", "--json").stdout)["agents"]
        return any(agent["connected"] for agent in agents)

    first = system.agent(coordinator, "eu-1", "eu")
    wait_until(lambda: received() >= 20, 30, "results from the agent")

    # The coordinator stops answering: results pile up unacknowledged, in the spool.
    coordinator.proc.popen.send_signal(signal.SIGSTOP)
    try:
        stopped_at = max(e["seq"] for e in _results(_agent_events(system, "eu-1")))
        wait_until(
            lambda: (
                max(e["seq"] for e in _results(_agent_events(system, "eu-1"))) >= stopped_at + 35
            ),
            30,
            "results made while the coordinator is stopped",
        )
        first.stop(signal.SIGKILL)
    finally:
        coordinator.proc.popen.send_signal(signal.SIGCONT)
    made = _results(_agent_events(system, "eu-1"))
    last_made = max(e["seq"] for e in made)
    wait_until(lambda: not connected(), 30, "the coordinator to see the agent gone")
    ingested_before = received()

    second = system.agent(coordinator, "eu-1", "eu")
    wait_until(
        lambda: any(
            e.get("event") == "connected to coordinator" for e in _agent_events(system, "eu-1")
        ),
        30,
        "the restarted agent to connect",
    )
    events = _agent_events(system, "eu-1")
    opened, welcome = _event(events, "spool opened"), _event(events, "connected to coordinator")
    spooled_upto = opened["next_seq"] - 1
    # What the coordinator had handled is exactly what it ingested: no gap, no duplicate.
    assert welcome["last_seq"] == ingested_before
    assert welcome["resending"] == max(0, spooled_upto - welcome["last_seq"])
    wait_until(lambda: len(_results(_agent_events(system, "eu-1"))) >= 20, 30, "new results")
    new = _results(_agent_events(system, "eu-1"))
    assert min(e["seq"] for e in new) == max(spooled_upto, welcome["last_seq"]) + 1
    wait_until(lambda: received() >= ingested_before + welcome["resending"] + 10, 30, "the replay")
    second.stop()  # SIGTERM: a clean stop, the spool flushed and closed
    wait_until(lambda: not connected(), 30, "the coordinator to see the agent gone")
    ingested = received()

    # One more start: its Welcome says the highest number the coordinator handled, which
    # must be the number of results it ingested (each number once, none missing).
    system.agent(coordinator, "eu-1", "eu")
    wait_until(
        lambda: any(
            e.get("event") == "connected to coordinator" for e in _agent_events(system, "eu-1")
        ),
        30,
        "the third agent to connect",
    )
    assert _event(_agent_events(system, "eu-1"), "connected to coordinator")["last_seq"] == ingested
    assert duplicates() == 0

    # kill -9 lost the results made after the last flush, and only those.
    lost = [e for e in made if e["seq"] > max(spooled_upto, welcome["last_seq"])]
    assert len(lost) == last_made - max(spooled_upto, welcome["last_seq"])
    if lost:
        span = _seconds(lost[-1]["timestamp"]) - _seconds(lost[0]["timestamp"])
        print(f"kill -9 lost {len(lost)} of {len(made)} results, made within {span:.3f}s")
        assert span <= 1.0 + 0.5  # one flush interval, and slack for a busy machine
    else:
        print(f"kill -9 lost none of {len(made)} results")


def _seconds(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp).timestamp()
