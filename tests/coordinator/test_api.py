"""The JSON API's event stream in-process: resuming across the seam, and a coordinator that
stops while streams are open (the OpenAPI checks of every route are in tests/e2e)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
from live_coordinator import WAIT, eventually, start, write_config


async def _events(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    event: dict[str, Any] = {}
    async with asyncio.timeout(WAIT):
        while len(events) < count:
            line = (await response.content.readline()).decode()
            assert line, "the stream ended"
            if line == "\n":
                if event:
                    events.append(event)
                event = {}
            elif not line.startswith(":"):
                field, _, value = line.rstrip("\n").partition(": ")
                event[field] = json.loads(value) if field == "data" else value
    return events


async def test_an_event_stream_resumes_then_follows_live_transitions(tmp_path: Path) -> None:
    async with start(write_config(tmp_path)) as running, aiohttp.ClientSession() as session:
        agent = running.agent()
        await agent.handshake()
        await agent.send_results([agent.result("web"), agent.result("db", success=False)])
        async with session.get(
            f"{running.http_url}/api/v1/watch", headers={"Last-Event-ID": "0"}
        ) as response:
            assert response.status == 200
            replayed = await _events(response, 2)
            await agent.send_results([agent.result("web", success=False)])
            [live] = await _events(response, 1)
        assert [int(event["id"]) for event in [*replayed, live]] == [1, 2, 3]
        assert [event["data"]["verdict"]["state"] for event in [*replayed, live]] == [
            "up",
            "global",
            "global",
        ]
        agent.close()


async def test_open_event_streams_do_not_hold_up_a_stopping_coordinator(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        async with start(write_config(tmp_path)) as running:
            response = await session.get(f"{running.http_url}/api/v1/watch")
            assert response.status == 200

            async def subscribed() -> bool:
                return await running.metric("vantage_watch_streams_open") == 1

            await eventually(subscribed, "the stream to be subscribed")
        # The coordinator has stopped (within the harness' bound): the stream has ended.
        async with asyncio.timeout(WAIT):
            with contextlib.suppress(aiohttp.ClientPayloadError):
                assert await response.content.read() == b""
        response.release()
