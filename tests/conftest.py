"""Settings for the whole suite."""

import os

import pytest

# gRPC's C core prints its own chatter ("Got goaway") at info level; the CLI silences it
# the same way (vantage.cli).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# In CI the property tests replay the same examples on every run (a red main must mean a
# change broke something, not that the search got lucky); locally each run searches anew.
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config: object) -> None:
    # A compiled module older than its source would test stale code (vantage/native.py).
    import pytest

    from vantage import native

    stale = native.stale()
    if stale:
        raise pytest.UsageError(
            f"compiled modules older than their source: {', '.join(stale)}; run `make native`"
        )


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Agents started by the tests keep their spool under the test's own directory, never
    in the user's ``~/.local/state`` where runs (and tests reusing a name) would replay
    each other's results. Session fixtures get one for the run; each test its own."""
    os.environ.pop("STATE_DIRECTORY", None)
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


@pytest.fixture(autouse=True)
def _test_state_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
