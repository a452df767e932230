"""Running a probe on event-loop callbacks, without a task.

Every probe is an ``async`` function (``agent.probes.ProbeFn``). At thousands of runs a
second the task and the futures around each run cost as much as the probe's own work,
so a probe may also offer a *launcher* for the checks it can run on plain loop
callbacks: ``prepare(check)`` returns a ``Launch`` for that check (worked out once per
check), or None when the check needs the coroutine.

A ``Launch`` starts one run at once and returns its ``Abort``. The run keeps the same
contract as the coroutine (same outcomes, within the check's timeout, no socket or task
left behind) and hands its outcome to ``done`` exactly once, from a loop callback or
before the launch returns (a connection refused at once); never after ``Abort`` was
called, which releases whatever the run holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from vantage.checks import AnyCheck
from vantage.results import ProbeOutcome

Done = Callable[[ProbeOutcome], None]
Abort = Callable[[], None]
Launch = Callable[[asyncio.AbstractEventLoop, Done], Abort]
Prepare = Callable[[AnyCheck], Launch | None]
