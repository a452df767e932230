"""Processes under test, each started in its namespace with ``ip netns exec`` (which
execs the program, so the pid is the program's, and bind-mounts the namespace's
``/etc/netns/<ns>/resolv.conf``).

A ``Process`` is started in its own session; stopping signals the whole process group
(nginx's workers too) and waits, SIGKILL after a grace period. Its stdout and stderr go
to one log file, appended across restarts; ``events()`` reads the JSON lines written since
the latest start. A process that exits while nobody asked it to has *crashed*.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from .commands import in_ns


class Process:
    def __init__(self, label: str, ns: str, argv: list[str], log: Path) -> None:
        self.label = label
        self.ns = ns
        self.argv = argv
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at_offset = 0
        self.expected_down = True  # until started
        self.starts = 0

    def start(self) -> Process:
        with self.log.open("ab") as output:
            self.started_at_offset = output.tell()
            self.popen = subprocess.Popen(
                in_ns(self.ns, *self.argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
            )
        self.expected_down = False
        self.starts += 1
        return self

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def crashed(self) -> int | None:
        """The exit code when the process exited without being asked to, else None."""
        if self.popen is None or self.expected_down:
            return None
        return self.popen.poll()

    async def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Signal the process group and wait for the process; SIGKILL after ``grace``."""
        self.expected_down = True
        popen = self.popen
        if popen is None:
            return
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, sig)
            for _ in range(int(grace / 0.02)):
                if popen.poll() is not None:
                    break
                await asyncio.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)  # the group's stragglers, if any
        if popen.poll() is None:
            popen.kill()
            await asyncio.to_thread(popen.wait)

    async def kill(self) -> None:
        await self.stop(signal.SIGKILL)

    def text(self) -> str:
        with self.log.open("rb") as log:
            log.seek(self.started_at_offset)
            return log.read().decode(errors="replace")

    def tail(self, lines: int = 8) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def events(self, since_start: bool = True) -> list[dict[str, Any]]:
        """JSON log lines (structlog's), since the latest start or from the beginning."""
        text = self.text() if since_start else self.log.read_text(errors="replace")
        events = []
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events
