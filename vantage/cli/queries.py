"""``vantage status`` and ``vantage agents``: what the coordinator knows, as a table or as
the stable ``--json`` shapes of ARCHITECTURE.md (``vantage.public_json``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from .common import (
    EXIT_OK,
    UsageError,
    add_connection_flags,
    client_tls,
    client_token,
    print_table,
)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="show verdicts",
        description="Show the verdict of every check, or of one, with the regions that "
        "see it down and why.",
    )
    status.add_argument("check", nargs="?", metavar="CHECK", help="only this check")
    add_client_flags(status)
    status.set_defaults(run=_run_status)

    agents = commands.add_parser(
        "agents",
        help="show the agent fleet",
        description="Show every agent the coordinator knows: region, connected, impaired, "
        "last seen.",
    )
    add_client_flags(agents)
    agents.set_defaults(run=_run_agents)


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    add_connection_flags(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")


def _run_status(args: argparse.Namespace) -> int:
    from ..client import verdict_json

    verdicts = _query(args, lambda client: client.verdicts(args.check))
    rows = [verdict_json(v) for v in verdicts]
    if args.json:
        print(json.dumps({"verdicts": rows}, indent=None))
        return EXIT_OK
    if not rows:
        print("no checks")
        return EXIT_OK
    table = [("CHECK", "STATE", "SINCE", "REGIONS", "WHY")]
    for row in rows:
        regions = " ".join(f"{name}:{view['state']}" for name, view in row["regions"].items())
        # A restarted coordinator's restored verdict, until fresh results confirm it.
        state = f"{row['state']} (unconfirmed)" if row["unconfirmed"] else row["state"]
        table.append((row["check"], state, row["since"] or "-", regions or "-", row["reason"]))
    print_table(table)
    return EXIT_OK


def _run_agents(args: argparse.Namespace) -> int:
    from ..client import agent_json

    agents = _query(args, lambda client: client.agents())
    rows = [agent_json(a) for a in agents]
    if args.json:
        print(json.dumps({"agents": rows}))
        return EXIT_OK
    if not rows:
        print("no agents")
        return EXIT_OK
    heading = ("AGENT", "REGION", "CONNECTED", "IMPAIRED", "LAST SEEN", "VERSION")
    table = [(*heading, "RESULTS", "DROPPED", "SKIPPED", "LATE")]
    for row in rows:
        table.append(
            (
                row["name"],
                row["region"],
                "yes" if row["connected"] else "no",
                "yes" if row["impaired"] else "no",
                row["last_seen"] or "-",
                row["version"] or "-",
                str(row["results_received"]),
                str(row["results_dropped"]),
                str(row["runs_skipped"]),
                str(row["results_late"]),
            )
        )
    print_table(table)
    return EXIT_OK


def _query(args: argparse.Namespace, call: Callable[[Any], Any]) -> Any:
    # Imported here, not at the top: grpc reads GRPC_VERBOSITY when it is first imported.
    from ..client import ClientError, QueryClient

    tls = client_tls(args)
    token = client_token(args)
    try:
        with QueryClient(args.coordinator, timeout=args.timeout, tls=tls, token=token) as client:
            return call(client)
    except ClientError as exc:
        raise UsageError(str(exc)) from None
