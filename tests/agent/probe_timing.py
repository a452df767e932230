"""What every probe outcome must satisfy, whatever the probe type: phase timings that
are non-negative and add up to the probe's wall time, and a return within the timeout."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable

import pytest

from vantage.results import PHASES, ProbeOutcome

# How far the phases may fall short of the probe's wall time. The work before the clock
# starts and after it stops takes microseconds, but on a busy machine the kernel may
# deschedule the process right there for a tick or two (4 ms each at HZ=250).
PHASE_SLACK = 0.015


async def timed(run: Awaitable[ProbeOutcome]) -> tuple[ProbeOutcome, float]:
    """The outcome and the wall time it took."""
    started = time.monotonic()
    outcome = await run
    return outcome, time.monotonic() - started


def assert_phases_sane(
    outcome: ProbeOutcome,
    elapsed: float,
    *,
    timeout: float | None = None,
    zero: Iterable[str] = (),
    slack: float = PHASE_SLACK,
) -> None:
    """Phases non-negative, summing to ``elapsed``; the ``zero`` ones exactly zero."""
    phases = outcome.phases
    values = {name: getattr(phases, name) for name in PHASES}
    assert all(value >= 0 for value in values.values()), phases
    assert phases.total <= elapsed + 1e-6
    assert phases.total == pytest.approx(elapsed, abs=slack)
    for name in zero:
        assert values[name] == 0, (name, phases)
    if timeout is not None:
        assert elapsed < timeout + 0.1  # returned within the timeout
