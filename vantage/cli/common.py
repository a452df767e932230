"""What every ``vantage`` command shares: the error every refusal becomes, exit codes, the
table printer, address checks, logging flags and the service runner.

Every module of this package registers its commands with ``add_commands(commands)``, takes
the coordinator's address, TLS and token with ``add_connection_flags``, and reports a bad
input by raising ``UsageError``: ``main()`` prints it as one line,
``vantage COMMAND: error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import logs
from ..configfile import split_host_port
from ..names import TOKEN_RULE, token_ok

if TYPE_CHECKING:
    from ..tls import ClientTls

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


def add_connection_flags(parser: argparse.ArgumentParser, *, agent: bool = False) -> None:
    """How a command reaches the coordinator: ``--coordinator``, TLS and the token.

    A client command defaults to a coordinator on this machine and reads its token from
    ``--token-file`` or the ``VANTAGE_TOKEN`` environment variable (none: fine where
    queries need no token). An agent names its coordinator and needs ``--token-file``
    unless its client certificate stands in for the token.
    """
    if agent:
        parser.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    else:
        parser.add_argument(
            "--coordinator",
            default=DEFAULT_COORDINATOR,
            metavar="HOST:PORT",
            help=f"coordinator's gRPC address (default {DEFAULT_COORDINATOR})",
        )
    tls = parser.add_argument_group(
        "TLS", "default: plaintext to a loopback address, TLS verifying the server otherwise"
    )
    mode = tls.add_mutually_exclusive_group()
    mode.add_argument("--tls", dest="tls", action="store_true", default=None, help="use TLS")
    mode.add_argument("--plaintext", dest="tls", action="store_false", help="do not use TLS")
    tls.add_argument(
        "--ca-file", type=Path, metavar="FILE", help="CA certificates to verify the server "
        "with (default: the system's)",
    )  # fmt: skip
    tls.add_argument(
        "--cert-file", type=Path, metavar="FILE", help="client certificate (mutual TLS)"
    )
    tls.add_argument("--key-file", type=Path, metavar="FILE", help="its private key")
    tls.add_argument(
        "--server-name", metavar="NAME", help="the name the server certificate must carry "
        "(default: the host of --coordinator)",
    )  # fmt: skip
    if agent:
        parser.add_argument(
            "--token-file", type=Path, metavar="FILE",
            help="file holding the agent's token (optional with --cert-file, whose name "
            "then stands in for it)",
        )  # fmt: skip
    else:
        parser.add_argument(
            "--token-file", type=Path, metavar="FILE",
            help="file holding a query token (default: $VANTAGE_TOKEN)",
        )  # fmt: skip


def client_tls(args: argparse.Namespace) -> ClientTls:
    """The ``ClientTls`` the connection flags ask for; UsageError when they contradict
    each other or name a file that cannot be read."""
    # Imported here: grpc reads GRPC_VERBOSITY, which main() sets, when first imported.
    from ..tls import ClientTls, TlsError

    check_address(args.coordinator)
    try:
        tls = ClientTls.choose(
            args.coordinator,
            tls=args.tls,
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            server_name=args.server_name,
        )
        if tls.enabled:
            tls.credentials()  # every file readable now, or one line saying which is not
    except TlsError as exc:
        raise UsageError(str(exc)) from None
    return tls


def client_token(args: argparse.Namespace) -> str | None:
    """The token of ``--token-file``, else ``$VANTAGE_TOKEN``, else None; UsageError
    when it cannot be a token."""
    if args.token_file is not None:
        return checked_token(read_secret(args.token_file), f"token file {args.token_file}")
    token = os.environ.get("VANTAGE_TOKEN", "").strip()
    return checked_token(token, "$VANTAGE_TOKEN") if token else None


def checked_token(token: str, where: str) -> str:
    """``token``, or UsageError naming ``where`` it came from when it cannot be one."""
    if not token_ok(token):
        raise UsageError(f"{where}: not a token (a token is {TOKEN_RULE})")
    return token


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


def run_service(
    coroutine: Coroutine[Any, Any, None], stop: Callable[[], None] | None = None
) -> None:
    """Run a service until it ends. SIGTERM and SIGINT call ``stop`` (a drain: the
    service ends by itself soon after), or without one cancel it; a second signal
    cancels it at once."""

    async def supervised() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        signalled = False

        def on_signal() -> None:
            nonlocal signalled
            if stop is not None and not signalled:
                stop()
            else:
                task.cancel()
            signalled = True

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await coroutine

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(supervised())
    else:
        uvloop.run(supervised())
