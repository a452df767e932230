"""``vantage coordinator`` and ``vantage agent``: the two long-running services."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import names
from .common import (
    EXIT_FATAL,
    EXIT_OK,
    UsageError,
    add_connection_flags,
    add_log_flags,
    checked_token,
    client_tls,
    configure_logs,
    read_secret,
    run_service,
)


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    coordinator = commands.add_parser(
        "coordinator",
        help="run the coordinator",
        description="Run the coordinator: accept agents, assign checks, compute verdicts, "
        "serve the query API (gRPC), /metrics and /healthz. Without --config it runs on "
        "the embedded defaults (gRPC 127.0.0.1:7400, HTTP 127.0.0.1:9470, no checks, "
        "no agent tokens). Reload the checks file with SIGHUP or by saving it.",
    )
    coordinator.add_argument("--config", type=Path, metavar="FILE", help="coordinator YAML file")
    add_log_flags(coordinator)
    coordinator.set_defaults(run=_run_coordinator)

    agent = commands.add_parser(
        "agent",
        help="run an agent",
        description="Run an agent: dial out to the coordinator, run the checks it assigns, "
        "stream the results. Reconnects by itself; exits 1 when the coordinator refuses "
        "its token, or its name or region (the token is bound to both).",
    )
    agent.add_argument("--name", required=True, help="unique agent name, e.g. eu-1")
    agent.add_argument("--region", required=True, help="region label, e.g. eu")
    add_connection_flags(agent, agent=True)
    add_log_flags(agent)
    agent.set_defaults(run=_run_agent)


def _run_coordinator(args: argparse.Namespace) -> int:
    from coordinator.config import load_config
    from coordinator.errors import ListenError
    from coordinator.server import Coordinator

    from ..configfile import ConfigError

    configure_logs(args)
    try:
        coordinator = Coordinator(load_config(args.config))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        run_service(coordinator.run())
    except ListenError as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def _run_agent(args: argparse.Namespace) -> int:
    from agent.agent import Agent, AgentSettings
    from agent.link import FatalError

    try:
        names.agent_name(args.name, "--name")
        names.agent_name(args.region, "--region")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    tls = client_tls(args)
    if args.token_file is None and args.cert_file is None:
        raise UsageError("--token-file is needed (or --cert-file, whose name stands in for it)")
    token = None
    if args.token_file is not None:
        token = checked_token(read_secret(args.token_file), f"token file {args.token_file}")
    configure_logs(args)
    try:
        settings = AgentSettings(
            coordinator=args.coordinator,
            name=args.name,
            region=args.region,
            token=token,
            tls=tls,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    fatal: BaseException | None = None
    try:
        run_service(Agent(settings).run())
    except* FatalError as group:
        fatal = group.exceptions[0]
    if fatal is not None:
        print(f"vantage agent: error: {fatal}", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_OK
