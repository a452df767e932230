"""Watching a coordinator through its public query service (gRPC ``vantage.v1.QueryService``).

Two sources, both recorded with the runner's monotonic clock when they arrive:

- ``WatchVerdicts``: every recorded transition with its id -- the authority on *when* a
  verdict changed state, and the material for the gap/duplicate check. Subscribed
  before any agent connects (and again after a coordinator restart), so nothing is
  missed.
- ``ListVerdicts`` and ``ListAgents`` polled every ``every`` seconds: the evidence that
  moves without a transition (regions down, dominant failure) and which agents are
  impaired.

Verdicts and agents are kept in the ``vantage status --json`` / ``vantage agents --json``
shapes (``vantage.client``), so what the runner reports reads like what a user sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from vantage.client import agent_json, state_name, verdict_json
from vantage_proto.v1 import query_pb2, query_pb2_grpc


@dataclass(frozen=True, slots=True)
class SeenTransition:
    at: float  # monotonic, on arrival
    epoch: int  # coordinator incarnation (restarts count up)
    id: int
    check: str
    previous: str | None
    verdict: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SeenVerdicts:
    at: float
    epoch: int
    verdicts: dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class SeenAgents:
    at: float
    agents: list[dict[str, Any]]


@dataclass
class Record:
    """Everything observed during a run, in arrival order."""

    transitions: list[SeenTransition] = field(default_factory=list)
    verdicts: list[SeenVerdicts] = field(default_factory=list)
    agents: list[SeenAgents] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)  # when each incarnation began
    subscribed: dict[int, float] = field(default_factory=dict)  # epoch -> watch confirmed
    watch_breaks: list[tuple[float, int, str]] = field(default_factory=list)


class Observer:
    """Records what coordinator ``address`` says. ``run()`` until cancelled;
    ``new_epoch()`` after the coordinator was restarted."""

    def __init__(self, address: str, ca_file: Path, token: str, every: float = 0.25) -> None:
        self.address = address
        self.every = every
        self.record = Record(epochs=[time.monotonic()])
        self._epoch = 0
        # Reconnect within a fraction of a second: the coordinator starts after the
        # observer and may be restarted by the scenario.
        # Over TLS (trusting the run's CA), with the runner's query token on every call.
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(ca_file.read_bytes()),
            grpc.access_token_call_credentials(token),
        )
        self._channel = aio.secure_channel(
            address,
            credentials,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500),
            ],
        )
        self._stub = query_pb2_grpc.QueryServiceStub(self._channel)
        self._resubscribe = asyncio.Event()

    @property
    def epoch(self) -> int:
        return self._epoch

    def subscribed(self) -> None:
        """The coordinator confirmed the watch (its log says so): from now on a broken
        watch stream is a finding, not the coordinator still starting."""
        self.record.subscribed.setdefault(self._epoch, time.monotonic())

    def new_epoch(self) -> None:
        self._epoch += 1
        self.record.epochs.append(time.monotonic())
        self._resubscribe.set()

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watch())
            tasks.create_task(self._poll())

    async def _watch(self) -> None:
        while True:
            self._resubscribe.clear()
            epoch = self._epoch
            call = self._stub.WatchVerdicts(query_pb2.WatchVerdictsRequest())
            resubscribe = asyncio.create_task(self._resubscribe.wait())
            try:
                reader = asyncio.create_task(self._read(call, epoch))
                done, _ = await asyncio.wait(
                    {reader, resubscribe}, return_when=asyncio.FIRST_COMPLETED
                )
                if reader in done:
                    problem = reader.exception()
                    code = problem.code().name if isinstance(problem, grpc.RpcError) else "END"
                    self.record.watch_breaks.append((time.monotonic(), epoch, code))
                    await asyncio.sleep(0.1)
                else:
                    call.cancel()
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                        await reader
            finally:
                resubscribe.cancel()
                call.cancel()

    async def _read(self, call: Any, epoch: int) -> None:
        async for message in call:
            self.record.transitions.append(
                SeenTransition(
                    at=time.monotonic(),
                    epoch=epoch,
                    id=message.id,
                    check=message.check,
                    previous=(
                        None
                        if message.previous == query_pb2.VERDICT_STATE_UNSPECIFIED
                        else state_name(message.previous)
                    ),
                    verdict=verdict_json(message.verdict),
                )
            )

    async def _poll(self) -> None:
        while True:
            epoch = self._epoch
            with contextlib.suppress(grpc.RpcError):
                response = await self._stub.ListVerdicts(query_pb2.ListVerdictsRequest(), timeout=2)
                self.record.verdicts.append(
                    SeenVerdicts(
                        time.monotonic(),
                        epoch,
                        {v.check: verdict_json(v) for v in response.verdicts},
                    )
                )
                agents = await self._stub.ListAgents(query_pb2.ListAgentsRequest(), timeout=2)
                self.record.agents.append(
                    SeenAgents(time.monotonic(), [agent_json(a) for a in agents.agents])
                )
            await asyncio.sleep(self.every)

    async def agents(self) -> list[dict[str, Any]]:
        """The fleet now (raises grpc.RpcError when the coordinator does not answer)."""
        response = await self._stub.ListAgents(query_pb2.ListAgentsRequest(), timeout=2)
        return [agent_json(agent) for agent in response.agents]
