"""Fixtures for end-to-end tests; the machinery lives in running_system.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from running_system import System, system

__all__ = ["module_system", "system"]


@pytest.fixture(scope="module")
def module_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    running = System(tmp_path_factory.mktemp("system"))
    try:
        yield running
    finally:
        running.stop_all()
