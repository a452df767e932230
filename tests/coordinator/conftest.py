"""Fixtures for the coordinator's tests; the machinery is in ``live_coordinator``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uvloop
from live_coordinator import Running, start, write_config

# What runs on the coordinator's own transports (its HTTP connection gate) is tested on
# uvloop too, the loop `vantage coordinator` runs on.
_BOTH_LOOPS = {"test_gate.py"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.path.name in _BOTH_LOOPS:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """A coordinator with two checks (web, db), two tokens and a one-agent engine."""
    async with start(write_config(tmp_path)) as coordinator:
        yield coordinator
