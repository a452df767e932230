"""The deploy files' tests start real coordinators and agents as the e2e tests do
(tests/e2e/running_system.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
from running_system import system

__all__ = ["system"]
