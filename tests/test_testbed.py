"""The outage scenarios, played on the multi-region test bed (tests/testbed/).

Every file in ../shared/scenarios/ (the verdicts' specification) and in tests/scenarios/
(the project's own) runs on a simulated internet of network namespaces with the real
coordinator and agents; one test per file passes when every expectation was met, no
`never` was broken, the verdict history has no gap or duplicate, nothing crashed and
nothing was left on the host. The scenarios play side by side (four at a time) in one
module-scoped run; each test then reports its own scenario, one line per expectation.

It needs root (namespaces, veth pairs, nftables), as CI has: elsewhere every test here is
skipped, saying why.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from testbed.run import Outcome, run_suite, unavailable

TESTS = Path(__file__).resolve().parent
SHARED = TESTS.parent.parent / "shared" / "scenarios"
FILES = sorted(SHARED.glob("*.yaml")) + sorted((TESTS / "scenarios").glob("*.yaml"))
JOBS = 4
# The whole run: the longest scenario is about two minutes; four at a time, the files
# above take about four (see README, "The test bed").
SUITE_TIMEOUT = 1200

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SUITE_TIMEOUT)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, Outcome]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"multi-region test bed skipped: {why}")
    workdir = tmp_path_factory.mktemp("testbed")
    played = asyncio.run(run_suite(FILES, workdir, jobs=JOBS))
    return {outcome.path: outcome for outcome in played}


def test_there_are_scenarios_of_both_kinds() -> None:
    assert any(path.parent == SHARED for path in FILES), f"no scenario in {SHARED}"
    assert any(path.parent != SHARED for path in FILES), "no scenario in tests/scenarios"


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_scenario(
    path: Path, outcomes: dict[Path, Outcome], capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = outcomes[path]
    report = "\n".join(outcome.lines())
    with capsys.disabled():  # the report is the point, pass or fail
        print(f"\n{report}")
    if not outcome.passed:
        pytest.fail(report, pytrace=False)
