"""The fuzz targets drive a real coordinator process, started as the e2e tests start
theirs (tests/e2e/running_system.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
