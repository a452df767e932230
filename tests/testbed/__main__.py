"""``python -m tests.testbed [--jobs N] [--keep-logs] [--workdir DIR] FILE...``

Plays the scenario files and prints one line per expectation, then PASS or FAIL per
scenario. Exit status: 0 when every scenario passed, 1 when one failed, 2 when the test
bed cannot run here (not root, a tool missing) or on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
# The helpers beside the test bed (tests/pki.py), as pytest finds them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from .run import Outcome, install_signal_handlers, run_suite, unavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed", description="Play outage scenarios on the test bed."
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("--jobs", type=int, default=4, help="scenarios at a time (default 4)")
    parser.add_argument("--keep-logs", action="store_true", help="keep logs of passing runs too")
    parser.add_argument("--workdir", type=Path, help="where logs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    why = unavailable() or _stale_native()
    if why is not None:
        print(f"test bed unavailable: {why}", file=sys.stderr)
        return 2
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"no such scenario file: {', '.join(missing)}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vantage-testbed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"playing {len(args.files)} scenario(s), {args.jobs} at a time; logs in {workdir}",
        flush=True,
    )

    def report(outcome: Outcome) -> None:
        print("\n".join(outcome.lines()), flush=True)

    async def play() -> list[Outcome]:
        install_signal_handlers()
        return await run_suite(
            args.files, workdir, jobs=args.jobs, report=report, keep_logs=args.keep_logs
        )

    started = time.monotonic()
    try:
        outcomes = asyncio.run(play())
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, SIGTERM
        print("interrupted; everything the runs made was removed", file=sys.stderr)
        return 130
    passed = sum(outcome.passed for outcome in outcomes)
    failed = len(outcomes) - passed
    print(f"{passed} passed, {failed} failed in {time.monotonic() - started:.0f}s")
    if not failed and not args.keep_logs and args.workdir is None:
        for leftover in sorted(workdir.rglob("*"), reverse=True):
            if leftover.is_dir():
                leftover.rmdir()
            else:
                leftover.unlink()
        workdir.rmdir()
    return 0 if not failed else 1


def _stale_native() -> str | None:
    """The agent and coordinator import compiled modules first: stale ones would be
    tested instead of the sources (vantage/native.py)."""
    try:
        from vantage import native
    except ImportError:
        return None
    stale = native.stale()
    if not stale:
        return None
    return f"compiled modules older than their source: {', '.join(stale)}; run `make native`"


if __name__ == "__main__":
    sys.exit(main())
