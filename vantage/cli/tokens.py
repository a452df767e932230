"""``vantage token create|list|revoke``: the coordinator's tokens file, edited in place.

The commands work on the file (``--tokens-file``, or the ``tokens_file`` of a
coordinator's ``--config``), never through the network: whoever may write that file may
admit agents. A running coordinator notices the change within a second: a new token is
admitted, a revoked one's streams end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import names
from ..configfile import ConfigError
from .common import EXIT_OK, UsageError, print_table

if TYPE_CHECKING:
    from coordinator.tokens import TokenFile

SCOPES = ("agent", "query", "checknow")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser(
        "token",
        help="create, list and revoke tokens",
        description="Manage the coordinator's tokens file. A token is shown once, when "
        "created; the file keeps only its SHA-256. A running coordinator applies every "
        "change within a second (a revoked token's streams end).",
    )
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="make a new token and print it",
        description="Make a new random token (192 bits), store its hash under NAME, print "
        "the token on stdout (only now). An agent token admits the agent NAME in REGION "
        "only; a query token reads verdicts, agents, history and /metrics; a checknow "
        "token may also run on-demand checks.",
    )
    create.add_argument("--name", required=True, help="the agent's name, or the client's")
    create.add_argument(
        "--scope", choices=SCOPES, default="agent", help="what it may do (default agent)"
    )
    create.add_argument("--region", help="the agent's region (agent tokens only, required)")
    _add_file_flags(create)
    create.set_defaults(run=_create)

    listing = actions.add_parser("list", help="list the tokens (never the tokens themselves)")
    _add_file_flags(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_list)

    revoke = actions.add_parser(
        "revoke",
        help="remove a token",
        description="Remove the token NAME (and plaintext entries bound to agent NAME). A "
        "running coordinator ends the streams it admitted within a second.",
    )
    revoke.add_argument("name", metavar="NAME")
    _add_file_flags(revoke)
    revoke.set_defaults(run=_revoke)


def _add_file_flags(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tokens-file", type=Path, metavar="FILE", help="the tokens file")
    where.add_argument(
        "--config", type=Path, metavar="FILE", help="a coordinator's settings: its tokens_file"
    )


def _token_file(args: argparse.Namespace) -> TokenFile:
    from coordinator.tokens import TokenFile

    path: Path | None = args.tokens_file
    if path is None:
        from coordinator.config import load_config

        try:
            path = load_config(args.config).tokens_file
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        if path is None:
            raise UsageError(f"{args.config} names no tokens_file")
    return TokenFile(path)


def _create(args: argparse.Namespace) -> int:
    from coordinator.tokens import Scope

    scope = Scope(args.scope)
    try:
        names.agent_name(args.name, "--name")
        if args.region is not None:
            names.agent_name(args.region, "--region")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if scope is Scope.AGENT and args.region is None:
        raise UsageError("an agent token is bound to a region: give --region")
    if scope is not Scope.AGENT and args.region is not None:
        raise UsageError(f"a {scope.value} token has no region: leave out --region")
    tokens = _token_file(args)
    try:
        token, entry = tokens.create(args.name, scope, args.region)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    bound = f", region {entry.region}" if entry.region else ""
    print(token)
    print(
        f"token {entry.name!r} ({entry.scope.value}{bound}) added to {tokens.path}; "
        "it is shown only now: store it",
        file=sys.stderr,
    )
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    tokens = _token_file(args)
    try:
        entries = tokens.entries()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    rows = [
        {
            "name": entry.name,
            "scope": entry.scope.value,
            "region": entry.region,
            "created": entry.created,
            "sha256": entry.digest.hex(),
            "plaintext": entry.plaintext,
            "line": entry.line,
        }
        for entry in entries
    ]
    if args.json:
        print(json.dumps({"tokens": rows}))
        return EXIT_OK
    if not rows:
        print(f"no tokens in {tokens.path}")
        return EXIT_OK
    table = [("NAME", "SCOPE", "REGION", "CREATED", "SHA-256", "NOTE")]
    for row in rows:
        table.append(
            (
                str(row["name"]),
                str(row["scope"]),
                str(row["region"] or "-"),
                str(row["created"] or "-"),
                str(row["sha256"])[:12],
                f"plaintext, line {row['line']}: replace it" if row["plaintext"] else "",
            )
        )
    print_table(table)
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    tokens = _token_file(args)
    try:
        removed = tokens.revoke(args.name)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    for entry in removed:
        bound = f", region {entry.region}" if entry.region else ""
        print(f"revoked {entry.name!r} ({entry.scope.value}{bound}) in {tokens.path}")
    return EXIT_OK
