"""The ``vantage`` command: run a coordinator or an agent, ask for verdicts and agents, ask
whether a target is down for everyone, manage tokens.

One module per command group (``services``, ``queries``, ``check``, ``tokens``), each
registering its commands; what they share is in ``common``.

Exit codes: 0 success; 1 a service stopped on a fatal error (refused token, ...) or, for
``vantage check``, the target is not up; 2 usage, configuration or connection errors and
refusals. Errors are one line on stderr.
"""

from __future__ import annotations

import os

# gRPC's C core logs its own chatter ("Got goaway") at info; ours is structured. It reads
# the variable when grpc is first imported, which the command modules below may do.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .common import EXIT_USAGE, UsageError

__all__ = ["UsageError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core logs its own chatter ("Got goaway") at info; ours is structured. It
    # reads the variable when grpc is first imported, which the command modules may do.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except UsageError as exc:
        print(f"vantage {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def parser() -> argparse.ArgumentParser:
    """The whole command line, every group's commands registered."""
    # Imported here, after main() set GRPC_VERBOSITY: some of them import grpc.
    from . import check, queries, services, tokens

    parser = argparse.ArgumentParser(
        prog="vantage",
        description="Is it down for everyone, in some regions, or just from here? "
        "Agents in several regions probe targets; a coordinator decides.",
    )
    parser.add_argument("--version", action="version", version=f"vantage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (services, queries, check, tokens):
        group.add_commands(commands)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
