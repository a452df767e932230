"""``vantage coordinator`` and ``vantage agent``: the two long-running services."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import names
from ..durations import parse_duration
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
    spool = agent.add_argument_group(
        "spool",
        "results the coordinator has not acknowledged wait on disk, survive restarts and "
        "are sent again in order",
    )
    where = spool.add_mutually_exclusive_group()
    where.add_argument(
        "--spool-dir", type=Path, metavar="DIR",
        help="the spool's directory, one per agent (default: $STATE_DIRECTORY/spool/NAME "
        "when STATE_DIRECTORY is set, as systemd's StateDirectory= and the container do; "
        "else ${XDG_STATE_HOME:-~/.local/state}/vantage/spool/NAME)",
    )  # fmt: skip
    where.add_argument(
        "--no-spool", action="store_true",
        help="keep results in memory only: they are lost when the agent stops, and its "
        "sequence numbers start anew",
    )  # fmt: skip
    spool.add_argument(
        "--spool-bytes", default="256MiB", metavar="SIZE",
        help="the spool's bound on disk; past it the oldest results are dropped and counted "
        "(default 256MiB; KiB, MiB, GiB are powers of 2, KB, MB, GB of 10)",
    )  # fmt: skip
    spool.add_argument(
        "--flush-interval", default="1s", metavar="DURATION",
        help="how often results are written to the spool: a kill -9 loses at most the "
        "results of this long (default 1s)",
    )  # fmt: skip
    add_log_flags(agent)
    agent.set_defaults(run=_run_agent)


def default_spool_dir(name: str) -> Path:
    """Where agent ``name`` spools without ``--spool-dir``: under systemd's (or the
    container's) ``$STATE_DIRECTORY``, else under the XDG state directory."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "spool" / name
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "vantage" / "spool" / name


def _byte_size(text: str, flag: str) -> int:
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        problem = f"{flag} {text!r} is not a size (write e.g. 256MiB, 64MiB, 1GiB)"
        raise UsageError(problem) from None


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
        run_service(coordinator.run(), stop=coordinator.stop)
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
    spool_dir = None if args.no_spool else args.spool_dir or default_spool_dir(args.name)
    spool_bytes = _byte_size(args.spool_bytes, "--spool-bytes")
    try:
        flush_interval = parse_duration(args.flush_interval)
    except ValueError as exc:
        raise UsageError(f"--flush-interval: {exc}") from None
    configure_logs(args)
    try:
        settings = AgentSettings(
            coordinator=args.coordinator,
            name=args.name,
            region=args.region,
            token=token,
            tls=tls,
            spool_dir=spool_dir,
            spool_bytes=spool_bytes,
            flush_interval=flush_interval,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    fatal: BaseException | None = None
    try:
        agent = Agent(settings)  # opens the spool: FatalError when it cannot be used
        run_service(agent.run())
    except* FatalError as group:
        fatal = group.exceptions[0]
    if fatal is not None:
        print(f"vantage agent: error: {fatal}", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_OK
