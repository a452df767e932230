"""What every ``vantage`` command shares: the error every refusal becomes, exit codes, the
table printer, address checks, logging flags and the service runner.

Every module of this package registers its commands with ``add_commands(commands)`` and
reports a bad input by raising ``UsageError``: ``main()`` prints it as one line,
``vantage COMMAND: error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from .. import logs
from ..configfile import split_host_port

DEFAULT_COORDINATOR = "127.0.0.1:7400"
EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags or inputs, or a refusal from the coordinator: one line, exit 2."""


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def check_address(address: str, flag: str = "--coordinator") -> str:
    """``address`` when it is HOST:PORT (``[v6]:PORT``); UsageError naming ``flag``."""
    try:
        split_host_port(address)
    except ValueError:
        raise UsageError(f"{flag} {address!r} is not HOST:PORT") from None
    return address


def read_secret(path: Path, what: str = "token") -> str:
    """The one non-empty line of a secret file (a token); UsageError otherwise."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} file {path} is not text") from None
    if len(lines) != 1:
        raise UsageError(f"{what} file {path} must hold exactly one {what} on one line")
    return lines[0]


def add_coordinator_flag(parser: argparse.ArgumentParser) -> None:
    """``--coordinator HOST:PORT`` of a client command, defaulting to this machine."""
    parser.add_argument(
        "--coordinator",
        default=DEFAULT_COORDINATOR,
        metavar="HOST:PORT",
        help=f"coordinator's gRPC address (default {DEFAULT_COORDINATOR})",
    )


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: JSON unless stderr is a terminal",
    )


def configure_logs(args: argparse.Namespace) -> None:
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    logs.configure(args.log_level, json=json_logs)


def run_service(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a service until it ends; SIGTERM and SIGINT cancel it cleanly."""

    async def supervised() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await coroutine

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(supervised())
    else:
        uvloop.run(supervised())
