"""The buffer of unacknowledged results: order, acknowledgement, rewind and its bound."""

from __future__ import annotations

import asyncio

import pytest

from agent.buffer import ResultBuffer
from vantage.results import ProbeOutcome, ProbeResult


def result(seq: int) -> ProbeResult:
    return ProbeResult("c", 1, seq, 0.0, 0.0, ProbeOutcome(success=True))


def seqs(results: list[ProbeResult]) -> list[int]:
    return [r.seq for r in results]


def test_sends_in_order_and_forgets_what_is_acknowledged() -> None:
    buffer = ResultBuffer(10)
    for seq in range(1, 6):
        assert buffer.add(result(seq))

    assert seqs(buffer.take_unsent(2)) == [1, 2]
    assert seqs(buffer.take_unsent(10)) == [3, 4, 5]
    assert (buffer.in_flight, buffer.unsent) == (5, 0)
    assert buffer.ack(3) == 3
    assert (len(buffer), buffer.in_flight) == (2, 2)


def test_rewind_resends_everything_unacknowledged_oldest_first() -> None:
    buffer = ResultBuffer(10)
    for seq in range(1, 6):
        buffer.add(result(seq))
    buffer.take_unsent(3)
    buffer.ack(1)

    buffer.rewind()

    assert buffer.in_flight == 0
    assert seqs(buffer.take_unsent(10)) == [2, 3, 4, 5]


def test_ack_ahead_of_sending_forgets_unsent_too() -> None:
    buffer = ResultBuffer(10)
    for seq in range(1, 6):
        buffer.add(result(seq))
    buffer.take_unsent(2)

    assert buffer.ack(4) == 4
    assert seqs(buffer.take_unsent(10)) == [5]


def test_full_buffer_drops_the_oldest_and_counts() -> None:
    buffer = ResultBuffer(3)
    for seq in range(1, 4):
        assert buffer.add(result(seq))
    buffer.take_unsent(1)

    assert not buffer.add(result(4))
    assert not buffer.add(result(5))

    assert buffer.dropped == 2
    assert buffer.in_flight == 0  # the in-flight result 1 went first
    assert seqs(buffer.take_unsent(10)) == [3, 4, 5]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ResultBuffer(0)


async def test_wait_unsent_wakes_on_arrival_or_deadline() -> None:
    buffer = ResultBuffer(10)
    loop = asyncio.get_running_loop()

    assert not await buffer.wait_unsent(1, loop.time() + 0.02)

    waiter = asyncio.create_task(buffer.wait_unsent(2, loop.time() + 5))
    buffer.add(result(1))
    await asyncio.sleep(0)
    assert not waiter.done()
    buffer.add(result(2))
    assert await waiter
