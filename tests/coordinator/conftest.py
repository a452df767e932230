"""Fixtures for the coordinator's tests; the machinery is in ``live_coordinator``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from live_coordinator import Running, start, write_config


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """A coordinator with two checks (web, db), two tokens and a one-agent engine."""
    async with start(write_config(tmp_path)) as coordinator:
        yield coordinator
