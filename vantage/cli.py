"""The ``vantage`` command: run a coordinator or an agent, ask for verdicts and agents.

Exit codes: 0 success; 1 a service stopped on a fatal error (refused token, ...);
2 usage, configuration or connection errors. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from . import __version__, logs
from .configfile import split_host_port

DEFAULT_COORDINATOR = "127.0.0.1:7400"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EXIT_FATAL = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad flags or inputs; one line, exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core logs its own chatter ("Got goaway") at info; ours is structured.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except UsageError as exc:
        print(f"vantage {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vantage",
        description="Is it down for everyone, in some regions, or just from here? "
        "Agents in several regions probe targets; a coordinator decides.",
    )
    parser.add_argument("--version", action="version", version=f"vantage {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    coordinator = commands.add_parser(
        "coordinator",
        help="run the coordinator",
        description="Run the coordinator: accept agents, assign checks, compute verdicts, "
        "serve the query API (gRPC), /metrics and /healthz. Without --config it runs on "
        "the embedded defaults (gRPC 127.0.0.1:7400, HTTP 127.0.0.1:9470, no checks, "
        "no agent tokens). Reload the checks file with SIGHUP or by saving it.",
    )
    coordinator.add_argument("--config", type=Path, metavar="FILE", help="coordinator YAML file")
    _add_log_flags(coordinator)
    coordinator.set_defaults(run=_run_coordinator)

    agent = commands.add_parser(
        "agent",
        help="run an agent",
        description="Run an agent: dial out to the coordinator, run the checks it assigns, "
        "stream the results. Reconnects by itself; exits 1 when the coordinator refuses "
        "its token.",
    )
    agent.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    agent.add_argument("--name", required=True, help="unique agent name, e.g. eu-1")
    agent.add_argument("--region", required=True, help="region label, e.g. eu")
    agent.add_argument(
        "--token-file", required=True, type=Path, metavar="FILE", help="file holding the token"
    )
    _add_log_flags(agent)
    agent.set_defaults(run=_run_agent)

    status = commands.add_parser(
        "status",
        help="show verdicts",
        description="Show the verdict of every check, or of one, with the regions that "
        "see it down and why.",
    )
    status.add_argument("check", nargs="?", metavar="CHECK", help="only this check")
    _add_client_flags(status)
    status.set_defaults(run=_run_status)

    agents = commands.add_parser(
        "agents",
        help="show the agent fleet",
        description="Show every agent the coordinator knows: region, connected, impaired, "
        "last seen.",
    )
    _add_client_flags(agents)
    agents.set_defaults(run=_run_agents)

    check = commands.add_parser(
        "check",
        help="is it down for everyone or just me?",
        description="Probe a URL or host now from every agent the coordinator has and, at "
        "the same moment, from this machine; answer down for everyone, regional, or just "
        "you. Exit 0 when up, 1 when not up (it's just you included), 2 on errors.",
    )
    check.add_argument("target", metavar="URL|HOST", help="http(s)://..., HOST:PORT or HOST")
    check.add_argument(
        "--type",
        choices=("http", "tcp", "dns", "icmp"),
        help="probe type (default: http for a URL, tcp for HOST:PORT, icmp for HOST)",
    )
    check.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="probe timeout (default 5)"
    )
    check.add_argument("--json", action="store_true", help="one JSON object for scripts")
    check.add_argument(
        "--coordinator",
        default=DEFAULT_COORDINATOR,
        metavar="HOST:PORT",
        help=f"coordinator's gRPC address (default {DEFAULT_COORDINATOR})",
    )
    check.set_defaults(run=_run_check)
    return parser


def _run_check(args: argparse.Namespace) -> int:
    # Imported here: it imports the probes, and grpc must not load before main() set
    # GRPC_VERBOSITY.
    from .check_command import run_check

    return run_check(args)


def _add_log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info")
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: JSON unless stderr is a terminal",
    )


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        default=DEFAULT_COORDINATOR,
        metavar="HOST:PORT",
        help=f"coordinator's gRPC address (default {DEFAULT_COORDINATOR})",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")


def _configure_logs(args: argparse.Namespace) -> None:
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    logs.configure(args.log_level, json=json_logs)


def _run_service(coroutine: Coroutine[Any, Any, None]) -> None:
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


def _run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import load_config
    from coordinator.errors import ListenError
    from coordinator.server import Coordinator

    from .configfile import ConfigError

    _configure_logs(args)
    try:
        coordinator = Coordinator(load_config(args.config))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        _run_service(coordinator.run())
    except ListenError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _run_agent(args: argparse.Namespace) -> int:
    from agent.agent import Agent, AgentSettings
    from agent.link import FatalError

    for flag in ("name", "region"):
        value = getattr(args, flag)
        if not _NAME.fullmatch(value):
            raise UsageError(
                f"--{flag} {value!r} is invalid (letters, digits, '.', '_', '-'; at most 64)"
            )
    _check_address(args.coordinator)
    token = _read_token(args.token_file)
    _configure_logs(args)
    try:
        settings = AgentSettings(
            coordinator=args.coordinator, name=args.name, region=args.region, token=token
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    fatal: BaseException | None = None
    try:
        _run_service(Agent(settings).run())
    except* FatalError as group:
        fatal = group.exceptions[0]
    if fatal is not None:
        print(f"vantage agent: error: {fatal}", file=sys.stderr)
        return EXIT_FATAL
    return 0


def _check_address(address: str) -> None:
    try:
        split_host_port(address)
    except ValueError:
        raise UsageError(f"--coordinator {address!r} is not HOST:PORT") from None


def _read_token(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(lines) != 1:
        raise UsageError(f"token file {path} must hold exactly one token on one line")
    return lines[0]


def _run_status(args: argparse.Namespace) -> int:
    from .client import verdict_json

    verdicts = _query(args, lambda client: client.verdicts(args.check))
    rows = [verdict_json(v) for v in verdicts]
    if args.json:
        print(json.dumps({"verdicts": rows}, indent=None))
        return 0
    if not rows:
        print("no checks")
        return 0
    table = [("CHECK", "STATE", "SINCE", "REGIONS", "WHY")]
    for row in rows:
        regions = " ".join(f"{name}:{view['state']}" for name, view in row["regions"].items())
        table.append(
            (row["check"], row["state"], row["since"] or "-", regions or "-", row["reason"])
        )
    _print_table(table)
    return 0


def _run_agents(args: argparse.Namespace) -> int:
    from .client import agent_json

    agents = _query(args, lambda client: client.agents())
    rows = [agent_json(a) for a in agents]
    if args.json:
        print(json.dumps({"agents": rows}))
        return 0
    if not rows:
        print("no agents")
        return 0
    table = [("AGENT", "REGION", "CONNECTED", "IMPAIRED", "LAST SEEN", "VERSION")]
    for row in rows:
        table.append(
            (
                row["name"],
                row["region"],
                "yes" if row["connected"] else "no",
                "yes" if row["impaired"] else "no",
                row["last_seen"] or "-",
                row["version"] or "-",
            )
        )
    _print_table(table)
    return 0


def _query(args: argparse.Namespace, call: Any) -> Any:
    # Imported here, not at the top: grpc reads GRPC_VERBOSITY when it is first imported.
    from .client import ClientError, QueryClient

    _check_address(args.coordinator)
    try:
        with QueryClient(args.coordinator, timeout=args.timeout) as client:
            return call(client)
    except ClientError as exc:
        raise UsageError(str(exc)) from None


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


if __name__ == "__main__":
    raise SystemExit(main())
